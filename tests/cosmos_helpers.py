"""Shared builders for the Cosmos tests: tiny diffusers ``CosmosTransformer3DModel`` oracles with every
parameter random, our model loaded from them, and inputs.

diffusers resizes the padding mask with torchvision, which is not installed here (its CUDA build would
come along); ``torchvision_stand_in`` puts in its place the one call torchvision makes for a tensor and
``InterpolationMode.NEAREST``: ``torch.nn.functional.interpolate(img, size, mode="nearest")``
(torchvision ``transforms/_functional_tensor.py::resize``: ``interpolate(img, size=size,
mode=interpolation, align_corners=None, antialias=False)`` with ``interpolation = "nearest"``).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from megatron_rcm.convert.cosmos_keys import to_ours
from megatron_rcm.models.cosmos import CosmosModel, cosmos_config
from megatron_rcm.parallel.sharding import load_full_state_dict
from tests.wan_helpers import randomize_, rel_err  # noqa: F401  (re-exported for the Cosmos tests)

TEXT_LEN = 7
FPS = 16


def diffusers_config(kind: str) -> dict:
    cfg = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=32,
        num_layers=2,
        mlp_ratio=4.0,
        text_embed_dim=32,
        adaln_lora_dim=16,
        max_size=(8, 16, 16),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 2.0, 3.0),
        concat_padding_mask=True,
        extra_pos_embed_type="learnable",
    )
    if kind == "v2w":
        cfg.update(in_channels=5, rope_scale=(0.8, 2.0, 2.0), extra_pos_embed_type=None)
    return cfg


@contextlib.contextmanager
def torchvision_stand_in():
    import diffusers.models.transformers.transformer_cosmos as tc

    def resize(img, size, interpolation):
        assert interpolation == "nearest"
        return F.interpolate(img, size=list(size), mode="nearest")

    stand_in = types.SimpleNamespace(
        functional=types.SimpleNamespace(resize=resize),
        InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
    )
    had = hasattr(tc, "transforms")
    saved = getattr(tc, "transforms", None)
    tc.transforms = stand_in
    try:
        yield
    finally:
        if had:
            tc.transforms = saved
        else:
            del tc.transforms


def make_diffusers(kind: str, seed: int = 0, dtype=torch.float32):
    from diffusers import CosmosTransformer3DModel

    model = CosmosTransformer3DModel(**diffusers_config(kind)).to(dtype).eval()
    randomize_(model, seed)
    return model


def make_ours(
    kind: str, diffusers_model=None, dtype=torch.float32, seed: int = 0, **overrides
) -> CosmosModel:
    cfg = cosmos_config(f"cosmos-tiny-{kind}", params_dtype=dtype, **overrides)
    model = CosmosModel(cfg).eval()
    if diffusers_model is not None:
        load_full_state_dict(model, to_ours(diffusers_model.state_dict(), "diffusers"))
    else:
        randomize_(model, seed)
    return model


def make_inputs(
    kind: str, batch: int = 2, frames: int = 3, size: int = 8, dtype=torch.float32, seed: int = 1
):
    """x [B, C, F, H, W] (for v2w the last channel is the 0/1 condition mask, first frame conditioning)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, size, size, generator=gen, dtype=dtype)
    if kind == "v2w":
        mask = torch.zeros(batch, 1, frames, size, size, dtype=dtype)
        mask[:, :, :1] = 1
        x = torch.cat([x, mask], dim=1)
    timestep = torch.rand(batch, generator=gen, dtype=dtype)
    context = torch.randn(batch, TEXT_LEN, 32, generator=gen, dtype=dtype)
    t_x = torch.randn(x.shape, generator=gen, dtype=dtype)
    if kind == "v2w":
        t_x[:, -1] = 0  # the condition mask is constant
    t_timestep = torch.randn(batch, generator=gen, dtype=dtype)
    # a pixel-space padding mask (8x the latent size, as the pipelines build it), resized inside
    padding = (torch.rand(1, 1, 8 * size, 8 * size, generator=gen) > 0.7).to(dtype)
    return dict(x=x, timestep=timestep, context=context, t_x=t_x, t_timestep=t_timestep, padding=padding)


def run_diffusers(model, inp, kind: str):
    x = inp["x"]
    kwargs = {}
    if kind == "v2w":
        x, kwargs["condition_mask"] = x[:, :-1], x[:, -1:]
        kwargs["fps"] = FPS
    with torch.no_grad(), torchvision_stand_in():
        return model(
            x, inp["timestep"], inp["context"], padding_mask=inp["padding"], return_dict=False, **kwargs
        )[0]
