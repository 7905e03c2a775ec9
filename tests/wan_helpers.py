"""Shared builders for the Wan tests: tiny diffusers oracles with every parameter random, and our model
loaded from them."""

from __future__ import annotations

import torch

from megatron_rcm.convert.wan_keys import to_ours
from megatron_rcm.models.wan import WanModel, wan_config
from megatron_rcm.parallel.sharding import load_full_state_dict

TEXT_LEN = 12  # diffusers' I2V processor hard-codes 512 text tokens; I2V tests use 512


def diffusers_config(kind: str) -> dict:
    cfg = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=256,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    if kind == "i2v":
        cfg.update(in_channels=8, image_dim=24, added_kv_proj_dim=128)
    return cfg


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Draw every parameter at random: the released init zeroes the head (a vacuous parity test)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.ndim >= 2 and "table" not in name and "modulation" not in name:
            fan_in = p[0].numel()
            p.copy_(noise / fan_in**0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * noise)
        else:
            p.copy_(0.2 * noise)


def make_diffusers(kind: str, seed: int = 0, dtype=torch.float32):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**diffusers_config(kind)).to(dtype).eval()
    randomize_(model, seed)
    return model


def make_ours(kind: str, diffusers_model=None, dtype=torch.float32, seed: int = 0, **overrides) -> WanModel:
    cfg = wan_config(f"wan-tiny-{kind}", params_dtype=dtype, **overrides)
    model = WanModel(cfg).eval()
    if diffusers_model is not None:
        load_full_state_dict(model, to_ours(diffusers_model.state_dict(), "diffusers"))
    else:
        randomize_(model, seed)
    return model


def make_inputs(
    kind: str, batch: int = 2, frames: int = 3, size: int = 8, dtype=torch.float32, seed: int = 1
):
    gen = torch.Generator().manual_seed(seed)
    c_in = 8 if kind == "i2v" else 4
    text_len = 512 if kind == "i2v" else TEXT_LEN
    x = torch.randn(batch, c_in, frames, size, size, generator=gen, dtype=dtype)
    timestep = torch.rand(batch, generator=gen, dtype=dtype) * 1000
    context = torch.randn(batch, text_len, 32, generator=gen, dtype=dtype)
    clip = torch.randn(batch, 5, 24, generator=gen, dtype=dtype) if kind == "i2v" else None
    t_x = torch.randn(x.shape, generator=gen, dtype=dtype)
    t_timestep = torch.randn(batch, generator=gen, dtype=dtype) * 100
    return dict(x=x, timestep=timestep, context=context, clip=clip, t_x=t_x, t_timestep=t_timestep)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the reference)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run_diffusers(model, inp):
    kwargs = {}
    if inp["clip"] is not None:
        kwargs["encoder_hidden_states_image"] = inp["clip"]
    with torch.no_grad():
        return model(inp["x"], inp["timestep"], inp["context"], return_dict=False, **kwargs)[0]
