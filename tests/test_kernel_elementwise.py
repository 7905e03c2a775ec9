"""Parity of the fused primal+tangent elementwise kernels (``kernels/elementwise_*.py``) with the unfused
reference (``ops/elementwise.TorchElementwise``: the ``models/jvp.py`` rules the block ran before): primal,
tangent (also with None tangents) and the primal's gradients.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py) on tiny shapes with D = 48 (not a power of
two: masked columns) and s = 5 tokens. Errors are ||out - ref|| / ||ref||. The interpreter rounds float32 ->
bf16 by truncation; bf16 outputs of both paths are single roundings of float32 values that differ by a few
ulps of float32, so they differ by at most one bf16 ulp (relative ~4e-3 per element, ~1e-3 in norm).
GPU tests at real sizes: ``pytest -m gpu -s tests/test_kernel_elementwise.py``.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.ops.elementwise import FusedElementwise, TorchElementwise, elementwise_ops
from megatron_rcm.parallel.state import initialize_parallel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: 1e-5,  # measured <= 3e-7 (float32 math in both paths, different summation order)
    torch.bfloat16: 1e-2,  # measured <= 4e-3 (one bf16 rounding apart; grads of scale/gate sum over s)
}
REF, FUSED = TorchElementwise(), FusedElementwise(always=True)


@pytest.fixture(scope="module", autouse=True)
def _tp1():
    initialize_parallel(tensor_parallel=1)  # the q/k RMSNorm asks for the TP group size


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check(name, out, ref, tol):
    if ref is None:
        assert out is None, f"{name}: expected None"
        return
    assert out is not None, f"{name}: got None"
    assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, ref.shape, out.dtype, ref.dtype)
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    print(f"{name}: relative error {err:.2e} (tolerance {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def leaf(*shape, dtype=torch.float32, scale=1.0, offset=0.0):
    return (torch.randn(*shape, device=DEVICE) * scale + offset).to(dtype).requires_grad_(True)


def compare(method, args, grad_args, dtype, tol=None):
    """Run ``method`` of both implementations on clones of ``args``; compare outputs, tangents and the
    gradients (w.r.t. the positions ``grad_args``) of sum(out * g) for a random g."""
    tol = TOL[dtype] if tol is None else tol
    outs = {}
    for impl in (REF, FUSED):
        a = [x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x for x in args]
        res = getattr(impl, method)(*a)
        primals = [r for r in res if r is not None and r.requires_grad]
        tangents = [r for r in res if r is not None and not r.requires_grad]
        torch.manual_seed(1)
        gs = [torch.randn_like(p) for p in primals]
        grads = torch.autograd.grad(primals, [a[i] for i in grad_args], gs)
        outs[impl.fused] = (res, primals, tangents, grads)
    (r_res, *_), (f_res, *_) = outs[False], outs[True]
    for i, (f, r) in enumerate(zip(f_res, r_res)):
        check(f"{method} out[{i}]", f, r, tol)
    for i, (f, r) in zip(grad_args, zip(outs[True][3], outs[False][3])):
        check(f"{method} grad[{i}]", f, r, tol)


S, B, D = 5, 2, 48


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tangents", ["all", "x_only", "mod_only", "none"])
def test_modulated_layer_norm(dtype, tangents):
    x = leaf(S, B, D, dtype=dtype, scale=2.0, offset=0.5)
    t_x = torch.randn(S, B, D, device=DEVICE).to(dtype) if tangents in ("all", "x_only") else None
    shift, scale = leaf(B, D), leaf(B, D, scale=0.3)
    with_mod = tangents in ("all", "mod_only")
    t_shift = torch.randn(B, D, device=DEVICE) if with_mod else None
    t_scale = torch.randn(B, D, device=DEVICE) if with_mod else None
    compare("modulated_layer_norm", (x, t_x, 1e-6, shift, t_shift, scale, t_scale), (0, 3, 5), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_tangent", [True, False])
def test_affine_layer_norm(dtype, with_tangent):
    x = leaf(S, B, D, dtype=dtype)
    t_x = torch.randn(S, B, D, device=DEVICE).to(dtype) if with_tangent else None
    w, b = leaf(D, dtype=dtype, offset=1.0), leaf(D, dtype=dtype)
    compare("affine_layer_norm", (x, t_x, 1e-6, w, b), (0, 3, 4), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tangents", ["all", "no_gate", "gate_only", "none"])
def test_gated_residual(dtype, tangents):
    x, y, gate = leaf(S, B, D, dtype=dtype), leaf(S, B, D, dtype=dtype), leaf(B, D)
    t = lambda *shape: torch.randn(*shape, device=DEVICE)
    t_x = t(S, B, D).to(dtype) if tangents in ("all", "no_gate") else None
    t_y = t(S, B, D).to(dtype) if tangents in ("all", "no_gate") else None
    t_gate = t(B, D) if tangents in ("all", "gate_only") else None
    compare("gated_residual", (x, t_x, y, t_y, gate, t_gate), (0, 2, 4), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_tangent", [True, False])
def test_rope(dtype, with_tangent):
    from megatron_rcm.models.wan.rope import rope_cos_sin

    grid, d, N = (1, 2, 3), 12, 3  # S = 6 tokens, the (4, 4, 4) split of d = 12
    cos, sin = rope_cos_sin(grid, (4, 4, 4), 10000.0, DEVICE, torch.float32)
    q, k = leaf(6, B, N, d, dtype=dtype), leaf(6, B, N, d, dtype=dtype)
    t_q = torch.randn(6, B, N, d, device=DEVICE).to(dtype) if with_tangent else None
    t_k = torch.randn(6, B, N, d, device=DEVICE).to(dtype) if with_tangent else None
    compare("rope", (q, k, t_q, t_k, cos, sin), (0, 1), dtype)


def test_rope_rows_over_several_programs():
    """370 rows of d = 16 (S = 37 tokens, B = 2, N = 5): two row tiles, the second partial, tokens split across
    tiles and heads of one token in both."""
    from megatron_rcm.models.wan.rope import rope_cos_sin

    cos, sin = rope_cos_sin((1, 37, 1), (8, 4, 4), 10000.0, DEVICE, torch.float32)
    q, k = leaf(37, 2, 5, 16, dtype=torch.bfloat16), leaf(37, 2, 5, 16, dtype=torch.bfloat16)
    t_q, t_k = (torch.randn(37, 2, 5, 16, device=DEVICE).bfloat16() for _ in range(2))
    compare("rope", (q, k, t_q, t_k, cos, sin), (0, 1), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_tangent", [True, False])
def test_rms_norm(dtype, with_tangent):
    x = leaf(S, B, D, dtype=dtype, scale=3.0)
    t_x = torch.randn(S, B, D, device=DEVICE).to(dtype) if with_tangent else None
    w = leaf(D, dtype=dtype, offset=1.0)
    compare("rms_norm", (x, t_x, w, 1e-6, D), (0, 2), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_tangent", [True, False])
def test_gelu_tanh(dtype, with_tangent):
    x = leaf(S, B, 3 * D, dtype=dtype, scale=4.0)  # |x| up to ~15: both tanh saturations
    t_x = torch.randn(S, B, 3 * D, device=DEVICE).to(dtype) if with_tangent else None
    compare("gelu_tanh", (x, t_x), (0,), dtype)


def _tp_rms_worker(rank, world, x, t_x, w, g):
    """This rank's head shard through the fused RMSNorm (statistics all-reduced over gloo)."""
    initialize_parallel(tensor_parallel=world)
    n = x.shape[-1] // world
    cols = slice(rank * n, (rank + 1) * n)
    xs, ws = (t[..., cols].clone().requires_grad_(True) for t in (x, w))
    y, t_y = FUSED.rms_norm(xs, t_x[..., cols].contiguous(), ws, 1e-6, x.shape[-1])
    dx, dw = torch.autograd.grad(y, (xs, ws), g[..., cols])
    from megatron_rcm.parallel.state import destroy_parallel

    destroy_parallel()
    return y.detach(), t_y, dx, dw


