"""GPU path of the trainer: Megatron-Core DistributedOptimizer over bf16 params with fp32 master weights,
a short rCM run, and checkpoint resume. Run on the GPU machine: python -m pytest -m gpu tests/test_train_*.py"""

import pytest
import torch

from megatron_rcm.config import load_config
from tests.test_ckpt_resume import COMPARED, TINY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _cfg(tmp_path, name, max_steps, *extra):
    return load_config(None, [*TINY, "model.params_dtype=bf16", "parallel.distributed_optimizer=true",
                              f"training.max_steps={max_steps}", f"training.output_dir={tmp_path / name}",
                              f"checkpoint.dir={tmp_path / name / 'ckpt'}", "checkpoint.save_every=3", *extra])


def _inner_optimizers(opt):
    inner = opt.optimizer
    return getattr(inner, "chained_optimizers", [inner])


def test_distributed_optimizer_bf16_master_weights(tmp_path):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_rcm.training import Trainer
    from megatron_rcm.training.optim import MegatronOptimizer

    trainer = Trainer(_cfg(tmp_path, "a", 6))
    assert isinstance(trainer.opt_student, MegatronOptimizer) and isinstance(trainer.opt_critic, MegatronOptimizer)
    for opt in (trainer.opt_student, trainer.opt_critic):
        inner = _inner_optimizers(opt)
        assert all(isinstance(o, DistributedOptimizer) for o in inner)
        masters = [p for o in inner for g in o.optimizer.param_groups for p in g["params"]]
        assert masters and all(p.dtype == torch.float32 for p in masters)  # fp32 master shards
    assert all(p.dtype == torch.bfloat16 for p in trainer.student.module.parameters())
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    before = [p.detach().clone() for p in trainer.student.module.parameters()]
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(v)) for m in history for k, v in m.items() if k.startswith("loss/"))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.module.parameters()))


@pytest.mark.parametrize("fully_reshardable", [False, True])
def test_gpu_resume_matches_uninterrupted(tmp_path, fully_reshardable):
    from megatron_rcm.training import Trainer

    fmt = f"checkpoint.optim_fully_reshardable={str(fully_reshardable).lower()}"
    ref_trainer = Trainer(_cfg(tmp_path, "ref", 6, fmt))
    ref = ref_trainer.train()
    first = Trainer(_cfg(tmp_path, "run", 3, fmt)).train()
    resumed = Trainer(_cfg(tmp_path, "run", 6, fmt))
    assert resumed.step == 3
    got = first + resumed.train()
    # AdamW's step count (its bias correction) continues exactly across the resume, one per optimizer step
    for a_opt, b_opt in ((ref_trainer.opt_student, resumed.opt_student), (ref_trainer.opt_critic, resumed.opt_critic)):
        for a, b in zip(_inner_optimizers(a_opt), _inner_optimizers(b_opt)):
            a_steps = {float(s["step"]) for s in a.optimizer.state.values()}
            b_steps = {float(s["step"]) for s in b.optimizer.state.values()}
            assert len(a_steps) == 1 and a_steps == b_steps, (a_steps, b_steps)
    for i, (a, b) in enumerate(zip(ref, got)):
        for k in a:
            if k.startswith(COMPARED):
                # bf16 params and GPU reductions whose order may vary between runs (atomics in attention
                # backward / split-K GEMMs): equal up to accumulated rounding, far below step-to-step changes
                assert b[k] == pytest.approx(a[k], rel=2e-2, abs=1e-4), (i, k, a[k], b[k])
