"""The CUDA pieces of ring context parallelism on one GPU, without NCCL: attention over key chunks with the
kernels (JVP kernel with LSE/dLSE, the SDPA kernel with its LSE for primal-only chunks, the cuDNN/Triton backward
fed the global O and LSE), merged, against the float64 PyTorch computation over all keys.

Errors are ||a - b|| / ||b||; inputs are bf16, so one rounding of the output (2^-9) and the summation order
of the kernels bound them: measured values are printed (``-s``)."""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.ops.attention_chunks import (
    KernelChunkOps,
    PartialSum,
    TorchChunkOps,
    merge_partials,
    sdpa_with_lse,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOL = 2e-2


def nrel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("S,d,split", [(4097, 128, 2050), (1001, 64, 333)])
@pytest.mark.parametrize("with_tangent", [True, False])
def test_kernel_chunks_merge_and_backward_match_float64(S, d, split, with_tangent):
    g = torch.Generator("cuda").manual_seed(0)
    B, N = 1, 4
    mk = lambda: torch.randn(S, B, N, d, generator=g, device="cuda").bfloat16()
    q, k, v, t_q, t_k, t_v, do = (mk() for _ in range(7))
    if not with_tangent:
        t_q = t_k = t_v = None
    scale = d**-0.5
    ops, ref = KernelChunkOps(), TorchChunkOps()
    chunks = [slice(0, split), slice(split, S)]
    acc, folded = None, PartialSum()
    for c in chunks:
        part = ops.forward(q, k[c], v[c], t_q, None if t_k is None else t_k[c], None if t_v is None else t_v[c], scale)
        acc = part if acc is None else merge_partials(acc, part)
        folded.add(part)
    folded = folded.result()
    f64 = lambda x: None if x is None else x.double()
    want = ref.forward(*(f64(x) for x in (q, k, v, t_q, t_k, t_v)), scale)
    errs = {"o": nrel(acc.o, want.o), "lse": nrel(acc.lse, want.lse), "o (PartialSum)": nrel(folded.o, want.o)}
    if with_tangent:
        errs |= {"t_o": nrel(acc.t_o, want.t_o), "t_lse": nrel(acc.t_lse, want.t_lse),
                 "t_o (PartialSum)": nrel(folded.t_o, want.t_o), "t_lse (PartialSum)": nrel(folded.t_lse, want.t_lse)}
    # backward: each chunk with the global (o, lse); dq sums over chunks, dk/dv are per chunk
    o, lse = acc.o.to(q.dtype), acc.lse
    dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
    dks, dvs = [], []
    for c in chunks:
        dq_c, dk_c, dv_c = ops.backward(q, k[c], v[c], o, lse, do, scale)
        dq += dq_c.float()
        dks.append(dk_c)
        dvs.append(dv_c)
    w_dq, w_dk, w_dv = ref.backward(*(x.double() for x in (q, k, v)), want.o, want.lse, do.double(), scale)
    errs |= {"dq": nrel(dq, w_dq), "dk": nrel(torch.cat(dks), w_dk), "dv": nrel(torch.cat(dvs), w_dv)}
    print(f"\nS={S} d={d} tangent={with_tangent}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert all(e < TOL for e in errs.values()), errs


@pytest.mark.parametrize("backend", ["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_sdpa_with_lse_each_backend_matches_float64(backend):
    """The primal chunk forward asks the SDPA kernel that torch picks for its LSE; each of the three fused
    backends (forced with ``sdpa_kernel``) returns o and lse [B, N, Sq] in natural log, uneven lengths."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator("cuda").manual_seed(1)
    Sq, Skv, B, N, d = 1001, 777, 2, 4, 128
    q = torch.randn(Sq, B, N, d, generator=g, device="cuda").bfloat16()
    k, v = (torch.randn(Skv, B, N, d, generator=g, device="cuda").bfloat16() for _ in range(2))
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        try:
            found = sdpa_with_lse(q, k, v, d**-0.5)
        except RuntimeError as err:  # the backend is not built into this torch / not supported on this GPU
            pytest.skip(f"{backend}: {err}")
    if found is None:
        pytest.skip(f"{backend} not available for these tensors")
    o, lse = found
    want = TorchChunkOps().forward(q.double(), k.double(), v.double(), None, None, None, d**-0.5)
    errs = {"o": nrel(o, want.o), "lse": nrel(lse, want.lse)}
    print(f"\nsdpa_with_lse {backend}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert o.shape == q.shape and lse.shape == (B, N, Sq)
    assert all(e < TOL for e in errs.values()), errs
