"""Parity of the Triton attention JVP (rcm_math.md section 9) with float64 torch.func.jvp.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py before triton is imported)
with 16 x 16 tiles, so the small lengths below (37, 19: not multiples of 16) cover full tiles,
masked query rows and masked key tails. Errors are ||out - ref|| / ||ref||; each tolerance has the
error measured when it was set next to it.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rcm.kernels import attention_jvp as attention_jvp_module
from megatron_rcm.kernels.attention_jvp import attention_jvp, attention_jvp_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Interpreter tolerances (CPU). Triton's interpreter rounds float32 -> bf16 by truncation, which
# roughly doubles bf16 errors compared with the GPU's round-to-nearest.
TOL_CPU = {
    torch.float32: 1e-5,  # measured 1.3e-7 .. 2.1e-7 (o, t_o, lse, t_lse, grads)
    torch.float16: 2e-3,  # measured 2.5e-4 .. 3.3e-4
    torch.bfloat16: 2e-2,  # measured 4.7e-3 .. 6.4e-3
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    print(f"{name}: relative error {err:.2e} (tolerance {tol:.0e})")  # pytest -s shows the measurements
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.permute(1, 2, 0, 3) if layout == "sbhd" else x.permute(0, 2, 1, 3)


def make_inputs(layout, b, h, sq, skv, dqk, dv, dtype, fast=False, q_scale=1.0, device=DEVICE):
    shape = (lambda s, d: (s, b, h, d)) if layout == "sbhd" else (lambda s, d: (b, s, h, d))
    q = (torch.randn(shape(sq, dqk), device=device) * q_scale).to(dtype)
    k = torch.randn(shape(skv, dqk), device=device, dtype=dtype)
    v = torch.randn(shape(skv, dv), device=device, dtype=dtype)
    t_q = torch.randn_like(q)
    t_k = None if fast else torch.randn_like(k)
    t_v = None if fast else torch.randn_like(v)
    return q, k, v, t_q, t_k, t_v


def reference(q, k, v, t_q, t_k, t_v, layout, scale=None):
    """float64 torch.func.jvp of (softmax(Q K^T * scale) V, logsumexp(Q K^T * scale)), [B, H, S, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    def attn(q, k, v):
        s = q @ k.transpose(-1, -2) * scale
        return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)

    primals = tuple(to_bhsd(x, layout).double() for x in (q, k, v))
    tangents = (
        to_bhsd(t_q, layout).double(),
        torch.zeros_like(primals[1]) if t_k is None else to_bhsd(t_k, layout).double(),
        torch.zeros_like(primals[2]) if t_v is None else to_bhsd(t_v, layout).double(),
    )
    (o, lse), (t_o, t_lse) = torch.func.jvp(attn, primals, tangents)
    return o, t_o, lse, t_lse


def check_forward(fn, inputs, layout, tol, scale=None):
    o, t_o, lse, t_lse = fn(*inputs, softmax_scale=scale, layout=layout, return_lse=True)
    r_o, r_t_o, r_lse, r_t_lse = reference(*inputs, layout, scale)
    assert o.shape == t_o.shape == inputs[0].shape[:3] + (inputs[2].shape[3],)
    assert o.dtype == t_o.dtype == inputs[0].dtype and lse.dtype == t_lse.dtype == torch.float32
    assert not t_o.requires_grad and not t_lse.requires_grad
    assert_close("o", to_bhsd(o, layout), r_o, tol)
    assert_close("t_o", to_bhsd(t_o, layout), r_t_o, tol)
    assert_close("lse", lse, r_lse, tol)
    assert_close("t_lse", t_lse, r_t_lse, tol)
    return t_o, r_t_o


