"""``--verify``: run the source weights in diffusers and the converted checkpoint in our WanModel on the same
random input (both in float32), report the largest difference, and fail (``VerificationError``) when
either output holds a non-finite value or the relative difference max|ours - source| / max|source| exceeds
the tolerance (``DEFAULT_TOL``; ``--verify-tol``). The source weights are rounded to the dtype the
checkpoint stores them in (``--dtype``) before they enter diffusers, so the comparison sees the key
mapping and the model code, not the cast the user asked for.

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
from megatron_rcm.convert.errors import ConversionError, VerificationError

DEFAULT_TOL = 1e-4
"""Relative tolerance: two float32 implementations of the same math differ by round-off (~3e-7 on the
tiny models, growing with depth); one wrong tensor in the mapping gives O(1e-2..1)."""


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reference_model(plan, stored_dtype: dict | None = None):
    """The source as a float32 diffusers ``WanTransformer3DModel``, each tensor first rounded to
    ``stored_dtype[our key]`` (the checkpoint's dtype) when given."""
    from diffusers import WanTransformer3DModel

    source = plan.source
    if plan.layout in ("original", "rcm"):
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
        for key, ours in plan.ours_of.items():  # one tensor at a time: the source is never held twice
            value = source.read(key)
            if stored_dtype is not None:
                value = value.to(stored_dtype[ours])
            if plan.layout == "rcm":
                key = key.removeprefix(plan.rcm_prefix)
            if plan.layout in ("original", "rcm"):
                ((key, value),) = convert_wan_transformer_to_diffusers({key: value}).items()
            if key == "patch_embedding.weight" and value.ndim == 2 and key in params:
                value = value.reshape(params[key].shape)  # the linear patch embedding: Conv3d's, flattened
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
        "finite_ours": bool(torch.isfinite(v).all()),
        "finite_source": bool(torch.isfinite(v_ref).all()),
        "max_abs": max_abs,
        "max_ref": max_ref,
        "rel": max_abs / max_ref if max_ref else float("inf"),
        "input": f"x {list(inp['x'].shape)}, context {list(inp['context'].shape)}"
        + ("" if inp["clip"] is None else f", clip {list(inp['clip'].shape)}"),
    }


def preflight(plan) -> None:
    """What ``--verify`` needs, checked before anything is converted: diffusers, and memory for both models."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise ConversionError("--verify needs diffusers (pip install diffusers), or drop --verify") from None
    n_params = sum(torch.Size(s).numel() for s in plan.shapes.values())
    need, have = 8 * n_params, _available_bytes()
    if have is not None and need > have:
        raise ConversionError(
            f"--verify holds the source and the converted model in float32 at once: ~{need / 1e9:.0f} GB, "
            f"but {have / 1e9:.0f} GB are available; verify on a larger machine or drop --verify"
        )


def verify_import(plan, ckpt_dir, stored_dtype: dict | None = None, tol: float = DEFAULT_TOL) -> dict:
    """Compare source and converted checkpoint; raise ``VerificationError`` on a non-finite output or a
    relative difference above ``tol``, else return the comparison (with ``tol``)."""
    from megatron_rcm.models.wan import WanModel

    preflight(plan)
    reference = reference_model(plan, stored_dtype)
    ours = WanModel(plan.arch.wan_config(params_dtype=torch.float32, tensor_model_parallel_size=1)).eval()
    load_model(ours, os.fspath(ckpt_dir))
    result = compare(reference, ours, random_inputs(plan.arch)) | {"tol": tol}
    check(result)
    return result


def check(result: dict) -> None:
    """Fail on non-finite outputs or a relative difference above ``result["tol"]``."""
    bad = [name for name in ("ours", "source") if not result[f"finite_{name}"]]
    what = f"max |ours - source| = {result['max_abs']:.3e}, max |source| = {result['max_ref']:.3e}"
    if bad:
        raise VerificationError(
            f"--verify failed: the {' and the '.join(bad)} model's output holds NaN/inf ({what}) on input "
            f"{result['input']}; non-finite weights (listed above, if any) are the usual cause"
        )
    if not result["rel"] <= result["tol"]:
        raise VerificationError(
            f"--verify failed: relative difference {result['rel']:.3e} > tolerance {result['tol']:.1e} ({what}) "
            f"on input {result['input']}"
        )
