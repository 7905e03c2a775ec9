"""The linear biases fused into the elementwise kernels (bias-GELU, bias + gated residual, bias + q/k RMSNorm)
against the unfused reference (``TorchElementwise``: y + b in the activation dtype, then the chain, as
``models.jvp.linear_jvp`` did): primal, tangent and the gradients of x, the bias and the other inputs; the
tiny Wan model fused vs unfused with every bias gradient; and deliberately broken bias handling that must fail.

CPU, TRITON_INTERPRET=1 (conftest.py), D = 48 (masked columns), s = 5 tokens; tolerances as in
tests/test_kernel_elementwise.py. In bf16 the reference rounds y + b to bf16 before the chain and the kernel
does not (float32 in registers): one more bf16 rounding apart, still within the 1e-2 bound (measured printed).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.parallel.state import initialize_parallel
from tests.test_kernel_elementwise import DEVICE, FUSED, REF, TOL, check, compare, leaf

S, B, D = 5, 2, 48


@pytest.fixture(scope="module", autouse=True)
def _tp1():
    initialize_parallel(tensor_parallel=1)  # the q/k RMSNorm asks for the TP group size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tangents", ["all", "gate_only", "none"])
def test_gated_residual_with_bias(dtype, tangents):
    x, y, gate, bias = leaf(S, B, D, dtype=dtype), leaf(S, B, D, dtype=dtype), leaf(B, D), leaf(D, dtype=dtype)
    t = lambda *shape: torch.randn(*shape, device=DEVICE)
    t_x = t(S, B, D).to(dtype) if tangents == "all" else None
    t_y = t(S, B, D).to(dtype) if tangents == "all" else None
    t_gate = t(B, D) if tangents in ("all", "gate_only") else None
    compare("gated_residual", (x, t_x, y, t_y, gate, t_gate, bias), (0, 2, 4, 6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_tangent", [True, False])
def test_rms_norm_with_bias(dtype, with_tangent):
    x = leaf(S, B, D, dtype=dtype, scale=3.0)
    t_x = torch.randn(S, B, D, device=DEVICE).to(dtype) if with_tangent else None
    w, bias = leaf(D, dtype=dtype, offset=1.0), leaf(D, dtype=dtype, scale=2.0)
    compare("rms_norm", (x, t_x, w, 1e-6, D, bias), (0, 2, 5), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_tangent", [True, False])
def test_gelu_tanh_with_bias(dtype, with_tangent):
    F = 3 * D
    x = leaf(S, B, F, dtype=dtype, scale=4.0)  # |x + b| up to ~15: both tanh saturations
    t_x = torch.randn(S, B, F, device=DEVICE).to(dtype) if with_tangent else None
    compare("gelu_tanh", (x, t_x, leaf(F, dtype=dtype, scale=2.0)), (0, 2), dtype)


def test_gelu_bias_gradient_over_many_row_chunks():
    """More rows than the backward's programs (264): several rows per chunk, partial sums reduced once."""
    x, bias = leaf(300, 2, 40), leaf(40)
    compare("gelu_tanh", (x, torch.randn(300, 2, 40), bias), (0, 2), torch.float32)


def _tp_rms_bias_worker(rank, world, x, t_x, w, b, g):
    """This rank's head shard (and its bias shard) through the fused RMSNorm, statistics over gloo."""
    initialize_parallel(tensor_parallel=world)
    n = x.shape[-1] // world
    cols = slice(rank * n, (rank + 1) * n)
    xs, ws, bs = (t[..., cols].clone().requires_grad_(True) for t in (x, w, b))
    y, t_y = FUSED.rms_norm(xs, t_x[..., cols].contiguous(), ws, 1e-6, x.shape[-1], bs)
    dx, dw, db = torch.autograd.grad(y, (xs, ws, bs), g[..., cols])
    from megatron_rcm.parallel.state import destroy_parallel

    destroy_parallel()
    return y.detach(), t_y, dx, dw, db


def test_rms_norm_with_bias_tp2_matches_the_full_row():
    """TP = 2: the bias enters the all-reduced statistics (forward and backward) of the full row."""
    from tests.dist_helpers import spawn

    x, t_x, g = torch.randn(S, B, D) * 3, torch.randn(S, B, D), torch.randn(S, B, D)
    w, b = 1 + 0.2 * torch.randn(D), torch.randn(D)
    outs = spawn(_tp_rms_bias_worker, 2, x, t_x, w, b, g)
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    y_ref, t_ref = REF.rms_norm(xr, t_x, wr, 1e-6, D, br)
    refs = (y_ref.detach(), t_ref, *torch.autograd.grad(y_ref, (xr, wr, br), g))
    half = slice(0, D // 2)
    for name, out, ref in zip(("y", "t_y", "dx", "dw", "db"), outs, refs):
        check(f"TP=2 rms_norm+bias {name}", out, ref[..., half], TOL[torch.float32])  # measured <= 3e-7


def test_a_bias_of_another_dtype_stays_on_the_reference():
    """y + b would promote bf16 + float32; the kernels (out in x's dtype) do not take that case."""
    x, bias = torch.randn(S, B, D).bfloat16(), torch.randn(D)
    y, _ = FUSED.gelu_tanh(x, None, bias)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, REF.gelu_tanh(x, None, bias)[0], rtol=0, atol=0)


