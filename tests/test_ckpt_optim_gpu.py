"""The distributed optimizer's two checkpoint formats on GPUs: the per-rank ``dp_reshardable`` one (no gather,
the default) and the gathered ``fully_reshardable`` one hold the same state. A run at CP=2 on two GPUs (its
optimizer sharded over the data-parallel-with-context group of 2) writes both at the same step; each resumes
at CP=1 on one GPU (that group of 1), and the two resumed optimizers must agree bit for bit, with the CP=2
run's parameters. A resume at the same layout in each format: tests/test_train_gpu.py.

Run on a 2-GPU machine: ``python -m pytest -m gpu -s tests/test_ckpt_optim_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import spawn
from tests.test_train_gpu import _cfg, _inner_optimizers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]


CP2 = ("parallel.context_parallel=2", "parallel.cp_comm_type=a2a")


def _train_cp2_and_save_both(rank, world_size, tmp):
    from pathlib import Path

    from megatron_rcm.training import Trainer
    from megatron_rcm.training.checkpoint import CheckpointManager

    torch.cuda.set_device(rank)
    trainer = Trainer(_cfg(Path(tmp), "cp2", 3, *CP2))  # saves step 3 per rank (dp_reshardable)
    trainer.train()
    trainer.ckpt.close()
    trainer.optim_sharding = "fully_reshardable"
    trainer.ckpt = CheckpointManager(str(Path(tmp) / "cp2" / "full"), keep_last=1, async_save=False)
    trainer.save_checkpoint()
    trainer.close()
    return {n: p.detach().float().cpu() for n, p in trainer.student.module.named_parameters()}


def _optimizer_state(trainer):
    out = []
    for opt in (trainer.opt_student, trainer.opt_critic):
        for inner in _inner_optimizers(opt):
            for group in inner.optimizer.param_groups:
                for p in group["params"]:
                    st = inner.optimizer.state[p]
                    out.append((p.detach().cpu(), st["exp_avg"].cpu(), st["exp_avg_sq"].cpu(), float(st["step"])))
    return out


def test_cp2_checkpoint_resumes_at_cp1_identically_in_both_formats(tmp_path):
    from megatron_rcm.training import Trainer

    params_cp2 = spawn(_train_cp2_and_save_both, 2, str(tmp_path))
    resumed = {}
    for name, sub in (("per_rank", "ckpt"), ("gathered", "full")):
        cfg = _cfg(tmp_path, "cp2", 3)
        cfg.checkpoint.dir = str(tmp_path / "cp2" / sub)
        trainer = Trainer(cfg)
        assert trainer.step == 3, (name, trainer.step)
        for n, p in trainer.student.module.named_parameters():
            assert torch.equal(p.detach().float().cpu(), params_cp2[n]), (name, n)
        resumed[name] = _optimizer_state(trainer)
        trainer.close()
    a, b = resumed["per_rank"], resumed["gathered"]
    assert len(a) == len(b) > 0
    for i, (x, y) in enumerate(zip(a, b)):
        for u, v in zip(x[:3], y[:3]):
            assert torch.equal(u, v), i
        assert x[3] == y[3], i
    print(f"\n{len(a)} master/optimizer tensors equal after a CP=2 -> CP=1 resume in both formats")
