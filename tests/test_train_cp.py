"""The rCM trainer under context parallelism equals CP=1: sCM, DMD and critic losses, their diagnostics,
gradient norms, the weights after the optimizer steps (student, critic, EMA) and few-step samples; a CP=2
checkpoint resumes at CP=1 and at CP=4.

CP=2 (ring and Ulysses) runs as 2 gloo processes on CPU, CP=1 in the test process; float32, so the
tolerance is round-off (1e-5 relative). The negative: with the sCM target g normalized by the norm of this
rank's token shard instead of the whole sample, the same comparison fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from megatron_rcm.config import load_config
from tests.dist_helpers import history_errors, spawn
from tests.test_ckpt_resume import TINY

TOL = 1e-5
STEPS = 4  # student sCM, student sCM, student sCM + DMD, critic (tangent_warmup 2, one student step in 2)


def _cfg(path, cp=1, comm="p2p", steps=STEPS):
    """Checkpoints every STEPS steps into path/ckpt; a run resumes from there (checkpoint.resume=auto)."""
    extra = [f"parallel.context_parallel={cp}", f"parallel.cp_comm_type={comm}", f"training.max_steps={steps}",
             f"training.output_dir={path}", f"checkpoint.dir={path}/ckpt", f"checkpoint.save_every={STEPS}",
             f"logging.sample_every={STEPS}"]
    # AdamW with beta1 = 0 steps by g / (sqrt(v) + eps) ~ sign(g) * lr: with the default eps (1e-8) a gradient
    # entry at round-off level (|g| ~ 1e-12, exactly 0 at CP=1) moves its weight by a full lr either way. A
    # larger eps keeps the step proportional to g there, so the weights compare at round-off like the grads.
    extra.append("optimizer.eps=1e-2")  # d(step)/dg <= lr / eps = 0.1
    return load_config(None, [*TINY, *extra])


def _run(cfg):
    from megatron_rcm.training import Trainer

    trainer = Trainer(cfg)
    history = trainer.train()
    weights = {f"student.{k}": v.detach().clone() for k, v in trainer.student.module.named_parameters()}
    weights.update({f"critic.{k}": v.detach().clone() for k, v in trainer.critic.module.named_parameters()})
    weights.update({f"ema.{k}": v.clone() for k, v in trainer.ema.shadow.items()})
    # sampling is collective under CP (every rank calls it); rank 0 writes the grid
    weights["samples 2-step"] = trainer.sample(2, seed=11)
    grid = trainer.save_samples(Path(cfg.training.output_dir) / "grid.png")
    weights["grid written"] = torch.tensor(float(grid.is_file()))
    loop_grid = Path(cfg.training.output_dir) / "samples" / f"step_{STEPS:08d}.png"  # written inside train()
    weights["grid in the loop written"] = torch.tensor(float(loop_grid.is_file()))
    trainer.close()
    return history, weights


def _per_shard_normalize(g, eps=0.1):
    """The bug a sequence-sharded loss invites: ||g|| over this CP rank's tokens instead of the sample."""
    from megatron_rcm.models.wan.model import patchify
    from megatron_rcm.parallel.context import token_shard

    g = g.to(torch.float64)
    tokens = patchify(g, (1, 2, 2))  # [S, B, P]
    local = token_shard(tokens.shape[0]).shard(tokens)
    norm_B = torch.linalg.vector_norm(local.transpose(0, 1).flatten(1), dim=1)
    return g / (norm_B + eps).view(-1, 1, 1, 1, 1), norm_B


def _worker(rank, world, root):
    from megatron_rcm.parallel.state import destroy_parallel
    from megatron_rcm.rcm import scm

    out = {comm: _run(_cfg(f"{root}/cp2-{comm}", 2, comm)) for comm in ("p2p", "a2a")}
    good = scm.normalize_per_sample
    scm.normalize_per_sample = _per_shard_normalize
    try:
        out["per-shard g"] = _run(_cfg(f"{root}/cp2-broken", 2, "p2p", steps=1))
    finally:
        scm.normalize_per_sample = good
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def cp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cp")


@pytest.fixture(scope="module")
def runs(cp_root):
    from megatron_rcm.parallel.state import destroy_parallel

    root = cp_root
    cp2 = spawn(_worker, 2, str(root))
    # the CP=2 checkpoint (step 4) copied before the CP=1 resume below adds its own to the directory
    shutil.copytree(root / "cp2-p2p" / "ckpt", root / "cp2-for-cp4" / "ckpt")
    ref = _run(_cfg(root / "cp1"))
    resumed = _run(_cfg(root / "cp2-p2p", steps=STEPS + 2))  # CP=2 checkpoint at CP=1
    longer = _run(_cfg(root / "cp1-long", steps=STEPS + 2))
    destroy_parallel()
    return ref, cp2, resumed, longer


