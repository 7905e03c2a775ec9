"""Cosmos-Predict2 DiT: forward parity with diffusers' CosmosTransformer3DModel and tangent parity with
torch.func.jvp in float64."""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.convert.cosmos_keys import to_ours
from megatron_rcm.models.cosmos.model import resize_nearest
from megatron_rcm.parallel.sharding import load_full_state_dict
from megatron_rcm.parallel.state import initialize_parallel
from tests.cosmos_helpers import make_diffusers, make_inputs, make_ours, rel_err, run_diffusers
from tests.test_wan_parity import plain_linears

# diffusers builds the q/k RMSNorms with its Attention default eps 1e-5; the original (and our default) is 1e-6
DIFFUSERS_QK_EPS = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


def _ours_forward(model, inp, **kw):
    with torch.no_grad():
        return model(inp["x"], inp["timestep"], inp["context"], padding_mask=inp["padding"], **kw)


@pytest.mark.parametrize("kind", ["t2i", "v2w"])
def test_forward_matches_diffusers_fp32(kind):
    ref = make_diffusers(kind)
    ours = make_ours(kind, ref, qk_norm_eps=DIFFUSERS_QK_EPS)
    inp = make_inputs(kind)
    v_ref = run_diffusers(ref, inp, kind)
    v = _ours_forward(ours, inp)
    # float32 round-off (RoPE angles: ours float64 -> float32, diffusers float32): measured 3.4e-7 (t2i) / 3.7e-7 (v2w)
    assert rel_err(v, v_ref) <= 1e-5


def _per_frame(inp, seed=11):
    """The inputs with a timestep (and its tangent) per latent frame [B, F]: frame 0 at the clean time 0,
    as Video2World's conditioning frame."""
    gen = torch.Generator().manual_seed(seed)
    B, F_ = inp["x"].shape[0], inp["x"].shape[2]
    dtype = inp["x"].dtype
    timestep = torch.rand(B, F_, generator=gen, dtype=dtype)
    timestep[:, 0] = 0
    return dict(inp, timestep=timestep, t_timestep=torch.randn(B, F_, generator=gen, dtype=dtype))


@pytest.mark.parametrize("kind", ["t2i", "v2w"])
def test_per_frame_timestep_matches_diffusers_fp32(kind):
    """timestep [B, F] against diffusers' 5-D timestep [B, 1, F, 1, 1] (its per-token embeddings)."""
    ref = make_diffusers(kind, seed=6)
    ours = make_ours(kind, ref, qk_norm_eps=DIFFUSERS_QK_EPS)
    inp = _per_frame(make_inputs(kind, frames=3))
    v_ref = run_diffusers(ref, dict(inp, timestep=inp["timestep"][:, None, :, None, None]), kind)
    v = _ours_forward(ours, inp)
    # float32 round-off as the [B] parity above
    assert rel_err(v, v_ref) <= 1e-5
    # not vacuous: the frames' times matter (the per-sample time of frame 1 moves the output)
    v_one = _ours_forward(ours, dict(inp, timestep=inp["timestep"][:, 1]))
    assert rel_err(v_one, v_ref) > 1e-3


def test_per_frame_timestep_constant_over_frames_equals_per_sample():
    ours = make_ours("v2w", dtype=torch.float64, seed=7)
    inp = make_inputs("v2w", dtype=torch.float64)
    F_ = inp["x"].shape[2]
    v_frames = _ours_forward(ours, dict(inp, timestep=inp["timestep"][:, None].expand(-1, F_)))
    assert rel_err(v_frames, _ours_forward(ours, inp)) <= 1e-14


def test_every_parameter_matters():
    """No vacuous parity: perturbing any single tensor of the oracle moves its output."""
    ref = make_diffusers("t2i")
    inp = make_inputs("t2i")
    v0 = run_diffusers(ref, inp, "t2i")
    gen = torch.Generator().manual_seed(9)
    for name, p in ref.named_parameters():
        if name.startswith("transformer_blocks.1."):
            continue  # block 1 has block 0's structure; skipping it halves the test's time
        # random, not constant: a constant added to the patch embedding is a per-token shift LayerNorm removes
        delta = 0.1 * torch.randn(p.shape, generator=gen)
        with torch.no_grad():
            p.add_(delta)
            moved = rel_err(run_diffusers(ref, inp, "t2i"), v0)
            p.sub_(delta)
        assert moved > 1e-4, name


