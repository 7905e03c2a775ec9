"""Attention without a tangent on CUDA (``ops/attention._sdpa``) with cuDNN's kernel tried first: the same
numbers as FlashAttention-2 within bf16 rounding against a float64 reference, forward and gradients, for
contiguous inputs and for the strided views the Ulysses all-to-all hands over; and cuDNN's kernel is the one
that ran (otherwise the preference would be silently ignored)."""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.ops import attention

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a GPU", allow_module_level=True)


def _ref(q, k, v):
    q, k, v = (x.double().permute(1, 2, 0, 3) for x in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (p @ v).permute(2, 0, 1, 3)


def _errs(pref, q, k, v, g):
    attention.set_sdpa_preference(pref)
    try:
        qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
        o = attention._sdpa(qq, kk, vv, None)
        o.backward(g)
    finally:
        attention.set_sdpa_preference("cudnn")
    qr, kr, vr = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = _ref(qr, kr, vr)
    ref.backward(g.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    return {"o": rel(o, ref), "dq": rel(qq.grad, qr.grad), "dk": rel(kk.grad, kr.grad), "dv": rel(vv.grad, vr.grad)}


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "ulysses-view"])
def test_cudnn_first_matches_flash_and_float64(strided):
    S, B, N, d = 2049, 2, 4, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    if strided:  # [S, X, B, N, d] receive buffer, parts read in place (parallel/cp_attention._seq_to_heads)
        buf = torch.randn(S, 3, B, N, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        q, k, v = buf[:, 0], buf[:, 1], buf[:, 2]
    else:
        q, k, v = (torch.randn(S, B, N, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    g = torch.randn(S, B, N, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    cudnn, flash = _errs("cudnn", q, k, v, g), _errs("flash", q, k, v, g)
    print(f"{'strided' if strided else 'contiguous'}: cudnn {cudnn}, flash {flash}")
    for key in cudnn:
        assert cudnn[key] < 2 * flash[key] + 2e-3, (key, cudnn, flash)


def test_cudnn_kernel_is_the_one_that_runs():
    from torch.profiler import ProfilerActivity, profile

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuDNN's fused attention is preferred on Hopper and newer")
    q, k, v = (torch.randn(1024, 1, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    names = {}
    for pref in attention.SDPA_PREFERENCES:
        attention.set_sdpa_preference(pref)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            attention._sdpa(q, k, v, None)
            torch.cuda.synchronize()
        names[pref] = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    attention.set_sdpa_preference("cudnn")
    print({p: [n[:60] for n in ns] for p, ns in names.items()})
    assert any("cudnn" in n.lower() or "sdpa" in n.lower() for n in names["cudnn"]), names["cudnn"]
    assert any("flash" in n.lower() for n in names["flash"]), names["flash"]