@pytest.mark.parametrize("layout", ["sbhd", "bshd"])
@pytest.mark.parametrize("fast", [False, True], ids=["tangent_kv", "zero_tangent_kv"])
def test_forward_float32(layout, fast):
    # Sq=37, Skv=19: neither a multiple of the 16-wide tiles; Dqk=32 != Dv=24 (Dv padded to 32).
    inputs = make_inputs(layout, 2, 2, 37, 19, 32, 24, torch.float32, fast=fast)
    check_forward(attention_jvp, inputs, layout, TOL_CPU[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_16bit(dtype):
    inputs = make_inputs("sbhd", 1, 2, 37, 19, 64, 64, dtype)
    check_forward(attention_jvp, inputs, "sbhd", TOL_CPU[dtype])


def test_forward_head_dim_128_and_scale():
    inputs = make_inputs("bshd", 1, 1, 21, 40, 128, 128, torch.float32, fast=True)
    check_forward(attention_jvp, inputs, "bshd", TOL_CPU[torch.float32], scale=0.3)


def test_large_magnitude_rows_stay_finite():
    # q * 30: scores ~ +-100s, softmax rows nearly one-hot; the log2-domain online softmax must
    # neither overflow nor lose the tangent.
    inputs = make_inputs("sbhd", 1, 2, 37, 19, 32, 32, torch.float32, q_scale=30.0)
    check_forward(attention_jvp, inputs, "sbhd", TOL_CPU[torch.float32])  # measured 2e-7


def test_keys_with_a_large_mean():
    # K offset by 3 standard deviations puts a large common term dQ . mean(K) into every dS of a
    # row; the kernel's centering (dS - c) must leave o, t_o and t_lse exact.
    q, k, v, t_q, t_k, t_v = make_inputs("sbhd", 1, 2, 37, 50, 32, 32, torch.float32)
    check_forward(attention_jvp, (q, k + 3.0, v, t_q, t_k, t_v), "sbhd", TOL_CPU[torch.float32])


def test_strided_inputs_read_in_place():
    # q, k, v as views of one fused projection [S, B, H, 3 D]: non-contiguous, no copies made.
    s, b, h, d = 23, 2, 2, 32
    qkv = torch.randn(s, b, h, 3 * d, device=DEVICE)
    q, k, v = qkv.split(d, dim=-1)
    t_q, t_k, t_v = torch.randn(s, b, h, 3 * d, device=DEVICE).split(d, dim=-1)
    assert not q.is_contiguous()
    check_forward(attention_jvp, (q, k, v, t_q, t_k, t_v), "sbhd", TOL_CPU[torch.float32])


def test_dropping_the_b_term_is_caught():
    # The check must be able to fail: a tangent without B~ = sum_j P~_j dS_j v_j (so without the
    # dS contribution, only A~/l - dLSE * O) is far outside the tolerance the kernel meets.
    layout = "sbhd"
    inputs = make_inputs(layout, 1, 2, 37, 19, 32, 32, torch.float32)
    t_o, r_t_o = check_forward(attention_jvp, inputs, layout, TOL_CPU[torch.float32])
    q, k, v, t_q, t_k, t_v = (to_bhsd(x, layout).double() for x in inputs)
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    d_s = (t_q @ k.transpose(-1, -2) + q @ t_k.transpose(-1, -2)) * scale
    b_term = (p * d_s) @ v
    with pytest.raises(AssertionError, match="relative error"):
        assert_close("t_o without B~", to_bhsd(t_o, layout) - b_term, r_t_o, TOL_CPU[torch.float32])
    # measured: the kernel's t_o is 1.4e-7 from the reference; without B~ it is ~1 away
    assert rel_err(to_bhsd(t_o, layout) - b_term, r_t_o) > 0.1


@pytest.mark.parametrize("layout", ["sbhd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward(layout, dtype):
    b, h, sq, skv, dqk, dv = 2, 2, 37, 19, 32, 16
    q, k, v, t_q, t_k, t_v = make_inputs(layout, b, h, sq, skv, dqk, dv, dtype)
    for x in (q, k, v):
        x.requires_grad_(True)
    g_o = torch.randn(q.shape[:3] + (dv,), device=DEVICE, dtype=dtype)
    g_lse = torch.randn(b, h, sq, device=DEVICE)
    o, t_o, lse, _ = attention_jvp(q, k, v, t_q, t_k, t_v, layout=layout, return_lse=True)
    grads = torch.autograd.grad((o.float() * g_o.float()).sum() + (lse * g_lse).sum(), (q, k, v))

    q64, k64, v64 = (to_bhsd(x, layout).detach().double().requires_grad_(True) for x in (q, k, v))
    s = q64 @ k64.transpose(-1, -2) / math.sqrt(dqk)
    loss = (torch.softmax(s, -1) @ v64 * to_bhsd(g_o, layout).double()).sum()
    loss = loss + (torch.logsumexp(s, -1) * g_lse.double()).sum()
    refs = torch.autograd.grad(loss, (q64, k64, v64))
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, refs):
        # measured: float32 1.9e-7 .. 2.0e-7, bf16 6.1e-3 .. 6.3e-3
        assert_close(name, to_bhsd(grad, layout), ref, TOL_CPU[dtype])


def test_backward_zero_tangent_path_and_o_only():
    q, k, v, t_q, _, _ = make_inputs("sbhd", 1, 2, 37, 19, 32, 32, torch.float32, fast=True)
    for x in (q, k, v):
        x.requires_grad_(True)
    o, t_o = attention_jvp(q, k, v, t_q)
    assert o.requires_grad and not t_o.requires_grad
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    o_ref, _ = attention_jvp_torch(q, k, v, t_q)
    refs = torch.autograd.grad(o_ref.sum(), (q, k, v))
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, refs):
        assert_close(name, grad, ref, TOL_CPU[torch.float32])  # measured ~2e-7


@pytest.mark.parametrize("fast", [False, True])
def test_torch_reference_path(fast):
    inputs = make_inputs("bshd", 2, 2, 37, 19, 32, 24, torch.float32, fast=fast)
    check_forward(attention_jvp_torch, inputs, "bshd", 1e-6)  # measured ~1e-7 (float32 matmuls)


def test_input_validation():
    q, k, v, t_q, t_k, t_v = make_inputs("sbhd", 1, 2, 8, 8, 32, 32, torch.float32)
    with pytest.raises(ValueError, match="both None"):
        attention_jvp(q, k, v, t_q, None, t_v)
    with pytest.raises(ValueError, match="layout"):
        attention_jvp(q, k, v, t_q, t_k, t_v, layout="bhsd")
    with pytest.raises(ValueError, match="shapes do not match"):
        attention_jvp(q, k[..., :16], v, t_q, t_k, t_v)
    with pytest.raises(ValueError, match="dtype"):
        attention_jvp(q, k.half(), v, t_q, t_k, t_v)
    with pytest.raises(ValueError, match="t_q has shape"):
        attention_jvp(q, k, v, t_q[:4], t_k, t_v)
    with pytest.raises(ValueError, match="4-D"):
        attention_jvp(q[0], k, v, t_q, t_k, t_v)
    with pytest.raises(ValueError, match="softmax_scale"):
        attention_jvp(q, k, v, t_q, t_k, t_v, softmax_scale=-1.0)


def test_forward_choice_is_checked():
    q, k, v, t_q, t_k, t_v = make_inputs("sbhd", 1, 2, 8, 8, 32, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="forward must be"):
        attention_jvp(q, k, v, t_q, t_k, t_v, forward="gluon")
    with pytest.raises(ValueError, match="Hopper kernel does not apply"):  # CPU / interpreter
        attention_jvp(q, k, v, t_q, t_k, t_v, forward="sm90")


def test_sm90_plan_2d_views():
    """The Hopper kernel's (row, column) view of each layout, and the strides it must refuse."""
    from megatron_rcm.kernels.attention_jvp_fwd_sm90 import plan_2d

    s, b, h, d = 100, 2, 3, 64
    x = torch.empty(s, b, h, d, dtype=torch.bfloat16)  # sbhd: row = s, column = b*H*D + h*D
    assert plan_2d(x, (h * d, d, b * h * d, 1), b, h, s, d) == (0, h * d, d, s, b * h * d)
    y = torch.empty(b, s, h, d, dtype=torch.bfloat16)  # bshd: row = b*S + s, column = h*D
    assert plan_2d(y, (s * h * d, d, h * d, 1), b, h, s, d) == (s, 0, d, b * s, h * d)
    fused = torch.empty(s, b, h, 3 * d, dtype=torch.bfloat16)[..., :d]  # q slice of a fused projection
    assert plan_2d(fused, (h * 3 * d, 3 * d, b * h * 3 * d, 1), b, h, s, d) == (0, h * 3 * d, 3 * d, s, (b * h - 1) * 3 * d + d)
    assert plan_2d(x, (h * d, d, b * h * d, 2), b, h, s, d) is None  # feature stride != 1
    assert plan_2d(x.float(), (h * d, d, b * h * d, 1), b, h, s, d) is None  # 4-byte elements
    bhsd = torch.empty(b, h, s, d, dtype=torch.bfloat16)  # heads outside the sequence: no 2-D view
    assert plan_2d(bhsd, (h * s * d, s * d, d, 1), b, h, s, d) is None


def test_backward_choice_is_checked():
    q, k, v, t_q, t_k, t_v = make_inputs("sbhd", 1, 2, 8, 8, 32, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="backward must be"):
        attention_jvp(q, k, v, t_q, t_k, t_v, backward="flash")
    q.requires_grad_(True)
    o, _ = attention_jvp(q, k, v, t_q, t_k, t_v, backward="cudnn")
    with pytest.raises(ValueError, match="cuDNN's attention backward does not apply"):  # CPU / interpreter
        o.sum().backward()


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(attention_jvp_module, "INTERPRET", False)
    q, k, v, t_q, t_k, t_v = make_inputs("sbhd", 1, 1, 8, 8, 16, 16, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="CUDA tensors"):
        attention_jvp(q, k, v, t_q, t_k, t_v)


# --------------------------------------------------------------------------- GPU, real sizes
# H100, round-to-nearest, sizes ~4k (errors measured 2026-11-22, tools: pytest -m gpu -s):
TOL_GPU = {
    torch.bfloat16: 1e-2,  # measured o 2.2e-3 .. 2.3e-3, t_o 2.0e-3 .. 2.3e-3, grads 2.4e-3, lse 1e-7
    torch.float16: 2e-3,  # measured o 2.8e-4, t_o 2.9e-4
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "layout,sq,skv,dqk,dv,fast,dtype",
    [
        ("sbhd", 4099, 4099, 128, 128, False, torch.bfloat16),
        ("bshd", 4099, 4099, 128, 128, False, torch.bfloat16),
        ("sbhd", 4099, 509, 128, 128, True, torch.bfloat16),
        ("sbhd", 2053, 1030, 64, 64, False, torch.float16),
        ("sbhd", 1500, 700, 128, 64, False, torch.bfloat16),
    ],
)
def test_gpu_forward(layout, sq, skv, dqk, dv, fast, dtype):
    inputs = make_inputs(layout, 1, 2, sq, skv, dqk, dv, dtype, fast=fast)
    check_forward(attention_jvp, inputs, layout, TOL_GPU[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "layout,b,sq,skv,d,q_scale,fast",
    [
        ("sbhd", 1, 4099, 4099, 128, 1.0, False),
        ("bshd", 2, 1000, 777, 128, 1.0, False),  # batch-major rows, key tail of 9
        ("sbhd", 2, 300, 64, 64, 1.0, False),  # one key tile
        ("sbhd", 1, 64, 30, 128, 1.0, False),  # one partial key tile
        ("sbhd", 1, 4099, 4099, 128, 30.0, False),  # peaky rows: the centring must hold
        ("sbhd", 1, 4099, 509, 128, 1.0, True),  # dK = dV = 0 (cross-attention to text)
        ("bshd", 2, 333, 129, 64, 1.0, True),
    ],
)
def test_gpu_forward_sm90(layout, b, sq, skv, d, q_scale, fast):
    """The Gluon Hopper kernel against float64 torch.func.jvp and against the Triton kernel."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel targets sm_90")
    inputs = make_inputs(layout, b, 2, sq, skv, d, d, torch.bfloat16, fast=fast, q_scale=q_scale)
    sm90 = lambda *a, **kw: attention_jvp(*a, **kw, forward="sm90")
    check_forward(sm90, inputs, layout, TOL_GPU[torch.bfloat16])  # measured 2.0e-3 .. 2.3e-3 (H200)
    ours = attention_jvp(*inputs, layout=layout, return_lse=True, forward="sm90")
    triton_ = attention_jvp(*inputs, layout=layout, return_lse=True, forward="triton")
    for name, a, r in zip(("o", "t_o", "lse", "t_lse"), ours, triton_):
        # same math: bit-identical when the autotuner gives the Triton kernel the same 64-key tiles, else two
        # independent bf16 roundings (measured 1.2e-3 .. 2.5e-3 for o, t_o on an H200, 2026-11-30)
        assert_close(f"{name} vs Triton kernel", a, r, TOL_GPU[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_forward_sm90_fused_projection_slices():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel targets sm_90")
    qkv = torch.randn(2000, 2, 4, 3 * 128, device="cuda").bfloat16()
    t_qkv = torch.randn_like(qkv)
    inputs = (*qkv.split(128, -1), *t_qkv.split(128, -1))
    sm90 = lambda *a, **kw: attention_jvp(*a, **kw, forward="sm90")
    check_forward(sm90, inputs, "sbhd", TOL_GPU[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_head_dim_256():
    inputs = make_inputs("sbhd", 1, 2, 1000, 777, 256, 256, torch.bfloat16)
    check_forward(attention_jvp, inputs, "sbhd", TOL_GPU[torch.bfloat16])
    q, k, v = (x.detach().requires_grad_(True) for x in inputs[:3])
    o, _ = attention_jvp(q, k, v, *inputs[3:])
    g_o = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), g_o)
    q64, k64, v64 = (to_bhsd(x, "sbhd").detach().double().requires_grad_(True) for x in (q, k, v))
    o64 = torch.softmax(q64 @ k64.transpose(-1, -2) / 16.0, -1) @ v64
    refs = torch.autograd.grad(o64, (q64, k64, v64), to_bhsd(g_o, "sbhd").double())
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, refs):
        assert_close(name, to_bhsd(grad, "sbhd"), ref, TOL_GPU[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("q_scale,k_mean", [(30.0, 0.0), (1.0, 3.0)], ids=["q_times_30", "key_mean_3"])
def test_gpu_hard_rows_keep_the_tangent_error(q_scale, k_mean):
    # Large logits (one key dominates a row) or a large key mean (a common part dQ . mean(K) in
    # every dS) make B~/l and dLSE * O large and nearly equal; formed naively, the bf16 rounding
    # of H~ = P~ dS survives their difference (10x / 4x the plain error in an emulation). The
    # kernel centres dS on the running dLSE, so the error must stay near the plain level.
    plain = make_inputs("sbhd", 1, 2, 4099, 4099, 128, 128, torch.bfloat16)
    q, k, v, t_q, t_k, t_v = plain
    hard = ((q.float() * q_scale).to(q.dtype), (k.float() + k_mean).to(k.dtype), v, t_q, t_k, t_v)
    errs = []
    for inputs in (plain, hard):
        t_o, r_t_o = check_forward(attention_jvp, inputs, "sbhd", TOL_GPU[torch.bfloat16])
        errs.append(rel_err(to_bhsd(t_o, "sbhd"), r_t_o))
    print("t_o error plain / hard:", errs)
    assert errs[1] < 1.5 * errs[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout,sq,skv,d", [("sbhd", 4099, 4099, 128), ("bshd", 4099, 4099, 128),
                                              ("sbhd", 3001, 517, 64)])
@pytest.mark.parametrize("impl", ["triton", "cudnn"])
def test_gpu_backward(layout, sq, skv, d, impl):
    if impl == "cudnn" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the cuDNN backward path is taken on Hopper and newer")
    q, k, v, t_q, t_k, t_v = make_inputs(layout, 1, 2, sq, skv, d, d, torch.bfloat16)
    for x in (q, k, v):
        x.requires_grad_(True)
    g_o = torch.randn_like(q)
    o, _ = attention_jvp(q, k, v, t_q, t_k, t_v, layout=layout, backward=impl)
    grads = torch.autograd.grad(o, (q, k, v), g_o)
    q64, k64, v64 = (to_bhsd(x, layout).detach().double().requires_grad_(True) for x in (q, k, v))
    o64 = torch.softmax(q64 @ k64.transpose(-1, -2) / math.sqrt(d), -1) @ v64
    refs = torch.autograd.grad(o64, (q64, k64, v64), to_bhsd(g_o, layout).double())
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, refs):
        assert_close(name, to_bhsd(grad, layout), ref, TOL_GPU[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cudnn_backward_reads_our_lse():
    """The cuDNN path rebuilds P from the LSE it is given: a shifted LSE must move the gradients (so the
    path really reuses ours), and the true LSE must match cuDNN's own forward statistics."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the cuDNN backward path is taken on Hopper and newer")
    from megatron_rcm.kernels.attention_bwd_cudnn import cudnn_attn_bwd

    q, k, v, t_q, t_k, t_v = make_inputs("sbhd", 1, 2, 1000, 1000, 128, 128, torch.bfloat16)
    o, _, lse, _ = attention_jvp(q, k, v, t_q, t_k, t_v, return_lse=True)
    _, lse_cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention(
        *(to_bhsd(x, "sbhd") for x in (q, k, v)), None, True)[:2]
    assert_close("lse vs cuDNN's statistics", lse, lse_cudnn.squeeze(-1), 1e-5)  # natural log, same shape
    dims = attention_jvp_module.check_inputs(q, k, v, t_q, t_k, t_v, None, "sbhd")
    g_o = torch.randn_like(o)
    grads = cudnn_attn_bwd(q, k, v, o, g_o, lse, dims, "sbhd")
    shifted = cudnn_attn_bwd(q, k, v, o, g_o, lse + 1.0, dims, "sbhd")  # P scaled by 1/e
    for name, a, b in zip(("dq", "dk", "dv"), grads, shifted):
        assert rel_err(b, a) > 0.1, f"{name}: the LSE passed in did not change the gradient"
