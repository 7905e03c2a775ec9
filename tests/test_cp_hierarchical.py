"""Hierarchical context parallelism (``cp_comm_type: a2a+p2p``, Megatron's ``hierarchical_context_parallel_sizes``
[A, R]): Ulysses inside groups of A ranks, the ring across R groups, with tangents, forward and backward.

CP=4 as 4 gloo processes on CPU against single-process attention over the whole sequence (the reference of
tests/test_cp_attention.py): [2, 2] (both levels), [1, 4] (ring only) and [4, 1] (Ulysses only), with and
without tangents, at 24 tokens and at 23 (padded last shard). float32, so the tolerance is round-off (1e-5
relative: max |a - b| / max |b|). Negative: the ring's blocks assigned in the wrong order (block = the rank
within the all-to-all group instead of the group's index) fails at 21 tokens (3 padded keys: the
ring then keeps padded keys of the wrong block; without padding attention cannot tell the blocks apart).
Layout errors name the numbers.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.dist_helpers import gather_sequence, spawn
from tests.test_cp_attention import _qkv, _reference
from tests.wan_helpers import rel_err

TOL = 1e-5  # float32 round-off

# (sizes, S, variant)
CASES = [([2, 2], 24, "jvp"), ([2, 2], 23, "jvp"), ([2, 2], 23, "primal"), ([2, 2], 21, "wrong-blocks"),
         ([1, 4], 23, "jvp"), ([4, 1], 23, "jvp")]


def _case(rank, world, sizes, S, tensors, variant):
    from megatron_rcm.parallel import cp_attention
    from megatron_rcm.parallel.context import token_shard

    real = cp_attention.TokenShard
    if variant == "wrong-blocks":  # the ring's block index taken from the wrong level of the hierarchy
        a = sizes[0]

        def swapped(seq_len, padded_len, size, rank):
            if size == world // a and size != world:
                rank = cp_attention.cp_global_ranks().index(torch.distributed.get_rank()) % a
            return real(seq_len=seq_len, padded_len=padded_len, size=size, rank=rank)

        cp_attention.TokenShard = swapped
    try:
        q, k, v, t_q, t_k, t_v, w = tensors
        if variant == "primal":
            t_q = t_k = t_v = None
        shard = token_shard(S)
        loc = [None if x is None else shard.shard(x) for x in (q, k, v, t_q, t_k, t_v, w)]
        q_l, k_l, v_l = (x.clone().requires_grad_(True) for x in loc[:3])
        attn = cp_attention.ContextParallelAttention("a2a+p2p", world, q.shape[2], "torch", sizes)
        o, t_o = attn(q_l, k_l, v_l, *loc[3:6], shard)
        (o * loc[6]).sum().backward()
        return gather_sequence((o.detach(), t_o, q_l.grad, k_l.grad, v_l.grad), world, S)
    finally:
        cp_attention.TokenShard = real


def _worker(rank, world, sizes, cases):
    """The cases of one [A, R] in one process group (Megatron's groups are created once per process)."""
    initialize_parallel(context_parallel=world, hierarchical_context_parallel_sizes=sizes)
    try:
        return [_case(rank, world, *c) for c in cases]
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def results():
    inputs = [(sizes, S, _qkv(S, seed=S) + [torch.randn(S, 2, 4, 16)], variant) for sizes, S, variant in CASES]
    got = []
    for sizes in ([2, 2], [1, 4], [4, 1]):
        got += spawn(_worker, 4, sizes, [c for c in inputs if c[0] == sizes])
    inputs = [c for sizes in ([2, 2], [1, 4], [4, 1]) for c in inputs if c[0] == sizes]
    out = {}
    for (sizes, S, tensors, variant), g in zip(inputs, got):
        ref = _reference(*tensors, S)
        out[(tuple(sizes), S, variant)] = {
            n: rel_err(a, b) for n, a, b in zip(("o", "t_o", "dq", "dk", "dv"), g, ref) if a is not None
        }
    return out


def test_hierarchical_cp4_matches_single_process(results):
    for sizes, S, variant in CASES:
        if variant == "wrong-blocks":
            continue
        errs = results[(tuple(sizes), S, variant)]
        assert len(errs) == (4 if variant == "primal" else 5)
        assert max(errs.values()) <= TOL, (sizes, S, variant, errs)


def test_hierarchical_with_blocks_out_of_order_fails(results):
    errs = results[((2, 2), 21, "wrong-blocks")]
    assert errs["o"] > 1e-2, errs


def test_hierarchical_layout_errors_name_the_numbers():
    from megatron_rcm.parallel.context import check_parallel_layout
    from megatron_rcm.parallel.cp_attention import check_cp_layout

    with pytest.raises(ValueError, match=r"needs hierarchical_context_parallel_sizes = \[A, R\].*None"):
        check_cp_layout("a2a+p2p", 4, 8)
    with pytest.raises(ValueError, match=r"A x R = 2 x 3 = 6 must equal context_parallel 4"):
        check_cp_layout("a2a+p2p", 4, 8, [2, 3])
    with pytest.raises(ValueError, match=r"6 heads per tensor-parallel rank are not divisible by 4"):
        check_cp_layout("a2a+p2p", 8, 6, [4, 2])
    with pytest.raises(ValueError, match=r"only used with cp_comm_type 'a2a\+p2p', got 'p2p'"):
        check_cp_layout("p2p", 4, 8, [2, 2])
    check_cp_layout("a2a+p2p", 8, 6, [2, 4])
    # through the whole layout check: 12 heads / TP 2 = 6 per rank, A = 4 does not divide them
    with pytest.raises(ValueError, match=r"6 heads per tensor-parallel rank are not divisible by 4"):
        check_parallel_layout(16, 2, 8, 1, 12, "a2a+p2p", [4, 2])
    assert check_parallel_layout(16, 2, 8, 1, 12, "a2a+p2p", [2, 4]) == 1