def test_rms_norm_tp2_matches_the_full_row():
    """Under TP the q/k norm is over the full hidden size: rank 0's shard of the fused result (stats and the
    backward's row sum all-reduced) equals the first half of the unsharded reference's."""
    from tests.dist_helpers import spawn

    x, t_x, g = torch.randn(S, B, D) * 3, torch.randn(S, B, D), torch.randn(S, B, D)
    w = 1 + 0.2 * torch.randn(D)
    y, t_y, dx, dw = spawn(_tp_rms_worker, 2, x, t_x, w, g)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y_ref, t_ref = REF.rms_norm(xr, t_x, wr, 1e-6, D)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (xr, wr), g)
    half = slice(0, D // 2)
    for name, out, ref in (("y", y, y_ref), ("t_y", t_y, t_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        check(f"TP=2 rms_norm {name}", out, ref[..., half], TOL[torch.float32])  # measured <= 2e-7


def test_the_comparison_catches_a_dropped_tangent_term():
    # The check must be able to fail: the modulated LN tangent without x_hat * t_scale is far off.
    x, shift, scale = leaf(S, B, D), leaf(B, D), leaf(B, D)
    t_x, t_shift, t_scale = torch.randn(S, B, D), torch.randn(B, D), torch.randn(B, D)
    _, t_ref = REF.modulated_layer_norm(x, t_x, 1e-6, shift, t_shift, scale, t_scale)
    _, t_wrong = FUSED.modulated_layer_norm(x, t_x, 1e-6, shift, t_shift, scale, None)
    with pytest.raises(AssertionError, match="relative error"):
        check("t_y without x_hat * t_scale", t_wrong, t_ref, TOL[torch.float32])


def test_selection():
    assert type(elementwise_ops(False)) is TorchElementwise
    assert type(elementwise_ops("true")) is FusedElementwise
    auto = elementwise_ops("auto")
    cpu16 = torch.zeros(2, dtype=torch.bfloat16)
    assert not auto._applies(cpu16)  # auto: CPU tensors stay on the reference path
    assert not auto._applies(torch.zeros(2, dtype=torch.float32, device=DEVICE))
    with pytest.raises(ValueError, match="fused_elementwise"):
        elementwise_ops("sometimes")


def test_bad_shapes_are_refused():
    from megatron_rcm.kernels.elementwise_layer_norm import layer_norm_jvp_fused
    from megatron_rcm.kernels.elementwise_rope import rope_jvp_fused

    x = torch.randn(S, B, D)
    with pytest.raises(ValueError, match=r"scale/shift \[B, D\]"):
        layer_norm_jvp_fused(x, None, 1e-6, scale_BD=torch.randn(B + 1, D), shift_BD=torch.randn(B + 1, D))
    with pytest.raises(ValueError, match="t_x has shape"):
        layer_norm_jvp_fused(x, x[:2], 1e-6)
    q = torch.randn(6, 1, 2, 12)
    with pytest.raises(ValueError, match="angles"):
        rope_jvp_fused(q, q, None, None, torch.randn(5, 6), torch.randn(5, 6))
    with pytest.raises(ValueError, match="both be given"):
        rope_jvp_fused(q, q, q, None, torch.randn(6, 6), torch.randn(6, 6))


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    from megatron_rcm.kernels import elementwise_common

    monkeypatch.setattr(elementwise_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        FUSED.gelu_tanh(torch.randn(4, device="cpu"), None)


def test_wan_model_fused_matches_unfused_float32():
    """The tiny Wan DiT (2 blocks) with every chain through the kernels (interpreter) against the unfused
    model from the same weights, float32: velocity, tangent and all parameter gradients."""
    from tests.wan_helpers import make_inputs, make_ours, rel_err

    inp = make_inputs("t2v", batch=1, frames=2, size=8)  # 2 * 4 * 4 = 32 tokens
    res = {}
    for fused in (False, True):
        m = make_ours("t2v", seed=3, fused_elementwise=fused)
        v, t_v = m.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"])
        (v * t_v.detach()).mean().backward()
        res[fused] = (v.detach(), t_v, {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert rel_err(res[True][0], res[False][0]) <= 1e-5  # measured ~1e-7
    assert rel_err(res[True][1], res[False][1]) <= 1e-5
    assert res[True][2].keys() == res[False][2].keys()
    errs = {n: rel_err(res[True][2][n], res[False][2][n]) for n in res[False][2]}
    worst = max(errs, key=errs.get)
    print(f"worst gradient {worst}: {errs[worst]:.2e}")
    assert errs[worst] <= 1e-4, (worst, errs[worst])


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-m", "not gpu"])
