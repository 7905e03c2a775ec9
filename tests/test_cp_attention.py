"""Context-parallel self-attention (ring p2p and Ulysses a2a) with tangents, forward and backward.

The pieces are checked against independent references in one process: the log-sum-exp merge against
attention over all keys at once, the explicit FlashAttention-2 backward against autograd of the PyTorch
reference. The CP runs are gloo process groups on CPU compared with single-process attention over the
whole sequence; float32, so the tolerance is round-off (1e-5 relative: max |a - b| / max |b|).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.kernels.attention_jvp_reference import attention_jvp_torch
from megatron_rcm.ops.attention_chunks import (
    KernelChunkOps,
    Partial,
    PartialSum,
    TorchChunkOps,
    merge_partials,
)
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.dist_helpers import gather_sequence, spawn
from tests.wan_helpers import rel_err

TOL = 1e-5  # float32 round-off; the measured errors are ~1e-7


def _qkv(S, B=2, N=4, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(S, B, N, d, generator=g, dtype=dtype) for _ in range(6)]


def _reference(q, k, v, t_q, t_k, t_v, w, S):
    """Attention over the S valid keys, its tangent and the gradients of sum(o * w) w.r.t. q, k, v."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o, t_o = attention_jvp_torch(q, k[:S], v[:S], t_q, t_k[:S], t_v[:S])
    (o * w).sum().backward()
    return o.detach(), t_o, q.grad, k.grad, v.grad


@pytest.mark.parametrize("ops", [TorchChunkOps(), KernelChunkOps()], ids=["torch", "triton-interpreter"])
def test_merge_of_two_key_chunks_equals_attention_over_all(ops):
    q, k, v, t_q, t_k, t_v = _qkv(32)
    scale = 16**-0.5
    parts = [ops.forward(q, k[a:b], v[a:b], t_q, t_k[a:b], t_v[a:b], scale) for a, b in ((0, 13), (13, 32))]
    merged = merge_partials(*parts)
    ref = TorchChunkOps().forward(q, k, v, t_q, t_k, t_v, scale)
    for name in Partial._fields:
        assert rel_err(getattr(merged, name), getattr(ref, name)) <= TOL, name


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_partial_sum_of_many_chunks_equals_attention_over_all(out_dtype):
    """The in-place accumulator (deferred normalization) over 4 uneven chunks equals attention over all keys
    and pairwise merge_partials. Keys of the last chunk are scaled so that its scores (and lse) exceed the
    others' by ~200: the running-maximum rescale must keep exp() finite. bf16 partial outputs (what the
    kernels return) are merged in float32: the error is bf16 rounding of o and t_o, 2^-8."""
    q, k, v, t_q, t_k, t_v = _qkv(40)
    k = k.clone()
    k[30:] *= 40.0
    ops, scale = TorchChunkOps(), 16**-0.5
    cuts = [(0, 7), (7, 20), (20, 30), (30, 40)]
    parts = [ops.forward(q, k[a:b], v[a:b], t_q, t_k[a:b], t_v[a:b], scale) for a, b in cuts]
    parts = [p._replace(o=p.o.to(out_dtype), t_o=p.t_o.to(out_dtype)) for p in parts]
    acc = PartialSum()
    for p in parts:
        acc.add(p)
    got = acc.result()
    ref = ops.forward(q, k, v, t_q, t_k, t_v, scale)
    pairwise = parts[0]
    for p in parts[1:]:
        pairwise = merge_partials(pairwise, p)
    tol = TOL if out_dtype == torch.float32 else 1e-2
    for name in Partial._fields:
        assert torch.isfinite(getattr(got, name)).all(), name
        assert rel_err(getattr(got, name), getattr(ref, name)) <= tol, name
        assert rel_err(getattr(got, name), getattr(pairwise, name)) <= tol, name
    primal = PartialSum()
    for p in parts:
        primal.add(p._replace(t_o=None, t_lse=None))
    res = primal.result()
    assert res.t_o is None and rel_err(res.o, ref.o) <= tol