def test_image_mode_single_frame_matches_diffusers():
    ref = make_diffusers("t2i", seed=2)
    ours = make_ours("t2i", ref, qk_norm_eps=DIFFUSERS_QK_EPS)
    inp = make_inputs("t2i", frames=1, size=12)
    assert rel_err(_ours_forward(ours, inp), run_diffusers(ref, inp, "t2i")) <= 1e-5


def test_qk_norm_eps_is_visible():
    """The eps difference between the original (1e-6) and diffusers (1e-5) shows, so the parity test
    pins it: with the original eps the tiny model differs from diffusers by more than round-off."""
    ref = make_diffusers("t2i")
    inp = make_inputs("t2i")
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "to_q" in n or "to_k" in n:
                p.mul_(0.02)  # small q/k: eps matters against mean(q^2)
    v_ref = run_diffusers(ref, inp, "t2i")
    assert rel_err(_ours_forward(make_ours("t2i", ref, qk_norm_eps=DIFFUSERS_QK_EPS), inp), v_ref) <= 1e-5
    assert rel_err(_ours_forward(make_ours("t2i", ref), inp), v_ref) > 1e-5


def _swap_rope_halves(sd):
    """A broken mapping: q weights with the two halves of every head (the rotate-half pairs) exchanged."""
    out = dict(sd)
    for k, w in sd.items():
        if k.endswith("attn1.to_q.weight"):
            out[k] = w.view(4, 2, -1, w.shape[-1]).flip(1).reshape(w.shape)
    return out


def _swap_adaln(sd):
    """A broken mapping: the self- and cross-attention AdaLN-LoRA modulations exchanged."""
    out = dict(sd)
    for k in sd:
        if ".norm1.linear_" in k:
            out[k], out[k.replace("norm1", "norm2")] = sd[k.replace("norm1", "norm2")], sd[k]
    return out


@pytest.mark.parametrize("breaker", [_swap_rope_halves, _swap_adaln])
def test_broken_mapping_fails_parity(breaker):
    ref = make_diffusers("t2i")
    ours = make_ours("t2i", qk_norm_eps=DIFFUSERS_QK_EPS)
    load_full_state_dict(ours, to_ours(breaker(ref.state_dict()), "diffusers"))
    inp = make_inputs("t2i")
    assert rel_err(_ours_forward(ours, inp), run_diffusers(ref, inp, "t2i")) > 1e-2


def test_resize_nearest_is_floor_indexing():
    """Our padding-mask resize = nearest with source index floor(dst * in / out) (torchvision NEAREST)."""
    m = torch.arange(6 * 10, dtype=torch.float32).view(1, 1, 6, 10)
    out = resize_nearest(m, (4, 3))
    rows = [int(i * 6 / 4) for i in range(4)]
    cols = [int(j * 10 / 3) for j in range(3)]
    assert torch.equal(out[0, 0], m[0, 0][rows][:, cols])


@pytest.mark.parametrize("kind", ["t2i", "v2w"])
def test_jvp_matches_torch_func_jvp_fp64(kind):
    ours = make_ours(kind, dtype=torch.float64, seed=3)
    inp = make_inputs(kind, dtype=torch.float64)
    ctx, pad = inp["context"], inp["padding"]
    with torch.no_grad():
        v, t_v = ours.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], ctx, None, pad)
    with plain_linears():
        v_ref, t_v_ref = torch.func.jvp(
            lambda x, ts: ours(x, ts, ctx, None, pad),
            (inp["x"], inp["timestep"]),
            (inp["t_x"], inp["t_timestep"]),
        )
    assert rel_err(v, v_ref) <= 1e-12
    assert t_v.abs().max() > 1e-3
    assert rel_err(t_v, t_v_ref) <= 1e-10  # float64 round-off


