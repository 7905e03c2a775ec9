"""The trainer end to end on a tiny Wan DiT: a short rCM run on a briefly pre-trained teacher reduces its
losses, measured with fixed randomness before and after; sample grids, metrics.jsonl and the fallback log."""

import json

import torch

from megatron_rcm.config import load_config
from megatron_rcm.rcm import Conditioning, DistillBatch, TrigFlowDenoiser, euler_sample
from megatron_rcm.training import Trainer
from megatron_rcm.training.models import build_model, build_wan_config
from megatron_rcm.training.teacher_pretrain import pretrain_teacher
from tests.test_ckpt_resume import TINY


def _teacher(cfg):
    from megatron_rcm.data.digits import DigitsSource
    from megatron_rcm.parallel.state import initialize_parallel

    initialize_parallel(1)
    model = build_model(build_wan_config(cfg.model, cfg.data, recompute=False), 0)
    losses = pretrain_teacher(model, DigitsSource(32, cfg.data.text_len, cfg.data.text_dim, seed=0), 150,
                              lr=3e-3, warmup_steps=10)
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20  # the teacher itself learned
    return model.requires_grad_(False)


@torch.no_grad()
def _measure(trainer, batch):
    """Fixed-randomness diagnostics: critic loss, and the 1-step student's distance to the teacher's
    20-step guided Euler solution from the same noise (what consistency distillation minimizes)."""
    cond = Conditioning(batch.context_BLD, neg_context=batch.neg_context_BLD)
    critic = 0.0
    for step in range(4):  # rollouts of 1..4 student steps (n = count mod N_max + 1)
        loss, _ = trainer.engine.critic_loss(trainer.student, trainer.critic, DistillBatch(batch.latent_BCFHW, cond),
                                             2 * step + 1, torch.Generator().manual_seed(5 + step))
        critic += float(loss)
    noise = torch.randn(batch.latent_BCFHW.shape, generator=torch.Generator().manual_seed(7))
    ode = euler_sample(TrigFlowDenoiser(trainer.teacher, 1000.0), noise, cond, guidance=trainer.cfg.distill.guidance,
                       num_steps=20, shift=1.0)
    one_step = trainer.sample(1, batch, use_ema=False, noise=noise)
    return float(critic), float((one_step - ode).square().mean())


def test_short_rcm_run_reduces_losses(tmp_path):
    cfg = load_config(None, [*TINY, "data.micro_batch_size=16", "training.max_steps=60", "distill.tangent_warmup=10",
                             "optimizer.lr=3e-4", "optimizer.critic_lr=1e-3",
                             f"training.output_dir={tmp_path}", "logging.sample_every=60", "logging.num_samples=4"])
    trainer = Trainer(cfg, teacher=_teacher(cfg))
    batch = trainer.data.next_batch()
    critic0, err0 = _measure(trainer, batch)
    history = trainer.train()
    critic1, err1 = _measure(trainer, batch)
    assert critic1 < 0.9 * critic0, (critic0, critic1)
    assert err1 < 0.8 * err0, (err0, err1)
    kinds = {m["is_student_step"] for m in history}
    assert kinds == {0.0, 1.0}
    assert all(m["scm/nonfinite"] == 0 for m in history if "scm/nonfinite" in m)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 60 and {"loss/critic", "grad_norm/critic", "tokens_per_s", "memory_gib"} <= set(lines[-1] | lines[-2])
    assert (tmp_path / "samples" / "step_00000060.png").is_file()


def test_accumulation_consumes_micro_batches(tmp_path):
    cfg = load_config(None, [*TINY, "distill.algorithm=scm", "optimizer.grad_accumulation_steps=3",
                             "training.max_steps=2", f"training.output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    history = trainer.train()
    assert trainer.data.state_dict()["cursor"] == 2 * 3 * 4  # steps x micro-batches x batch size
    assert trainer.critic is None and all(m["is_student_step"] == 1.0 for m in history)
    assert history[0]["lr/student"] == 1e-3 / 3  # warm-up step 1 of 3