def test_partial_sum_without_the_final_lse_tangent_term_is_wrong():
    """Negative: t_o = T~ / l alone (no "- t_lse o") is visibly wrong, so the test above checks that term."""
    q, k, v, t_q, t_k, t_v = _qkv(32)
    ops, scale = TorchChunkOps(), 16**-0.5
    acc = PartialSum()
    for s in (slice(0, 16), slice(16, 32)):
        acc.add(ops.forward(q, k[s], v[s], t_q, t_k[s], t_v[s], scale))
    got = acc.result()
    ref = ops.forward(q, k, v, t_q, t_k, t_v, scale)
    wrong = got.t_o + got.t_lse.permute(2, 0, 1)[..., None] * got.o
    assert rel_err(got.t_o, ref.t_o) <= TOL
    assert rel_err(wrong, ref.t_o) > 1e-2


def test_merge_without_the_lse_tangent_is_wrong():
    """The dLSE terms matter: dropping them gives a visibly wrong t_o (what the ring test below relies on)."""
    q, k, v, t_q, t_k, t_v = _qkv(32)
    ops, scale = TorchChunkOps(), 16**-0.5
    a, b = (ops.forward(q, k[s], v[s], t_q, t_k[s], t_v[s], scale) for s in (slice(0, 16), slice(16, 32)))
    zero = lambda p: p._replace(t_lse=torch.zeros_like(p.t_lse))
    ref = ops.forward(q, k, v, t_q, t_k, t_v, scale)
    assert rel_err(merge_partials(zero(a), zero(b)).t_o, ref.t_o) > 1e-2


@pytest.mark.parametrize("ops", [TorchChunkOps(), KernelChunkOps()], ids=["torch", "triton-interpreter"])
def test_chunk_backward_with_global_lse_matches_autograd(ops):
    """dq summed over key chunks and each chunk's dk, dv, from the global (o, lse), equal autograd."""
    q, k, v, _, _, _ = _qkv(24)
    w = torch.randn(24, 2, 4, 16)
    qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
    o_ref, _, lse, _ = attention_jvp_torch(qa, ka, va, torch.zeros_like(q), return_lse=True)
    (o_ref * w).sum().backward()
    o = o_ref.detach()
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for s in (slice(0, 10), slice(10, 24)):
        dq_j, dk_j, dv_j = ops.backward(q, k[s].contiguous(), v[s].contiguous(), o, lse.detach(), w, 16**-0.5)
        dq += dq_j
        dks.append(dk_j)
        dvs.append(dv_j)
    assert rel_err(dq, qa.grad) <= TOL
    assert rel_err(torch.cat(dks), ka.grad) <= TOL
    assert rel_err(torch.cat(dvs), va.grad) <= TOL


# -- CP over gloo ---------------------------------------------------------------------------------------


def _cp_case(rank, world, comm_type, S, tensors, variant):
    """variant: "jvp" (tangents, PyTorch chunks), "primal" (no tangents), "triton" / "triton-primal" (the
    kernel chunks under the Triton interpreter: the CUDA path's forward with LSE and its backward), "no-dlse" (the
    negative: the merge without its dLSE terms, t_lse of both partials set to 0)."""
    from megatron_rcm.parallel import cp_attention
    from megatron_rcm.parallel.context import token_shard

    if variant == "no-dlse":

        class NoDLSE(PartialSum):
            def add(self, part):
                super().add(part._replace(t_lse=None if part.t_lse is None else torch.zeros_like(part.t_lse)))

        cp_attention.PartialSum = NoDLSE
    try:
        q, k, v, t_q, t_k, t_v, w = tensors
        if variant.endswith("primal"):
            t_q = t_k = t_v = None
        shard = token_shard(S)
        loc = [None if x is None else shard.shard(x) for x in (q, k, v, t_q, t_k, t_v, w)]
        q_l, k_l, v_l = (x.clone().requires_grad_(True) for x in loc[:3])
        backend = "triton" if variant.startswith("triton") else "torch"
        attn = cp_attention.ContextParallelAttention(comm_type, world, q.shape[2], backend)
        o, t_o = attn(q_l, k_l, v_l, *loc[3:6], shard)
        (o * loc[6]).sum().backward()
    finally:
        cp_attention.PartialSum = PartialSum
    return gather_sequence((o.detach(), t_o, q_l.grad, k_l.grad, v_l.grad), world, S)  # valid rows only


