"""The rCM trainer on the tiny Cosmos DiTs under context parallelism equals CP=1: a student step (sCM + DMD)
and a critic step; losses, their diagnostics, gradient norms and the student, critic and EMA weights after
the steps.

Text2Image at 15 tokens (a 6 x 10 latent: not divisible by CP = 2, the last shard is padded; ring and Ulysses)
and Video2World with its clean conditioning frame and condition-mask channel at 27 tokens (3 frames of 9, a
timestep per frame: the shards start mid-frame). CP=2 runs as 2 gloo processes on CPU, CP=1 in the test
process; float32, so the tolerance is round-off (1e-5 relative), as in tests/test_train_cp.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.config import load_config
from tests.dist_helpers import history_errors, spawn

TOL = 1e-5
STEPS = 2  # tangent_warmup 0, one student step in 2: step 0 student (sCM + DMD), step 1 critic
COMMON = [
    "model.params_dtype=fp32",
    "data.source=mock",
    "data.micro_batch_size=2",
    "data.text_len=4",
    "data.text_dim=16",
    "distill.algorithm=rcm",
    "distill.timestep_scale=1.0",
    "distill.tangent_warmup=0",
    "distill.student_update_freq=2",
    "optimizer.lr=1e-3",
    "optimizer.critic_lr=1e-3",
    "optimizer.warmup_steps=1",
    # as tests/test_train_cp.py: AdamW (beta1 = 0) moves a weight by ~lr sign(g) when |g| << eps; a larger eps
    # keeps the step proportional to g, so round-off gradient entries compare at round-off in the weights
    "optimizer.eps=1e-2",
    "logging.progress_bar=false",
    "logging.log_every=1000",
    "logging.sample_every=0",
    f"training.max_steps={STEPS}",
    "training.seed=3",
]
KINDS = {
    "t2i": [
        "model.preset=cosmos-tiny-t2i",
        "model.overrides={in_channels: 2, out_channels: 2, text_dim: 16, num_layers: 2, hidden_size: 48,"
        " ffn_hidden_size: 96, num_attention_heads: 4, adaln_lora_dim: 8}",
        "data.latent_shape=[2,1,6,10]",
        "distill.guidance=2.0",
    ],
    "v2w": [
        "model.preset=cosmos-tiny-v2w",
        "model.overrides={in_channels: 3, out_channels: 2, text_dim: 16, num_layers: 2, hidden_size: 48,"
        " ffn_hidden_size: 96, num_attention_heads: 4, adaln_lora_dim: 8}",
        "data.latent_shape=[2,3,6,6]",
        # guided teacher: at step 0 the critic is the teacher, so unguided x_fake = x_real and L_DMD would be
        # round-off (nothing to compare)
        "distill.guidance=2.0",
        "distill.condition_frames=1",
        "distill.condition_mask_channel=true",
    ],
}
RUNS = [("t2i", "p2p"), ("t2i", "a2a"), ("v2w", "p2p"), ("v2w", "a2a")]


def _cfg(path, kind, cp=1, comm="p2p"):
    return load_config(None, [*COMMON, *KINDS[kind], f"parallel.context_parallel={cp}",
                              f"parallel.cp_comm_type={comm}", f"training.output_dir={path}"])


def _run(cfg):
    from megatron_rcm.training import Trainer

    trainer = Trainer(cfg)
    before = {k: v.detach().clone() for k, v in trainer.student.module.named_parameters()}
    history = trainer.train()
    weights = {f"student.{k}": v.detach().clone() for k, v in trainer.student.module.named_parameters()}
    weights.update({f"critic.{k}": v.detach().clone() for k, v in trainer.critic.module.named_parameters()})
    weights.update({f"ema.{k}": v.clone() for k, v in trainer.ema.shadow.items()})
    weights["student moved"] = torch.tensor(float(any(
        not torch.equal(before[k], weights[f"student.{k}"]) for k in before)))
    trainer.close()
    return history, weights


def _worker(rank, world, root):
    from megatron_rcm.parallel.state import destroy_parallel

    out = {(kind, comm): _run(_cfg(f"{root}/cp2-{kind}-{comm}", kind, 2, comm)) for kind, comm in RUNS}
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_rcm.parallel.state import destroy_parallel

    root = tmp_path_factory.mktemp("cosmos_cp")
    cp2 = spawn(_worker, 2, str(root))
    refs = {}
    for kind in KINDS:
        refs[kind] = _run(_cfg(root / f"cp1-{kind}", kind))
        destroy_parallel()
    return refs, cp2


@pytest.mark.parametrize("kind,comm", RUNS)
def test_cosmos_cp2_steps_equal_cp1(runs, kind, comm):
    refs, cp2 = runs
    ref_hist, ref_w = refs[kind]
    hist, w = cp2[(kind, comm)]
    assert len(hist) == len(ref_hist) == STEPS
    assert {"loss/scm", "loss/dmd"} <= set(ref_hist[0]) and "loss/critic" in ref_hist[1]
    assert ref_hist[0]["loss/dmd"] > 1e-6, ref_hist[0]["loss/dmd"]  # a real DMD term, not round-off
    errs = history_errors(ref_hist, hist)
    assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])
    assert w.keys() == ref_w.keys()
    werrs = {k: ((w[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)).item() for k, v in ref_w.items()}
    assert max(werrs.values()) <= TOL, max(werrs.items(), key=lambda kv: kv[1])
    assert ref_w["student moved"] == 1.0  # the student step changed the weights compared above


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
