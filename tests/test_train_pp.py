"""The rCM trainer under pipeline parallelism equals PP=1: sCM, DMD and critic losses, their diagnostics,
gradient norms, every parameter gradient of every step (student and critic), the weights after the optimizer
steps (student, critic, EMA) and few-step samples; a PP=2 checkpoint resumes at PP=1.

PP=2, PP=4, PP=2 x TP=2 and PP=2 x CP=2 run as gloo processes on CPU with 4 pipeline micro-batches per network
call (Megatron's schedules: forward-only and 1F1B); PP=1 runs in the test process. Under PP x CP Megatron's
schedule multiplies each loss by CP, which ``PipelinedNet`` undoes (the trainer already scales by CP). Float32, so the tolerance is
round-off (1e-5 relative): the stages compute the same products, only sums over micro-batches and stages
change order.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from megatron_rcm.config import load_config
from tests.dist_helpers import COMPARED, history_errors, spawn

TOL = 1e-5
STEPS = 4  # student sCM, student sCM, student sCM + DMD, critic (tangent_warmup 2, one student step in 2)
TINY4 = [  # tests/test_ckpt_resume.py's TINY with 4 layers (PP=4 needs them)
    "model.params_dtype=fp32",
    "model.overrides={in_channels: 1, out_channels: 1, text_dim: 16, num_layers: 4, hidden_size: 48,"
    " ffn_hidden_size: 96, num_attention_heads: 4, freq_dim: 32}",
    "data.source=digits", "data.micro_batch_size=4", "data.text_len=4", "data.text_dim=16",
    "data.latent_shape=[1,1,8,8]",
    "distill.algorithm=rcm", "distill.guidance=2.0", "distill.tangent_warmup=2", "distill.student_update_freq=2",
    "optimizer.lr=1e-3", "optimizer.critic_lr=1e-3", "optimizer.warmup_steps=3",
    "logging.progress_bar=false", "logging.log_every=1000", "training.seed=3",
]


def _cfg(path, pp=1, tp=1, steps=STEPS, micro=4, cp=1, sets=()):
    extra = [f"parallel.pipeline_parallel={pp}", f"parallel.tensor_parallel={tp}", f"parallel.context_parallel={cp}",
             f"parallel.pipeline_microbatches={micro}", f"training.max_steps={steps}",
             f"training.output_dir={path}", f"checkpoint.dir={path}/ckpt", f"checkpoint.save_every={STEPS}",
             f"logging.sample_every={STEPS}",
             "optimizer.eps=1e-2"]  # as tests/test_train_cp.py: round-off gradients move weights by round-off
    return load_config(None, [*TINY4, *extra, *sets])


def _full_weights(module, prefix):
    grads_like = {n: p.detach() for n, p in module.named_parameters()}
    return {f"{prefix}.{k}": v for k, v in _gather(module, grads_like).items()}


def _gather(module, tensors):
    from megatron.core import parallel_state as ps

    from megatron_rcm.parallel.pipeline import global_state_dict
    from megatron_rcm.parallel.sharding import gather_full_state_dict

    saved = {n: p.data for n, p in module.named_parameters()}
    for n, p in module.named_parameters():
        p.data = tensors[n]
    try:
        local = global_state_dict(gather_full_state_dict(module), module.stage)
    finally:
        for n, p in module.named_parameters():
            p.data = saved[n]
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return local
    parts = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
    return {k: v for part in parts for k, v in part.items()}


def _run(cfg):
    from megatron_rcm.training import Trainer

    trainer = Trainer(cfg)
    grads = []

    def on_step(tr, metrics):
        net = tr.student if metrics["is_student_step"] else tr.critic
        name = "student" if metrics["is_student_step"] else "critic"
        grads.append({f"{name}.{k}": v for k, v in
                      _gather(net.module, {n: p.main_grad for n, p in net.module.named_parameters()}).items()})

    history = trainer.train(on_step=on_step)
    weights = _full_weights(trainer.student.module, "student")
    weights.update(_full_weights(trainer.critic.module, "critic"))
    weights.update({f"ema.{k}": v for k, v in _gather(trainer.student.module, trainer.ema.shadow).items()})
    weights["samples 2-step"] = trainer.sample(2, seed=11)
    trainer.close()
    return history, grads, weights


def _worker(rank, world, root, pp, tp, cp=1, sets=()):
    from megatron_rcm.parallel.state import destroy_parallel

    out = _run(_cfg(f"{root}/pp{pp}-tp{tp}-cp{cp}", pp, tp, cp=cp, sets=sets))
    destroy_parallel()
    return out


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from megatron_rcm.parallel.state import destroy_parallel

    root = tmp_path_factory.mktemp("pp1")
    ref = _run(_cfg(root / "ref", micro=1))
    destroy_parallel()
    return ref


SELECTIVE = ("model.recompute=true", "model.recompute_granularity=selective")
"""Selective recompute inside the stages (the replay's backward re-runs the blocks less their attention cores);
float32 selective is bit-equal to no recompute (tests/test_recompute_selective.py), so the reference holds."""


@pytest.mark.parametrize("pp,tp,cp,sets", [(2, 1, 1, ()), (4, 1, 1, ()), (2, 2, 1, ()), (2, 1, 2, ()),
                                           (2, 1, 1, SELECTIVE)])
def test_pp_step_equals_pp1(reference, tmp_path, pp, tp, cp, sets):
    ref_hist, ref_grads, ref_w = reference
    hist, grads, w = spawn(_worker, pp * tp * cp, str(tmp_path), pp, tp, cp, sets)
    assert len(hist) == len(ref_hist) == STEPS
    assert {"loss/scm", "loss/dmd"} <= set(ref_hist[2]) and "loss/critic" in ref_hist[3]
    errs = history_errors(ref_hist, hist)
    assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])
    for i, (a, b) in enumerate(zip(ref_grads, grads)):
        assert a.keys() == b.keys(), i
        gerrs = {k: _rel(b[k], v) for k, v in a.items()}
        worst = max(gerrs, key=gerrs.get)
        assert gerrs[worst] <= TOL, (i, worst, gerrs[worst])
    assert w.keys() == ref_w.keys()
    werrs = {k: _rel(w[k], v) for k, v in ref_w.items()}
    assert max(werrs.values()) <= TOL, max(werrs.items(), key=lambda kv: kv[1])


def test_pp2_checkpoint_resumes_at_pp1(tmp_path):
    """A PP=2 run's checkpoint (global layer numbering) resumes at PP=1 and continues as a PP=1 run does."""
    from megatron_rcm.parallel.state import destroy_parallel

    spawn(_worker, 2, str(tmp_path), 2, 1)  # writes tmp_path/pp2-tp1-cp1/ckpt at step STEPS
    resumed = _run(_cfg(tmp_path / "pp2-tp1-cp1", steps=STEPS + 2, micro=1))
    longer = _run(_cfg(tmp_path / "pp1-long", steps=STEPS + 2, micro=1))
    destroy_parallel()
    r_hist, l_hist = resumed[0], longer[0][STEPS:]
    assert len(r_hist) == len(l_hist) == 2
    for a, b in zip(l_hist, r_hist):
        for k in (k for k in a if k.startswith(COMPARED)):
            assert abs(a[k] - b[k]) <= TOL * max(abs(a[k]), 1e-30), k
    werrs = {k: _rel(resumed[2][k], v) for k, v in longer[2].items() if not k.startswith("samples")}
    assert max(werrs.values()) <= TOL, max(werrs.items(), key=lambda kv: kv[1])


def test_pipeline_layout_errors_name_the_numbers(monkeypatch):
    from megatron_rcm.config.schema import ConfigError
    from megatron_rcm.training import Trainer

    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ConfigError, match=r"4 transformer layers do not split evenly over pipeline_parallel x "
                                          r"virtual_pipeline = 3 x 1 = 3"):
        Trainer._check_layout(_cfg("/nonexistent", pp=3))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"world size 4 is not divisible by TP x CP x PP = 1 x 1 x 8 = 8"):
        Trainer._check_layout(_cfg("/nonexistent", pp=8))
    cfg = _cfg("/nonexistent", pp=2, micro=2)
    cfg.parallel.virtual_pipeline = 4
    with pytest.raises(ConfigError, match=r"4 transformer layers do not split evenly over pipeline_parallel x "
                                          r"virtual_pipeline = 2 x 4 = 8"):
        Trainer._check_layout(cfg)
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by TP x CP x PP = 1 x 2 x 2 = 4"):
        Trainer._check_layout(_cfg("/nonexistent", pp=2, cp=2))
    monkeypatch.setenv("WORLD_SIZE", "8")
    Trainer._check_layout(_cfg("/nonexistent", pp=2, cp=2))
    monkeypatch.setenv("WORLD_SIZE", "4")
    Trainer._check_layout(_cfg("/nonexistent", pp=4))


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
