"""The rCM trainer under the interleaved pipeline schedule composed with tensor or context parallelism equals
the one-process run: PP=2 x V=2 x TP=2 (sequence parallel on, as every TP > 1 config has it) and PP=2 x V=2 x
CP=2 (ring attention, an odd token count: 15 tokens padded to 16, shards of 8) against PP=1, over the step kinds
of tests/test_train_vpp.py (a warm-up sCM student step, another, an sCM + DMD student step, a critic step):
every loss, ``scm/g_norm``, ``dmd/weight``, gradient norms, every parameter gradient of every step (TP-gathered;
each chunk's copy of the replicated conditioning embeddings checked on its own), the student, critic and EMA
weights after the optimizer steps and 2-step samples.

World 4 (gloo on CPU); 4 layers, so each pipeline rank holds 2 chunks of one block, 4 pipeline micro-batches
per network call. Float32, so the tolerance is round-off (1e-5 relative, as tests/test_train_vpp.py): the
ranks compute the same products, only sums over micro-batches, chunks, stages, TP and CP ranks change order.
Each layout's processes also run one step with the composition broken, which the comparison must catch: at
TP=2, chunk 1's sequence-parallel parameters (norms, modulation) unmarked, so Megatron's ``finalize_model_grads``
leaves their gradients unsummed over TP; at CP=2, the replayed loss not divided by CP
(``PipelinedNet.backward_pending``), so every gradient is CP times too large.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import history_errors, spawn
from tests.test_train_pp import STEPS, TOL, _cfg
from tests.test_train_vpp import _grad_errors, _run, _weight_errors

PP, VP = 2, 2


def _layout_cfg(path, pp=1, tp=1, cp=1, steps=STEPS):
    """PP x V (V=2 at PP > 1) x TP x CP, 4 micro-batches at PP > 1 (1 at PP=1)."""
    cfg = _cfg(path, pp, tp, steps=steps, micro=4 if pp > 1 else 1, cp=cp)
    if pp > 1:
        cfg.parallel.virtual_pipeline = VP
    return cfg


def _odd(cfg):
    cfg.data.latent_shape = [1, 1, 6, 10]  # 3 x 5 = 15 tokens (patch 1 x 2 x 2): CP=2 pads to 16, shards of 8
    return cfg


def _worker(rank, world, path, tp, cp):
    """The 4-step run, then the negative: one step with the composition broken (see the tests)."""
    from megatron_rcm.parallel.state import destroy_parallel
    from megatron_rcm.training import pipelined_net

    def cfg(name, steps):
        c = _layout_cfg(f"{path}/{name}", PP, tp, cp, steps)
        return _odd(c) if cp > 1 else c

    out = _run(cfg("run", STEPS))  # the parallel state stays: a second init of the gloo group can't connect
    if cp > 1:  # the replay's loss not divided by CP
        pipelined_net.cp_world_size = lambda: 1
        broken = _run(cfg("broken", 1))
    else:  # chunk 1's sequence-parallel parameters (norms, modulation) left out of the sum over TP
        broken = _run(cfg("broken", 1), unmark="sequence_parallel")
    destroy_parallel()
    return out, broken


def _reference(root, odd):
    from megatron_rcm.parallel.state import destroy_parallel

    cfg = _layout_cfg(root / "ref")
    out = _run(_odd(cfg) if odd else cfg)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("vpp-tp-ref"), odd=False)


@pytest.fixture(scope="module")
def reference_odd(tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("vpp-cp-ref"), odd=True)


def _compare(ref, got):
    ref_hist, ref_grads, ref_w, _ = ref
    hist, grads, w, _ = got
    assert len(hist) == len(ref_hist) == STEPS
    assert {"loss/scm", "loss/dmd"} <= set(ref_hist[2]) and "loss/critic" in ref_hist[3]
    errs = history_errors(ref_hist, hist)
    errs.update(_grad_errors(ref_grads, grads))
    errs.update(_weight_errors(ref_w, w))
    return errs


def _broken_errors(ref, broken):
    """Step 0 of a broken 1-step run against the reference: (metric errors, block gradient errors)."""
    errs = history_errors(ref[0][:1], broken[0])
    gerrs = _grad_errors(ref[1][:1], broken[1])
    return errs, {k: v for k, v in gerrs.items() if "blocks." in k}


def test_vpp_tp2_sp_trainer_equals_pp1(reference, tmp_path):
    got, broken = spawn(_worker, PP * 2, str(tmp_path / "vpp-tp2"), 2, 1)
    # every block once, each conditioning embedding 4 times (2 chunks x 2 stages), TP-gathered
    assert len(got[1][0]["student.time_embedding.linear_1.weight"]) == PP * VP
    errs = _compare(reference, got)
    assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])
    # the negative: chunk 1's sequence-parallel gradients not summed over TP (each TP rank's token share only)
    errs, gerrs = _broken_errors(reference, broken)
    assert max(gerrs.values()) > 1e-2, max(gerrs.items(), key=lambda kv: kv[1])


def test_vpp_cp2_ring_odd_tokens_trainer_equals_pp1(reference_odd, tmp_path):
    got, broken = spawn(_worker, PP * 2, str(tmp_path / "vpp-cp2"), 1, 2)
    errs = _compare(reference_odd, got)
    assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])
    # the negative: without the division by CP in the replay, every gradient is CP = 2 times too large
    errs, gerrs = _broken_errors(reference_odd, broken)
    assert abs(errs["step 0 grad_norm/student"] - 1.0) < 1e-3, errs
    assert min(gerrs.values()) > 0.5, min(gerrs.items(), key=lambda kv: kv[1])


if __name__ == "__main__":
    torch.set_num_threads(1)
    pytest.main([__file__, "-q"])
