"""Ulysses with its all-to-all in G head groups overlapped with the attention (``parallel.cp_a2a_head_groups``).

Over gloo on CPU (async ``all_to_all_single``): G = 2 and G = N_c against G = 1 (today's path) at CP=2
(N_c = 4) and CP=4 (N_c = 2), with and without tangents, at 24 and 23 tokens (23: the last shard padded).
Attention heads are independent and each group runs the same kernel on its heads, so the outputs, tangents
and gradients should agree to float32 round-off of the kernel's batching (tolerance 1e-6 relative; the
measured differences are 0). Both are also checked against one process over the whole sequence (1e-5, as
tests/test_cp_attention.py). Negative: the groups' outputs assembled in the wrong order must fail.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.dist_helpers import gather_sequence, spawn
from tests.test_cp_attention import _qkv, _reference
from tests.wan_helpers import rel_err

TOL_G1 = 1e-6  # against G = 1: the same per-head math, only the kernel's batching of heads differs
TOL_REF = 1e-5  # against one process: float32 round-off (tests/test_cp_attention.py)
N = 8


def _case(world, S, G, tensors, variant):
    """variant: "jvp", "primal", "reversed" (negative: group g's output placed in group G-1-g's heads), "reversed-bwd" (negative: the same for
    the gradients of the input all-to-all)."""
    from megatron_rcm.parallel import cp_attention, cp_ulysses_groups
    from megatron_rcm.parallel.context import token_shard

    assemble, grads_back = cp_ulysses_groups._HeadGroups.assemble, cp_ulysses_groups._grads_heads_to_seq
    if variant == "reversed-bwd":  # the backward's inverse all-to-all with the groups' gradients in reverse order
        cp_ulysses_groups._grads_heads_to_seq = lambda grads, *a: grads_back([g[::-1] for g in grads], *a)
    if variant == "reversed":
        def flipped(self, slots):  # every wait and copy as usual, then the group order reversed
            cp, s, B, n, d = slots[0][0].shape
            return [o.view(s, B, cp, self.G, n, d).flip(3).reshape(s, B, -1, d) for o in assemble(self, slots)]

        cp_ulysses_groups._HeadGroups.assemble = flipped
    try:
        q, k, v, t_q, t_k, t_v, w = tensors
        if variant == "primal":
            t_q = t_k = t_v = None
        shard = token_shard(S)
        loc = [None if x is None else shard.shard(x) for x in (q, k, v, t_q, t_k, t_v, w)]
        q_l, k_l, v_l = (x.clone().requires_grad_(True) for x in loc[:3])
        attn = cp_attention.ContextParallelAttention("a2a", world, N, "torch", a2a_head_groups=G)
        o, t_o = attn(q_l, k_l, v_l, *loc[3:6], shard)
        (o * loc[6]).sum().backward()
        with torch.no_grad():  # the no-autograd path (sampling, the teacher's JVP)
            o_ng, t_o_ng = attn(*loc[:6], shard)
    finally:
        cp_ulysses_groups._HeadGroups.assemble, cp_ulysses_groups._grads_heads_to_seq = assemble, grads_back
    # the attention op's own no-grad and autograd paths may round differently: round-off, not equality
    assert rel_err(o_ng, o.detach()) <= TOL_G1 and (t_o is None or rel_err(t_o_ng, t_o) <= TOL_G1), (
        G, variant, rel_err(o_ng, o.detach()), None if t_o is None else rel_err(t_o_ng, t_o))
    return gather_sequence((o.detach(), t_o, q_l.grad, k_l.grad, v_l.grad), world, S)


def _worker(rank, world, cases):
    initialize_parallel(context_parallel=world)
    try:
        return [_case(world, S, G, t, variant) for S, G, t, variant in cases]
    finally:
        destroy_parallel()


# CP -> (S, G, variant); N_c = 8 / CP heads per CP rank, G in {1, 2, N_c}
CASES = {
    2: [(S, G, var) for S in (24, 23) for var in ("jvp", "primal") for G in (1, 2, 4)] + [(23, 4, "reversed"), (23, 4, "reversed-bwd")],
    4: [(S, G, var) for S in (24, 23) for var in ("jvp", "primal") for G in (1, 2)],
}
NAMES = ("o", "t_o", "dq", "dk", "dv")


@pytest.fixture(scope="module")
def results():
    """{(cp, S, G, variant): (gathered outputs, single-process reference)}"""
    out = {}
    for cp, cases in CASES.items():
        inputs = [(S, G, _qkv(S, N=N, seed=S) + [torch.randn(S, 2, N, 16, generator=torch.Generator().manual_seed(S))],
                   var) for S, G, var in cases]
        got = spawn(_worker, cp, inputs)
        for (S, G, tensors, var), g in zip(inputs, got):
            out[(cp, S, G, var)] = (g, _reference(*tensors, S))
    return out


@pytest.mark.parametrize("cp", [2, 4])
def test_head_groups_match_one_group_and_one_process(results, cp):
    for S, G, var in CASES[cp]:
        if G == 1 or var.startswith("reversed"):
            continue
        got, ref = results[(cp, S, G, var)]
        base, _ = results[(cp, S, 1, var)]
        n = 4 if var == "primal" else 5
        assert sum(x is not None for x in got) == n
        for name, a, b, r in zip(NAMES, got, base, ref):
            if a is None:
                assert b is None, name
                continue
            assert rel_err(a, b) <= TOL_G1, (cp, S, G, var, name, rel_err(a, b))
            assert rel_err(a, r) <= TOL_REF, (cp, S, G, var, name, rel_err(a, r))


def test_groups_assembled_in_the_wrong_order_fail(results):
    """Negative: the same comparison with the groups' outputs in reverse order must fail on o and t_o (the
    backward maps d(o) as it should, so dq, dk, dv agree); with the groups' gradients reversed in the backward's
    all-to-all, it must fail on dq, dk, dv (and the forward agrees)."""
    base, _ = results[(2, 23, 1, "jvp")]
    fwd, _ = results[(2, 23, 4, "reversed")]
    bwd, _ = results[(2, 23, 4, "reversed-bwd")]
    for name, a, b, c in zip(NAMES, fwd, bwd, base):
        wrong, right = (a, b) if name in ("o", "t_o") else (b, a)
        assert rel_err(wrong, c) > 1e-2, name
        assert rel_err(right, c) <= TOL_G1, name


def test_head_groups_config_errors():
    from megatron_rcm.parallel.context import check_parallel_layout
    from megatron_rcm.parallel.cp_attention import check_cp_layout

    check_cp_layout("a2a", 2, 8, a2a_head_groups=4)
    with pytest.raises(ValueError, match=r"cp_a2a_head_groups 3 must divide the heads per CP rank: 8 heads per "
                                         r"tensor-parallel rank / context_parallel 2 = 4 heads, not divisible by 3"):
        check_cp_layout("a2a", 2, 8, a2a_head_groups=3)
    with pytest.raises(ValueError, match=r"cp_a2a_head_groups 2 .* 'a2a' only, got 'p2p'"):
        check_cp_layout("p2p", 2, 8, a2a_head_groups=2)
    with pytest.raises(ValueError, match=r"'a2a' only, got 'a2a\+p2p'"):
        check_cp_layout("a2a+p2p", 4, 8, [2, 2], a2a_head_groups=2)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        check_cp_layout("a2a", 2, 8, a2a_head_groups=0)
    # the trainer's check, before any network: 12 heads / TP 2 / CP 2 = 3 heads per CP rank
    with pytest.raises(ValueError, match=r"6 heads per tensor-parallel rank / context_parallel 2 = 3 heads"):
        check_parallel_layout(4, 2, 2, 1, 12, "a2a", a2a_head_groups=2)
    assert check_parallel_layout(4, 2, 2, 1, 12, "a2a", a2a_head_groups=3) == 1


def test_trainer_checks_head_groups_before_any_network():
    """The config path: parallel.cp_a2a_head_groups validated by the schema and by the trainer's layout check
    (which runs before any network is built), naming the numbers; Cosmos refuses G > 1."""
    from megatron_rcm.config import load_config
    from megatron_rcm.config.schema import ConfigError
    from megatron_rcm.training import Trainer
    from tests.test_ckpt_resume import TINY  # wan-tiny-t2v: 4 heads

    def cfg(*extra):
        return load_config(None, [*TINY, "parallel.context_parallel=2", *extra])

    with pytest.raises(ConfigError, match=r"parallel.cp_a2a_head_groups.*0 \(expected a positive integer\)"):
        cfg("parallel.cp_a2a_head_groups=0")
    with pytest.raises(ConfigError, match=r"cp_a2a_head_groups 4 must divide the heads per CP rank: 4 heads per "
                                          r"tensor-parallel rank / context_parallel 2 = 2 heads"):
        Trainer._check_layout(cfg("parallel.cp_comm_type=a2a", "parallel.cp_a2a_head_groups=4"), world=2)
    with pytest.raises(ConfigError, match=r"'a2a' only, got 'p2p'"):
        Trainer._check_layout(cfg("parallel.cp_a2a_head_groups=2"), world=2)
    with pytest.raises(ConfigError, match=r"implemented for Wan only, not for model.preset='cosmos-tiny-t2i'"):
        Trainer._check_layout(cfg("model.preset=cosmos-tiny-t2i", "parallel.cp_comm_type=a2a",
                                  "parallel.cp_a2a_head_groups=2"), world=2)
    Trainer._check_layout(cfg("parallel.cp_comm_type=a2a", "parallel.cp_a2a_head_groups=2"), world=2)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
