"""Fused elementwise kernels on CUDA at real sizes, and a Wan model fused vs unfused (bf16): outputs,
tangents, gradients. Runs on the GPU machine: ``python -m pytest -m gpu -s tests/test_kernel_elementwise_gpu.py``.

Errors are ||out - ref|| / ||ref|| against the unfused PyTorch reference (float32 math, one bf16 rounding
at the end like the kernels), printed for docs/kernels.md. Bounds: one bf16 rounding apart is ~2e-3 in norm
(unit round-off 2^-9 = 2e-3 times ~0.6 for round-to-nearest); reductions of [B, D] parameter gradients over
31k tokens in a different order add a few float32 ulps only.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.parallel.state import initialize_parallel
from tests.test_kernel_elementwise import FUSED, REF, check

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL_BF16 = 1e-2  # single-rounding differences measure ~2e-3 .. 4e-3 in norm; bound ~3x


@pytest.fixture(scope="module", autouse=True)
def _tp1():
    initialize_parallel(tensor_parallel=1)


def _compare(method, args, grad_args, tol=TOL_BF16):
    outs = {}
    for impl in (REF, FUSED):
        a = [x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x for x in args]
        res = getattr(impl, method)(*a)
        primals = [r for r in res if r is not None and r.requires_grad]
        gen = torch.Generator(device="cuda").manual_seed(1)
        gs = [torch.randn(p.shape, device="cuda", generator=gen).to(p.dtype) for p in primals]
        outs[impl.fused] = (res, torch.autograd.grad(primals, [a[i] for i in grad_args], gs))
    for i, (f, r) in enumerate(zip(outs[True][0], outs[False][0])):
        check(f"{method} out[{i}]", f, r, tol)
    for i, f, r in zip(grad_args, outs[True][1], outs[False][1]):
        check(f"{method} grad[{i}]", f, r, tol)


S = 31200
act = lambda *shape: torch.randn(*shape, device="cuda").bfloat16().requires_grad_(True)
vec = lambda *shape, s=1.0: (torch.randn(*shape, device="cuda") * s).requires_grad_(True)
tan = lambda *shape: torch.randn(*shape, device="cuda").bfloat16()


@pytest.mark.parametrize("D", [1536, 5120])
@pytest.mark.parametrize("B", [1, 2])
def test_gpu_modulated_layer_norm(D, B):
    args = (act(S // B, B, D), tan(S // B, B, D), 1e-6, vec(B, D), vec(B, D), vec(B, D, s=0.3), vec(B, D))
    _compare("modulated_layer_norm", args, (0, 3, 5))
    _compare("modulated_layer_norm", (args[0], None, 1e-6, args[3], None, args[5], None), (0, 3, 5))


@pytest.mark.parametrize("D", [1536, 5120])
def test_gpu_affine_layer_norm(D):
    w = (1 + 0.2 * torch.randn(D, device="cuda")).bfloat16().requires_grad_(True)
    _compare("affine_layer_norm", (act(S, 1, D), tan(S, 1, D), 1e-6, w, act(D)), (0, 3, 4))


@pytest.mark.parametrize("D", [1536, 5120])
def test_gpu_gated_residual(D):
    _compare("gated_residual", (act(S, 1, D), tan(S, 1, D), act(S, 1, D), tan(S, 1, D), vec(1, D), vec(1, D)),
             (0, 2, 4))


@pytest.mark.parametrize("N", [12, 40])
def test_gpu_rope(N):
    from megatron_rcm.models.wan.rope import rope_cos_sin

    cos, sin = rope_cos_sin((20, 30, 52), (44, 42, 42), 1e4, "cuda", torch.float32)
    q, k = act(S, 1, N, 128), act(S, 1, N, 128)
    _compare("rope", (q, k, tan(S, 1, N, 128), tan(S, 1, N, 128), cos, sin), (0, 1))


@pytest.mark.parametrize("D", [1536, 5120])
def test_gpu_rms_norm(D):
    w = (1 + 0.2 * torch.randn(D, device="cuda")).bfloat16().requires_grad_(True)
    _compare("rms_norm", (act(S, 1, D), tan(S, 1, D), w, 1e-6, D), (0, 2))


@pytest.mark.parametrize("F", [8960, 13824])
def test_gpu_gelu_tanh(F):
    x = (torch.randn(S, 1, F, device="cuda") * 3).bfloat16().requires_grad_(True)
    _compare("gelu_tanh", (x, tan(S, 1, F)), (0,))


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_gpu_wan_model_fused_matches_unfused(kind):
    """A few Wan layers in bf16, fused_elementwise=true vs false from the same weights: velocity, tangent,
    and every parameter gradient of a loss on the primal of the JVP pass."""
    from tests.wan_helpers import make_inputs, make_ours, rel_err

    models = {f: make_ours(kind, dtype=torch.float32, seed=3, num_layers=3, fused_elementwise=f)
              .to("cuda", torch.bfloat16) for f in (False, True)}
    inp = make_inputs(kind, frames=5, size=16)
    b = {k: (None if v is None else v.to("cuda", torch.bfloat16)) for k, v in inp.items()}
    for k in ("timestep", "t_timestep"):
        b[k] = inp[k].cuda().float()
    res = {}
    for f, m in models.items():
        v, t_v = m.forward_jvp(b["x"], b["t_x"], b["timestep"], b["t_timestep"], b["context"], b["clip"])
        (v.float() * t_v.float().detach()).mean().backward()
        res[f] = (v.detach(), t_v, {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    ev, et = rel_err(res[True][0], res[False][0]), rel_err(res[True][1], res[False][1])
    g_err = {n: rel_err(res[True][2][n], res[False][2][n]) for n in res[False][2]}
    worst = max(g_err, key=g_err.get)
    print(f"{kind} fused vs unfused (max-abs relative): primal {ev:.2e}, tangent {et:.2e}, "
          f"worst grad {worst} {g_err[worst]:.2e}")
    assert res[True][2].keys() == res[False][2].keys()
    assert ev <= 3e-2 and et <= 3e-2  # bf16 blocks compound ~1e-2 (tests/test_wan_gpu.py: 8e-3 .. 1e-2)
    assert g_err[worst] <= 1e-1  # gradients through 3 bf16 blocks; reordered sums of [B, D] params


# --------------------------------------------------------------------------- linear biases fused in
@pytest.mark.parametrize("D", [1536, 5120])
def test_gpu_gated_residual_with_bias(D):
    args = (act(S, 1, D), tan(S, 1, D), act(S, 1, D), tan(S, 1, D), vec(1, D), vec(1, D), act(D))
    _compare("gated_residual", args, (0, 2, 4, 6))


@pytest.mark.parametrize("D", [1536, 5120])
def test_gpu_rms_norm_with_bias(D):
    w = (1 + 0.2 * torch.randn(D, device="cuda")).bfloat16().requires_grad_(True)
    _compare("rms_norm", (act(S, 1, D), tan(S, 1, D), w, 1e-6, D, act(D)), (0, 2, 5))


@pytest.mark.parametrize("F", [8960, 13824])
def test_gpu_gelu_tanh_with_bias(F):
    x = (torch.randn(S, 1, F, device="cuda") * 3).bfloat16().requires_grad_(True)
    _compare("gelu_tanh", (x, tan(S, 1, F), act(F)), (0, 2))
