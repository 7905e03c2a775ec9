"""The kernel-class profile on a real CUDA trace: ``torch.profiler`` events of a GEMM, an SDPA call, the
project's Triton attention kernel and elementwise ops land in their classes. Runs on the GPU machine:
``python -m pytest -m gpu -s tests/test_kernel_profile_gpu.py`` (a few seconds)."""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.training.kernel_profile import device_kernels, format_shares, kernel_shares

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_profile_of_gemm_attention_elementwise():
    from torch.profiler import ProfilerActivity, profile

    from megatron_rcm.ops.attention import attention_op

    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    jvp_attn = attention_op("triton")
    for _ in range(2):  # the second round is profiled: Triton compiles and cuBLAS picks kernels in the first
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            (a @ a).float().add_(1.0)
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
            qs = q.permute(2, 0, 1, 3).contiguous()  # [S, B, N, H], Megatron's layout
            jvp_attn(qs, qs, qs, qs, qs, qs)
            torch.cuda.synchronize()
    kernels = device_kernels(prof.events())
    shares = kernel_shares(kernels)
    print("\n" + format_shares("test", shares))
    print("kernel names:", sorted({n[:100] for n, _ in kernels}))
    for cls in ("gemm", "attention", "elementwise"):
        assert shares["ms"][cls] > 0, (cls, shares)
    assert shares["ms"]["nccl"] == 0