def _cp_worker(rank, world, cases):
    """All cases of one CP size in one process group (process start-up dominates the test time)."""
    initialize_parallel(context_parallel=world)
    try:
        return [_cp_case(rank, world, c, S, t, variant) for c, S, t, variant in cases]
    finally:
        destroy_parallel()


# (comm_type, S, variant); S = 21, 23: padded last shard; S = 5 at CP=4: a rank holding only padding
CASES = {
    2: [("p2p", 24, "jvp"), ("a2a", 24, "jvp"), ("a2a", 23, "jvp"), ("p2p", 23, "jvp"), ("p2p", 23, "primal"),
        ("a2a", 23, "primal"), ("p2p", 23, "triton"), ("p2p", 23, "triton-primal"), ("p2p", 24, "no-dlse")],
    4: [("p2p", 24, "jvp"), ("a2a", 24, "jvp"), ("p2p", 21, "jvp"), ("p2p", 5, "jvp"), ("p2p", 21, "primal")],
}


@pytest.fixture(scope="module")
def cp_results():
    """{(cp, comm_type, S, variant): {name: relative error vs one process}}"""
    out = {}
    for cp, cases in CASES.items():
        inputs = [(c, S, _qkv(S, seed=S) + [torch.randn(S, 2, 4, 16)], variant) for c, S, variant in cases]
        got = spawn(_cp_worker, cp, inputs)
        for (c, S, tensors, variant), g in zip(inputs, got):
            ref = _reference(*tensors, S)
            out[(cp, c, S, variant)] = {
                n: rel_err(a, b) for n, a, b in zip(("o", "t_o", "dq", "dk", "dv"), g, ref) if a is not None
            }
    return out


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_attention_matches_single_process(cp_results, cp):
    """Outputs, tangents (except "primal") and gradients of every case of CASES against one process."""
    for comm_type, S, variant in CASES[cp]:
        errs = cp_results[(cp, comm_type, S, variant)]
        if variant != "no-dlse":
            assert len(errs) == (4 if variant.endswith("primal") else 5)
            assert max(errs.values()) <= TOL, (cp, comm_type, S, variant, errs)


def test_ring_without_the_lse_tangent_merge_fails(cp_results):
    """Negative: the same comparison with the dLSE terms of the merge dropped must fail on the tangent."""
    errs = cp_results[(2, "p2p", 24, "no-dlse")]
    assert errs["o"] <= TOL and errs["dq"] <= TOL  # the primal does not use dLSE
    assert errs["t_o"] > 1e-2, errs


def test_a2a_needs_cp_to_divide_the_heads():
    from megatron_rcm.parallel.cp_attention import check_cp_layout

    with pytest.raises(ValueError, match=r"6 heads per tensor-parallel rank are not divisible by context_parallel 4.*'p2p'"):
        check_cp_layout("a2a", 4, 6)
    check_cp_layout("p2p", 4, 6)
    with pytest.raises(ValueError, match="a2a\\+p2p"):
        check_cp_layout("a2a+p2p", 4, 8)  # without hierarchical_context_parallel_sizes (tests/test_cp_hierarchical.py)
    with pytest.raises(ValueError, match="cp_comm_type must be one of"):
        check_cp_layout("ring", 2, 8)