def test_jvp_per_frame_timestep_matches_torch_func_jvp_fp64():
    ours = make_ours("v2w", dtype=torch.float64, seed=8)
    inp = _per_frame(make_inputs("v2w", dtype=torch.float64))
    ctx, pad = inp["context"], inp["padding"]
    with torch.no_grad():
        v, t_v = ours.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], ctx, None, pad)
        _, t_v_x = ours.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], None, ctx, None, pad)
    with plain_linears():
        v_ref, t_v_ref = torch.func.jvp(
            lambda x, ts: ours(x, ts, ctx, None, pad),
            (inp["x"], inp["timestep"]),
            (inp["t_x"], inp["t_timestep"]),
        )
    assert rel_err(v, v_ref) <= 1e-12
    assert rel_err(t_v, t_v_x) > 1e-3  # the per-frame time tangent contributes
    assert rel_err(t_v, t_v_ref) <= 1e-10  # float64 round-off


def test_jvp_of_timestep_alone_matches_finite_difference():
    ours = make_ours("t2i", dtype=torch.float64, seed=4)
    inp = make_inputs("t2i", dtype=torch.float64)
    zeros = torch.zeros_like(inp["x"])
    with torch.no_grad():
        _, t_v = ours.forward_jvp(inp["x"], zeros, inp["timestep"], inp["t_timestep"], inp["context"])
        h = 1e-6  # central difference in float64: truncation ~h^2, round-off ~1e-16/h
        vp = ours(inp["x"], inp["timestep"] + h * inp["t_timestep"], inp["context"])
        vm = ours(inp["x"], inp["timestep"] - h * inp["t_timestep"], inp["context"])
    assert t_v.abs().max() > 1e-3
    assert rel_err(t_v, (vp - vm) / (2 * h)) <= 1e-6


def test_jvp_primal_carries_the_gradient():
    ours = make_ours("t2i", dtype=torch.float64, seed=5)
    inp = make_inputs("t2i", dtype=torch.float64)
    w = torch.randn_like(inp["x"])
    v, t_v = ours.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"])
    assert v.requires_grad and not t_v.requires_grad
    grads_jvp = torch.autograd.grad((v * w).sum(), list(ours.parameters()))
    grads_plain = torch.autograd.grad(
        (ours(inp["x"], inp["timestep"], inp["context"]) * w).sum(), list(ours.parameters())
    )
    for a, b in zip(grads_jvp, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_inputs_name_the_problem():
    from megatron_rcm.models.cosmos import cosmos_config

    ours = make_ours("v2w")
    inp = make_inputs("v2w")
    with pytest.raises(ValueError, match=r"x must be \[B, C=5 \(latents \+ condition mask\)"):
        ours(inp["x"][:, :4], inp["timestep"], inp["context"])
    with pytest.raises(ValueError, match="not divisible by patch"):
        ours(inp["x"][..., :7], inp["timestep"], inp["context"])
    with pytest.raises(ValueError, match=r"context must be \[B=2, L, 32\]"):
        ours(inp["x"], inp["timestep"], inp["context"][..., :5])
    with pytest.raises(ValueError, match=r"timestep must be \[B=2\] \(one per sample\) or \[B=2, F=3\]"):
        ours(inp["x"], inp["timestep"][:, None].expand(2, 4), inp["context"])
    with pytest.raises(ValueError, match=r"t_timestep shape \(2,\) != timestep shape \(2, 3\)"):
        ours.forward_jvp(
            inp["x"], None, inp["timestep"][:, None].expand(2, 3), inp["timestep"], inp["context"]
        )
    with pytest.raises(ValueError, match="no CLIP"):
        ours(inp["x"], inp["timestep"], inp["context"], torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="exceeds the position tables"):
        make_ours("t2i")(torch.zeros(1, 4, 9, 2, 2), torch.zeros(1), torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match="unknown Cosmos preset"):
        cosmos_config("cosmos-predict2-7b-t2i")
    with pytest.raises(ValueError, match="RoPE parts"):
        cosmos_config("cosmos-tiny-t2i", hidden_size=64, num_attention_heads=8)
