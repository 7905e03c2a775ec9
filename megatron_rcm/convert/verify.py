"""``--verify``: run the source weights in diffusers and the converted checkpoint in our WanModel on the same
random input (both in float32) and report the largest difference.

The source model is built by diffusers alone -- ``WanTransformer3DModel`` from the source's own
config.json, original-layout keys renamed by diffusers' ``convert_wan_transformer_to_diffusers`` -- so a
mistake in our key tables or config reading shows up as a difference, not as two equal mistakes.
Both models live in memory at once, in float32: about 8 bytes per parameter (1.3B: ~11 GB; 14B: ~113 GB).
"""

from __future__ import annotations

import os

import torch

from megatron_rcm.convert.arch import to_diffusers_config
from megatron_rcm.convert.dist_ckpt import load_model
from megatron_rcm.convert.errors import ConversionError


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reference_model(plan):
    """The source as a float32 diffusers ``WanTransformer3DModel`` (None when diffusers is missing)."""
    try:
        from diffusers import WanTransformer3DModel
    except ImportError:
        return None
    source = plan.source
    if plan.layout == "original":
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    if plan.layout == "diffusers" and source.config is not None:
        config = source.config
    else:
        config = to_diffusers_config(plan.arch)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = WanTransformer3DModel.from_config(config).float().eval()
    params = model.state_dict()
    filled = set()
    with torch.no_grad():
        for key in plan.ours_of:  # one tensor at a time: the source is never held twice
            value = source.read(key)
            if plan.layout == "original":
                ((key, value),) = convert_wan_transformer_to_diffusers({key: value}).items()
            if key not in params or params[key].shape != value.shape:
                raise ConversionError(
                    f"--verify: diffusers has no tensor {key!r} of shape {tuple(value.shape)}"
                )
            params[key].copy_(value)
            filled.add(key)
    if filled != set(params):
        raise ConversionError(
            f"--verify: the source leaves diffusers tensors unset: {sorted(set(params) - filled)}"
        )
    return model


def random_inputs(arch, seed: int = 0) -> dict:
    """One sample: 2x4x4 patches of latent, timestep 500; 16 text tokens (I2V: 512, the length diffusers'
    I2V attention assumes when it splits image from text tokens) and 257 CLIP tokens."""
    gen = torch.Generator().manual_seed(seed)
    pt, ph, pw = arch.patch_size
    x = torch.randn(1, arch.in_channels, 2 * pt, 4 * ph, 4 * pw, generator=gen)
    text_len = 512 if arch.model_type == "i2v" else 16
    context = torch.randn(1, text_len, arch.text_dim, generator=gen)
    clip = torch.randn(1, 257, arch.image_dim, generator=gen) if arch.model_type == "i2v" else None
    return dict(x=x, timestep=torch.tensor([500.0]), context=context, clip=clip)


@torch.no_grad()
def compare(reference, ours, inp: dict) -> dict:
    kwargs = {} if inp["clip"] is None else {"encoder_hidden_states_image": inp["clip"]}
    v_ref = reference(inp["x"], inp["timestep"], inp["context"], return_dict=False, **kwargs)[0]
    v = ours(inp["x"], inp["timestep"], inp["context"], inp["clip"])
    max_abs = (v.double() - v_ref.double()).abs().max().item()
    max_ref = v_ref.double().abs().max().item()
    return {
        "max_abs": max_abs,
        "max_ref": max_ref,
        "rel": max_abs / max_ref if max_ref else float("inf"),
        "input": f"x {list(inp['x'].shape)}, context {list(inp['context'].shape)}"
        + ("" if inp["clip"] is None else f", clip {list(inp['clip'].shape)}"),
    }


def verify_import(plan, ckpt_dir, log=print) -> dict | None:
    """Compare source and converted checkpoint; None (with a message) when diffusers is not installed."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        log("verify:  skipped (diffusers is not installed: pip install diffusers)")
        return None
    from megatron_rcm.models.wan import WanModel

    n_params = sum(torch.Size(s).numel() for s in plan.shapes.values())
    need, have = 8 * n_params, _available_bytes()
    if have is not None and need > have:
        raise ConversionError(
            f"--verify holds the source and the converted model in float32 at once: ~{need / 1e9:.0f} GB, "
            f"but {have / 1e9:.0f} GB are available; verify on a larger machine or drop --verify"
        )
    reference = reference_model(plan)
    ours = WanModel(plan.arch.wan_config(params_dtype=torch.float32, tensor_model_parallel_size=1)).eval()
    load_model(ours, os.fspath(ckpt_dir))
    return compare(reference, ours, random_inputs(plan.arch))
