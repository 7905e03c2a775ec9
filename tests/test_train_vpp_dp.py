"""The rCM trainer under the interleaved pipeline schedule composed with data parallelism equals the
one-process run: PP=2 x V=2 x DP=2 against PP=1 x DP=1 over the step kinds of tests/test_train_vpp.py (a
warm-up sCM student step, another, an sCM + DMD student step, a critic step): every loss, ``scm/g_norm``,
``dmd/weight`` (averaged over the DP ranks), gradient norms, every parameter gradient of every step (each
chunk's copy of the replicated conditioning embeddings checked on its own), the student, critic and EMA weights
after the optimizer steps and 2-step samples; the PP=2 x V=2 x DP=2 checkpoint resumes at PP=1 x DP=1 with
bit-equal weights and the optimizer step counts restored.

The reference with the same global batch: each DP rank reads its own slice of the data (``EpochOrder``) and
draws t and noise from its own generator (seeded per DP rank), and DDP averages the ranks' gradients. The PP=1
run reproduces that in one process with ``grad_accumulation_steps`` = DP: its micro-batch r reads DP rank r's
slice with DP rank r's generator (``_SlicesAsMicroBatches``), and the accumulation's ``loss / accum`` is the
DP mean. World 4 (gloo on CPU); 4 layers, so each pipeline rank holds 2 chunks of one block, 2 samples per DP
rank in 2 pipeline micro-batches. Float32, so the tolerance is round-off (1e-5 relative, as
tests/test_train_vpp.py): only the order of the sums over micro-batches, chunks, stages and DP ranks changes.
The negative, one step in the same processes: chunk 1's gradients left out of the DP reduction (its DDP's
``finish_grad_sync`` skipped): chunk 1's blocks then hold one rank's slice gradient, far off the reference,
while chunk 0's blocks still match.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist_helpers import history_errors, spawn
from tests.test_train_pp import STEPS, TOL, _cfg
from tests.test_train_vpp import _grad_errors, _run, _weight_errors

PP, VP, DP = 2, 2, 2
PER_RANK = 2  # samples per DP rank and step: 2 pipeline micro-batches of 1 (a multiple of PP)
AVERAGED = ("loss/", "scm/g_norm", "dmd/weight")  # per-rank means the DP ranks log (gradient norms are global)


def _dp_cfg(path, pp=PP, steps=STEPS):
    cfg = _cfg(path, pp, steps=steps, micro=PER_RANK if pp > 1 else 1)
    cfg.data.micro_batch_size = PER_RANK
    if pp > 1:
        cfg.parallel.virtual_pipeline = VP
    return cfg


class _SlicesAsMicroBatches:
    """The data source of a PP=1 x DP=1 trainer with ``grad_accumulation_steps`` = DP that reads, for its
    micro-batch r of each step, DP rank r's slice and sets the trainer's generator to DP rank r's (the trainer
    draws t and noise from ``trainer.generator`` right after ``next_batch``)."""

    def __init__(self, trainer):
        from megatron_rcm.data import build_data_source

        cfg = trainer.cfg
        self.trainer = trainer
        self.sources = [build_data_source(cfg.data, cfg.training.seed, r, DP) for r in range(DP)]
        self.generators = [torch.Generator().manual_seed(cfg.training.seed * 1000 + r) for r in range(DP)]
        self.calls = 0

    def next_batch(self):
        r = self.calls % DP
        self.calls += 1
        self.trainer.generator = self.generators[r]
        return self.sources[r].next_batch()

    def close(self):
        for s in self.sources:
            s.close()


def _dp_means(hist):
    """Each step's per-rank metrics averaged over the DP ranks (what the reference's accumulation logs)."""
    from megatron.core import parallel_state as ps

    out = []
    for metrics in hist:
        keys = sorted(k for k in metrics if k.startswith(AVERAGED))
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        out.append({**metrics, **{k: v / DP for k, v in zip(keys, t.tolist())}})
    return out


def _skip_dp_reduction(trainer):
    """The negative: chunk 1's DDP does not reduce its gradients over DP (student and critic)."""
    for net in (trainer.student, trainer.critic):
        net[1].finish_grad_sync = lambda *args, **kwargs: None  # net[1]: chunk 1 with its DDP wrapper