def test_bad_bias_shape_is_refused():
    from megatron_rcm.kernels.elementwise_gelu import gelu_tanh_jvp_fused

    with pytest.raises(ValueError, match=r"bias has shape \(47,\), expected \(48,\)"):
        gelu_tanh_jvp_fused(torch.randn(S, B, D), None, torch.randn(D - 1))


# --------------------------------------------------------------------------- the checks can fail
def test_a_bias_added_twice_fails():
    x, bias = leaf(S, B, 3 * D), leaf(3 * D)
    y_ref, _ = REF.gelu_tanh(x, None, bias)
    y_twice, _ = FUSED.gelu_tanh(x + bias, None, bias)
    with pytest.raises(AssertionError, match="relative error"):
        check("GELU of x + 2b", y_twice, y_ref, TOL[torch.float32])


def _drop_bias_grad(monkeypatch, function):
    """``function``'s backward with its bias gradient (the last output) zeroed."""
    backward = function.backward

    def dropped(ctx, *grads):
        out = list(backward(ctx, *grads))
        out[-1] = None if out[-1] is None else torch.zeros_like(out[-1])
        return tuple(out)

    monkeypatch.setattr(function, "backward", staticmethod(dropped))


@pytest.mark.parametrize("chain", ["gelu_tanh", "gated_residual", "rms_norm"])
def test_a_dropped_bias_gradient_fails(monkeypatch, chain):
    from megatron_rcm.kernels.elementwise_gate import GatedResidualJVPFunction
    from megatron_rcm.kernels.elementwise_gelu import GeluTanhJVPFunction
    from megatron_rcm.kernels.elementwise_rms_norm import RMSNormJVPFunction

    fn = dict(gelu_tanh=GeluTanhJVPFunction, gated_residual=GatedResidualJVPFunction, rms_norm=RMSNormJVPFunction)
    _drop_bias_grad(monkeypatch, fn[chain])
    x, bias = leaf(S, B, D), leaf(D)
    args = dict(gelu_tanh=((x, None, bias), (0, 2)),
                gated_residual=((x, None, leaf(S, B, D), None, leaf(B, D), None, bias), (0, 2, 4, 6)),
                rms_norm=((x, None, leaf(D, offset=1.0), 1e-6, D, bias), (0, 2, 5)))[chain]
    with pytest.raises(AssertionError, match=r"grad\[\d\]: relative error"):
        compare(chain, *args, torch.float32)


# --------------------------------------------------------------------------- the tiny Wan model
def _wan_fused_vs_unfused(monkeypatch, kind="t2v"):
    """Velocity, tangent and every parameter gradient of the tiny Wan DiT, fused (interpreter) vs unfused,
    float32, same weights (biases drawn at random, not zero): (err_v, err_t, {name: err}, names of the
    kernels that were handed a bias)."""
    from megatron_rcm.ops.elementwise import _kernels
    from tests.wan_helpers import make_inputs, make_ours, rel_err

    with_bias = []
    for name in ("gelu", "gate", "rms_norm"):  # spies: the bias is these kernels' last positional argument
        kernel = _kernels()[name]
        spy = lambda *a, _k=kernel, _n=name: (a[-1] is not None and with_bias.append(_n)) or _k(*a)  # noqa: E731
        monkeypatch.setitem(_kernels(), name, spy)
    inp = make_inputs(kind, batch=2, frames=2, size=8)  # B = 2: the gate's per-sample partials
    res = {}
    for fused in (False, True):
        m = make_ours(kind, seed=3, fused_elementwise=fused)
        v, t_v = m.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"], inp["clip"])
        (v * t_v.detach()).mean().backward()
        res[fused] = (v.detach(), t_v, {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert res[True][2].keys() == res[False][2].keys()
    errs = {n: rel_err(res[True][2][n], res[False][2][n]) for n in res[False][2]}
    return rel_err(res[True][0], res[False][0]), rel_err(res[True][1], res[False][1]), errs, set(with_bias)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_wan_model_fused_biases_match_unfused(monkeypatch, kind):
    err_v, err_t, errs, fused = _wan_fused_vs_unfused(monkeypatch, kind)
    bias_errs = {n: e for n, e in errs.items() if n.endswith("bias") and "blocks." in n}
    for layer in ("linear_q", "linear_k", "linear_proj", "linear_fc1", "linear_fc2"):
        assert any(f"{layer}.bias" in n for n in bias_errs), layer  # every fused bias has a gradient
    worst = max(errs, key=errs.get)
    print(f"fused vs unfused: v {err_v:.2e}, t_v {err_t:.2e}, worst grad {worst} {errs[worst]:.2e}, "
          f"worst bias grad {max(bias_errs.values()):.2e}")
    assert err_v <= 1e-5 and err_t <= 1e-5  # float32 both ways, measured ~1e-7
    assert errs[worst] <= 1e-4, (worst, errs[worst])
    assert fused == {"gelu", "gate", "rms_norm"}  # the kernels did take the biases


def test_wan_model_with_a_dropped_bias_gradient_fails(monkeypatch):
    from megatron_rcm.kernels.elementwise_gate import GatedResidualJVPFunction

    _drop_bias_grad(monkeypatch, GatedResidualJVPFunction)
    _, _, errs, _ = _wan_fused_vs_unfused(monkeypatch)
    bad = {n for n, e in errs.items() if e > 1e-4}
    assert bad and all(n.endswith(("linear_proj.bias", "linear_fc2.bias")) for n in bad), bad


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-m", "not gpu"])
