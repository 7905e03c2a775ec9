"""Wan DiT: forward parity with diffusers' WanTransformer3DModel and tangent parity with torch.func.jvp."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_rcm.convert.wan_keys import to_ours
from megatron_rcm.parallel.sharding import load_full_state_dict
from megatron_rcm.parallel.state import initialize_parallel
from tests.wan_helpers import make_diffusers, make_inputs, make_ours, rel_err, run_diffusers


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_forward_matches_diffusers_fp32(kind):
    ref = make_diffusers(kind)
    ours = make_ours(kind, ref)
    inp = make_inputs(kind)
    v_ref = run_diffusers(ref, inp)
    with torch.no_grad():
        v = ours(inp["x"], inp["timestep"], inp["context"], inp["clip"])
    # measured 3.0e-7 (t2v) / 3.6e-7 (i2v): float32 round-off; the issue bound is 1e-5. (An eps of 1e-6
    # instead of 1e-5 in the I2V image-embedder norms showed up here as 9e-6.)
    assert rel_err(v, v_ref) <= 1e-5


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_jvp_primal_matches_forward(kind):
    ours = make_ours(kind, make_diffusers(kind))
    inp = make_inputs(kind)
    with torch.no_grad():
        v = ours(inp["x"], inp["timestep"], inp["context"], inp["clip"])
        v2, _ = ours.forward_jvp(
            inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"], inp["clip"]
        )
    assert rel_err(v2, v) <= 1e-5  # SDPA vs the materialized reference: ~1e-7


def _swap_rope_pairs(sd):
    """A broken mapping: q weights with the two channels of every RoPE pair exchanged."""
    out = dict(sd)
    for k, w in sd.items():
        if k.endswith("attn1.to_q.weight"):
            out[k] = w.view(-1, 2, w.shape[-1]).flip(1).reshape(w.shape)
    return out


def _swap_qk(sd):
    out = dict(sd)
    for k in sd:
        if "attn1.to_q." in k:
            out[k], out[k.replace("to_q", "to_k")] = sd[k.replace("to_q", "to_k")], sd[k]
    return out


@pytest.mark.parametrize("breaker", [_swap_rope_pairs, _swap_qk])
def test_broken_mapping_fails_parity(breaker):
    """The parity check is not vacuous: a deliberately broken weight mapping is caught."""
    ref = make_diffusers("t2v")
    ours = make_ours("t2v")
    load_full_state_dict(ours, to_ours(breaker(ref.state_dict()), "diffusers"))
    inp = make_inputs("t2v")
    with torch.no_grad():
        v = ours(inp["x"], inp["timestep"], inp["context"])
    assert rel_err(v, run_diffusers(ref, inp)) > 1e-2


@contextlib.contextmanager
def plain_linears():
    """At TP=1 Megatron's parallel linears are exactly y = x W^T (+ b); their autograd.Function has no
    forward-mode rule, so for the torch.func.jvp oracle they are run as F.linear."""
    saved = ColumnParallelLinear.forward, RowParallelLinear.forward

    def fwd(self, x, *args, **kwargs):
        return F.linear(x, self.weight), self.bias

    ColumnParallelLinear.forward = RowParallelLinear.forward = fwd
    try:
        yield
    finally:
        ColumnParallelLinear.forward, RowParallelLinear.forward = saved


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_jvp_matches_torch_func_jvp_fp64(kind):
    ours = make_ours(kind, dtype=torch.float64, seed=3)
    inp = make_inputs(kind, dtype=torch.float64)
    ctx, clip = inp["context"], inp["clip"]
    with torch.no_grad():
        v, t_v = ours.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], ctx, clip)
    with plain_linears():
        v_ref, t_v_ref = torch.func.jvp(
            lambda x, ts: ours(x, ts, ctx, clip),
            (inp["x"], inp["timestep"]),
            (inp["t_x"], inp["t_timestep"]),
        )
    assert rel_err(v, v_ref) <= 1e-12
    # measured 1.2e-15 (t2v) / 8e-16 (i2v); the timestep tangent is scaled x100 so both sources matter
    assert rel_err(t_v, t_v_ref) <= 1e-6


def test_jvp_tangent_of_timestep_alone_is_nonzero_and_correct():
    ours = make_ours("t2v", dtype=torch.float64, seed=4)
    inp = make_inputs("t2v", dtype=torch.float64)
    zeros = torch.zeros_like(inp["x"])
    with torch.no_grad():
        _, t_v = ours.forward_jvp(inp["x"], zeros, inp["timestep"], inp["t_timestep"], inp["context"])
        h = 1e-7  # central difference, float64: truncation ~(h*dt)^2 ~ 1e-10, round-off ~1e-16*|t|/(h*dt) ~ 1e-9
        vp = ours(inp["x"], inp["timestep"] + h * inp["t_timestep"], inp["context"])
        vm = ours(inp["x"], inp["timestep"] - h * inp["t_timestep"], inp["context"])
    fd = (vp - vm) / (2 * h)
    assert t_v.abs().max() > 1e-3
    assert rel_err(t_v, fd) <= 1e-6


def test_jvp_primal_carries_the_gradient():
    """The sCM step takes its gradient from the primal of the JVP pass: same grads as a plain forward."""
    ours = make_ours("t2v", dtype=torch.float64, seed=5)
    inp = make_inputs("t2v", dtype=torch.float64)
    w = torch.randn_like(inp["x"])
    v, t_v = ours.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"])
    assert v.requires_grad and not t_v.requires_grad
    grads_jvp = torch.autograd.grad((v * w).sum(), list(ours.parameters()))
    v_plain = ours(inp["x"], inp["timestep"], inp["context"])
    grads_plain = torch.autograd.grad((v_plain * w).sum(), list(ours.parameters()))
    for a, b in zip(grads_jvp, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