def _worker(rank, world, path):
    from megatron_rcm.parallel.state import destroy_parallel

    hist, grads, weights, _ = _run(_dp_cfg(f"{path}/run"))  # writes run/ckpt at step STEPS
    out = (_dp_means(hist), grads, weights, None)
    broken = _run(_dp_cfg(f"{path}/broken", steps=1), setup=_skip_dp_reduction)
    destroy_parallel()
    return out, broken


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from megatron_rcm.parallel.state import destroy_parallel

    cfg = _dp_cfg(tmp_path_factory.mktemp("vpp-dp-ref") / "ref", pp=1)
    cfg.optimizer.grad_accumulation_steps = DP
    cfg.checkpoint.dir = None
    out = _run(cfg, setup=lambda tr: setattr(tr, "data", _SlicesAsMicroBatches(tr)))
    destroy_parallel()
    return out


def test_vpp_dp2_trainer_equals_pp1(reference, tmp_path):
    import time

    from megatron_rcm.parallel.state import destroy_parallel

    ref_hist, ref_grads, ref_w, _ = reference
    t0 = time.perf_counter()
    got, broken = spawn(_worker, PP * DP, str(tmp_path))
    print(f"PP=2 x V=2 x DP=2: {time.perf_counter() - t0:.1f} s")
    hist, grads, w, _ = got
    assert len(hist) == len(ref_hist) == STEPS
    assert {"loss/scm", "loss/dmd"} <= set(ref_hist[2]) and "loss/critic" in ref_hist[3]
    # every block once, each conditioning embedding 4 times (2 chunks x 2 stages)
    assert len(grads[0]["student.time_embedding.linear_1.weight"]) == PP * VP
    errs = history_errors(ref_hist, hist)
    errs.update(_grad_errors(ref_grads, grads))
    errs.update(_weight_errors(ref_w, w))
    assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])

    # the negative: chunk 1 (blocks 2 and 3) keeps rank 0's slice gradient; chunk 0 (blocks 0 and 1) is reduced
    gerrs = _grad_errors(ref_grads[:1], broken[1])
    assert min(v for k, v in gerrs.items() if ".blocks.2." in k or ".blocks.3." in k) > 1e-2, gerrs
    assert max(v for k, v in gerrs.items() if ".blocks.0." in k or ".blocks.1." in k) <= TOL, gerrs

    # the checkpoint (step STEPS, written over DP=2 with 2 local copies of each embedder shard) resumes at
    # PP=1 x DP=1 (global batch DP x PER_RANK in one micro-batch): every weight bit-equal, the optimizers' step
    # counts restored, the data position of both DP ranks together (each read PER_RANK x STEPS samples)
    from megatron_rcm.training import Trainer

    trainer = Trainer(_cfg(tmp_path / "run", steps=STEPS, micro=1))
    assert trainer.step == STEPS
    assert (trainer.data.order.epoch, trainer.data.order.cursor) == (0, DP * PER_RANK * STEPS)
    start = _weights_pp1(trainer)
    counts = {n: _optimizer_steps(o) for n, o in (("student", trainer.opt_student), ("critic", trainer.opt_critic))}
    trainer.close()
    destroy_parallel()
    saved = {k: v for k, v in w.items() if not k.startswith("samples")}
    assert start.keys() == saved.keys()
    diffs = {f"{k} copy {j}": (b - start[k][0]).abs().max().item() for k in saved for j, b in enumerate(saved[k])}
    assert max(diffs.values()) == 0.0, max(diffs.items(), key=lambda kv: kv[1])
    # 3 student steps and 1 critic step were taken (tangent_warmup 2, one student step in 2 afterwards)
    assert counts == {"student": 3, "critic": 1}, counts


def test_data_position_at_another_dp_size():
    from megatron_rcm.training.ckpt_layout import data_position_at

    saved = {"epoch": 3, "cursor": 5, "num_samples": 100, "dp_rank": 1, "dp_size": 2}
    assert data_position_at(saved, 1, 0) == {**saved, "cursor": 10, "dp_size": 1, "dp_rank": 0}
    assert data_position_at(saved, 5, 4) == {**saved, "cursor": 2, "dp_size": 5, "dp_rank": 4}
    with pytest.raises(ValueError, match=r"cursor 5 on each of 2 data-parallel ranks: 10 samples of epoch 3\) "
                                         r"does not split over 4 data-parallel ranks"):
        data_position_at(saved, 4, 0)


def _weights_pp1(trainer):
    from tests.test_train_vpp import _weights

    return _weights(trainer)


def _optimizer_steps(opt):
    steps = {int(opt.optimizer.state[m]["step"]) for m in opt.master}
    assert len(steps) == 1, steps
    return steps.pop()


if __name__ == "__main__":
    torch.set_num_threads(1)
    pytest.main([__file__, "-q", "-s"])