def _worker_cp4(rank, world, root):
    from megatron_rcm.parallel.state import destroy_parallel

    out = _run(_cfg(f"{root}/cp2-for-cp4", 4, "p2p", steps=STEPS + 2))
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def resumed_cp4(runs, cp_root):
    """The CP=2 run's step-4 checkpoint resumed by 4 gloo processes at CP=4 (ring) for steps 4 and 5."""
    return spawn(_worker_cp4, 4, str(cp_root))


def _weight_errors(ref_w, got_w):
    return {k: ((got_w[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)).item() for k, v in ref_w.items()}


@pytest.mark.parametrize("comm", ["p2p", "a2a"])
def test_cp2_step_equals_cp1(runs, comm):
    (ref_hist, ref_w), cp2, _, _ = runs
    hist, w = cp2[comm]
    assert len(hist) == len(ref_hist) == STEPS
    assert {"loss/scm", "loss/dmd"} <= set(ref_hist[2]) and "loss/critic" in ref_hist[3]
    errs = history_errors(ref_hist, hist)
    assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])
    werrs = _weight_errors(ref_w, w)
    assert max(werrs.values()) <= TOL, max(werrs.items(), key=lambda kv: kv[1])
    assert w["grid written"] == 1.0 and w["grid in the loop written"] == 1.0 and werrs["samples 2-step"] <= TOL


def test_per_shard_g_normalization_is_caught(runs):
    (ref_hist, _), cp2, _, _ = runs
    hist, _ = cp2["per-shard g"]
    err = abs(hist[0]["loss/scm"] - ref_hist[0]["loss/scm"]) / abs(ref_hist[0]["loss/scm"])
    assert err > 1e-2, err


def test_cp2_checkpoint_resumes_at_cp1(runs):
    _, _, (resumed_hist, resumed_w), (long_hist, long_w) = runs
    assert len(resumed_hist) == 2  # steps 4 and 5, after the CP=2 run's checkpoint at step 4
    errs = history_errors(long_hist[STEPS:], resumed_hist)
    assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])
    # samples use the first batch each trainer saw (step 4's after the resume, step 0's otherwise): not compared
    weights = {k: v for k, v in long_w.items() if not k.startswith(("samples", "grid"))}
    werrs = _weight_errors(weights, resumed_w)
    assert max(werrs.values()) <= TOL, max(werrs.items(), key=lambda kv: kv[1])


def test_layout_errors_name_the_numbers(monkeypatch):
    from megatron_rcm.config.schema import ConfigError
    from megatron_rcm.training import Trainer

    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by TP x CP x PP = 1 x 4 x 1 = 4"):
        Trainer._check_layout(_cfg("/nonexistent", cp=4))
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match=r"4 heads per tensor-parallel rank are not divisible by "
                                          r"context_parallel 8; use cp_comm_type 'p2p'"):
        Trainer._check_layout(_cfg("/nonexistent", cp=8, comm="a2a"))
    Trainer._check_layout(_cfg("/nonexistent", cp=8, comm="p2p"))


def test_720p_example_config_is_a_valid_cp_layout(monkeypatch):
    from megatron_rcm.training import Trainer

    path = Path(__file__).resolve().parents[1] / "examples" / "configs" / "wan2.1_t2v_14b_720p.yaml"
    cfg = load_config(path, ["data.path=/shards"])
    C, F, H, W = cfg.data.latent_shape
    assert (C, F, H, W) == (16, 21, 90, 160) and F * (H // 2) * (W // 2) == 75_600
    assert (cfg.parallel.tensor_parallel, cfg.parallel.context_parallel) == (4, 2)
    monkeypatch.setenv("WORLD_SIZE", "128")  # 16 nodes of 8 GPUs: DP = 16
    Trainer._check_layout(cfg)


def test_cp2_checkpoint_resumes_at_cp4(runs, resumed_cp4):
    """CP-agnostic checkpoints the other way: the CP=2 checkpoint continues at CP=4 (each rank loads the whole
    replicated model and optimizer state; the token sharding is not in the checkpoint) like CP=1 uninterrupted."""
    _, _, _, (long_hist, long_w) = runs
    resumed_hist, resumed_w = resumed_cp4
    assert len(resumed_hist) == 2
    errs = history_errors(long_hist[STEPS:], resumed_hist)
    assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])
    weights = {k: v for k, v in long_w.items() if not k.startswith(("samples", "grid"))}
    werrs = _weight_errors(weights, resumed_w)
    assert max(werrs.values()) <= TOL, max(werrs.items(), key=lambda kv: kv[1])
