"""The rCM trainer under the interleaved pipeline schedule (PP=2 x V=2) equals PP=1: the losses, diagnostics and
gradient norms of a warm-up student step, a student step, an rCM (sCM + DMD) student step and a critic step,
every parameter gradient of every step (each chunk's copy of the replicated conditioning embeddings checked on
its own), the weights after the optimizer steps (student, critic, EMA) and few-step samples; a PP=2 x V=2
checkpoint resumes at PP=1 and a PP=1 checkpoint at PP=2 x V=2 with bit-equal weights, and each continues two
steps as an uninterrupted PP=1 run does.

PP=2 x V=2 runs as 2 gloo processes on CPU: 4 layers, so each rank holds 2 chunks of one block (rank 0: blocks 0
and 2, rank 1: blocks 1 and 3), 4 pipeline micro-batches per network call (a multiple of PP, as Megatron's
interleaved schedule needs). PP=1 runs in the test process. Float32, so the tolerance is round-off (1e-5
relative): the chunks compute the same products, only sums over micro-batches, chunks and stages change order.
The negative: the replicated embeddings' gradient not summed across the chunks (chunk 1's copies unmarked, so
Megatron's ``finalize_model_grads`` leaves them out) must fail the gradient comparison.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist_helpers import COMPARED, history_errors, spawn
from tests.test_train_pp import STEPS, TOL, _cfg, _rel

PP, VP = 2, 2


def _vcfg(path, steps=STEPS, micro=4, vp=VP, pp=PP):
    cfg = _cfg(path, pp, steps=steps, micro=micro)
    cfg.parallel.virtual_pipeline = vp
    return cfg


def _gather(module, tensors):
    """{global key: [one tensor per copy]} of ``tensors`` (keyed like ``module.named_parameters``) over the
    pipeline group: a stage model's or each ``ModelChunks`` chunk's tensors, TP-gathered, global layer numbers;
    the replicated conditioning embeddings once per chunk and stage."""
    from megatron.core import parallel_state as ps

    from megatron_rcm.parallel.pipeline import ModelChunks, global_state_dict
    from megatron_rcm.parallel.sharding import gather_full_state_dict

    chunks = list(enumerate(module)) if isinstance(module, ModelChunks) else [(None, module)]
    local: dict[str, list] = {}
    for c, chunk in chunks:
        prefix = "" if c is None else f"{c}."
        saved = {n: p.data for n, p in chunk.named_parameters()}
        for n, p in chunk.named_parameters():
            p.data = tensors[prefix + n]
        try:
            part = global_state_dict(gather_full_state_dict(chunk), chunk.stage)
        finally:
            for n, p in chunk.named_parameters():
                p.data = saved[n]
        for k, v in part.items():
            local.setdefault(k, []).append(v.cpu())  # all_gather_object below pickles them
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return local
    parts = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
    out: dict[str, list] = {}
    for part in parts:
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    return out


def _weights(trainer):
    student = trainer.student.module
    w = {f"student.{k}": v for k, v in _gather(student, dict(student.named_parameters())).items()}
    critic = trainer.critic.module
    w.update({f"critic.{k}": v for k, v in _gather(critic, dict(critic.named_parameters())).items()})
    w.update({f"ema.{k}": v for k, v in _gather(student, trainer.ema.shadow).items()})
    return w


def _run(cfg, unsummed=False, unmark=None, setup=None):
    """(metrics per step, gradients per step, weights and samples after training, the weights right after a
    resume or None). ``unmark``: a parameter attribute removed from chunk 1's parameters (negatives);
    ``setup(trainer)``: called before training (negatives, a reference's data)."""
    from megatron_rcm.parallel.pipeline import REPLICATED_ATTR, ModelChunks
    from megatron_rcm.training import Trainer

    trainer = Trainer(cfg)
    start = _weights(trainer) if trainer.step > 0 else None
    if unsummed:  # the negative: chunk 1's copies of the conditioning embeddings left out of the sum
        unmark = REPLICATED_ATTR
    if unmark is not None:
        for net in (trainer.student, trainer.critic):
            assert isinstance(net.module, ModelChunks)
            for p in net.module[1].parameters():
                if getattr(p, unmark, False):
                    delattr(p, unmark)
    if setup is not None:
        setup(trainer)
    grads = []

    def on_step(tr, metrics):
        net = tr.student if metrics["is_student_step"] else tr.critic
        name = "student" if metrics["is_student_step"] else "critic"
        main = {n: p.main_grad for n, p in net.module.named_parameters()}
        grads.append({f"{name}.{k}": v for k, v in _gather(net.module, main).items()})

    history = trainer.train(on_step=on_step)
    weights = _weights(trainer)
    weights["samples 2-step"] = [trainer.sample(2, seed=11)]
    trainer.close()
    return history, grads, weights, start


def _worker(rank, world, path, steps, unsummed=False):
    from megatron_rcm.parallel.state import destroy_parallel

    out = _run(_vcfg(path, steps), unsummed)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """PP=1, STEPS steps; its checkpoint at step STEPS is under ``root/ref/ckpt``."""
    from megatron_rcm.parallel.state import destroy_parallel

    root = tmp_path_factory.mktemp("vpp-pp1")
    ref = _run(_cfg(root / "ref", micro=1))
    destroy_parallel()
    return root / "ref", ref


@pytest.fixture(scope="module")
def longer(tmp_path_factory):
    """PP=1, STEPS + 2 steps: what a resumed run must continue as."""
    from megatron_rcm.parallel.state import destroy_parallel

    out = _run(_cfg(tmp_path_factory.mktemp("vpp-pp1-long") / "long", steps=STEPS + 2, micro=1))
    destroy_parallel()
    return out


def _check_resumed(saved, start, continued, longer):
    """Bit-equal weights right after the resume; the two steps after it as the uninterrupted PP=1 run's (1e-5)."""
    saved = {k: v for k, v in saved.items() if not k.startswith("samples")}
    assert start.keys() == saved.keys()
    diffs = {f"{k} copy {i}/{j}": (a - b).abs().max().item()
             for k in saved for i, a in enumerate(saved[k]) for j, b in enumerate(start[k])}
    assert max(diffs.values()) == 0.0, max(diffs.items(), key=lambda kv: kv[1])
    hist, weights = continued
    l_hist, _, l_weights, _ = longer
    assert len(hist) == 2
    errs = {f"step {STEPS + i} {k}": abs(a[k] - b[k]) / max(abs(a[k]), 1e-30)
            for i, (a, b) in enumerate(zip(l_hist[STEPS:], hist, strict=True)) for k in a if k.startswith(COMPARED)}
    # not the samples: a resumed trainer samples the first batch it reads itself (the batch of step STEPS + 1)
    errs.update(_weight_errors({k: v for k, v in l_weights.items() if not k.startswith("samples")},
                               {k: v for k, v in weights.items() if not k.startswith("samples")}))
    assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])


def _grad_errors(ref_grads, grads):
    errs = {}
    for i, (a, b) in enumerate(zip(ref_grads, grads)):
        assert a.keys() == b.keys(), i
        for k, (want,) in a.items():
            errs.update({f"step {i} {k} copy {j}": _rel(got, want) for j, got in enumerate(b[k])})
    return errs


def _weight_errors(ref_w, w):
    assert w.keys() == ref_w.keys()
    return {f"{k} copy {j}": _rel(got, want) for k, (want,) in ref_w.items() for j, got in enumerate(w[k])}


def test_vpp_trainer_equals_pp1_and_resumes_at_pp1(reference, longer, tmp_path):
    from megatron_rcm.parallel.state import destroy_parallel

    ref_dir, (ref_hist, ref_grads, ref_w, _) = reference
    hist, grads, w, _ = spawn(_worker, PP, str(tmp_path / "vpp"), STEPS)
    assert len(hist) == len(ref_hist) == STEPS
    assert {"loss/scm", "loss/dmd"} <= set(ref_hist[2]) and "loss/critic" in ref_hist[3]
    errs = history_errors(ref_hist, hist)
    assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])
    # every block once, each conditioning embedding 4 times (2 chunks x 2 stages)
    assert len(grads[0]["student.time_embedding.linear_1.weight"]) == PP * VP
    gerrs = _grad_errors(ref_grads, grads)
    assert max(gerrs.values()) <= TOL, max(gerrs.items(), key=lambda kv: kv[1])
    werrs = _weight_errors(ref_w, w)
    assert max(werrs.values()) <= TOL, max(werrs.items(), key=lambda kv: kv[1])

    # the PP=2 x V=2 checkpoint (step STEPS, global layer numbering) resumes at PP=1 with the same weights and
    # continues as the uninterrupted PP=1 run (optimizer, scheduler, EMA count, RNG and data state restored)
    c_hist, _, c_w, start = _run(_cfg(tmp_path / "vpp", steps=STEPS + 2, micro=1))
    destroy_parallel()
    _check_resumed(w, start, (c_hist, c_w), longer)


def test_pp1_checkpoint_resumes_at_vpp(reference, longer, tmp_path):
    """The PP=1 reference's checkpoint loads into PP=2 x V=2 chunks (every copy bit-equal to PP=1's weights) and
    continues as the uninterrupted PP=1 run."""
    import shutil

    ref_dir, (_, _, ref_w, _) = reference
    shutil.copytree(ref_dir / "ckpt", tmp_path / "from-pp1" / "ckpt")  # the fixture's checkpoint stays as it is
    hist, _, w, start = spawn(_worker, PP, str(tmp_path / "from-pp1"), STEPS + 2)
    _check_resumed(ref_w, start, (hist, w), longer)


def test_unsummed_chunk_embedding_grads_fail(reference, tmp_path):
    """Without the sum across chunks, chunk 1's copies (and chunk 0's sums) miss gradient: far off PP=1."""
    _, (_, ref_grads, _, _) = reference
    _, grads, _, _ = spawn(_worker, PP, str(tmp_path / "unsummed"), 1, True)
    gerrs = _grad_errors(ref_grads[:1], grads)
    assert max(gerrs.values()) > 1e-2
    assert max(v for k, v in gerrs.items() if "blocks." in k) <= TOL  # the blocks' own gradients are unaffected


def _weights_worker(rank, world, pt_path, ckpt_dir):
    """Teacher weights into PP=2 x V=2 chunks (``load_weights``): from a full state-dict file, and from the
    chunks' own export; each chunk must hold exactly its part of the full model."""
    from megatron_rcm.parallel import pipeline
    from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
    from megatron_rcm.training.models import build_model, export_model, load_weights
    from tests.test_wan_pp import _config

    initialize_parallel(pipeline_parallel=PP, virtual_pipeline=VP)
    full_sd = torch.load(pt_path, weights_only=True)
    errs = {}
    for name, seed, source in (("file", 7, pt_path), ("export", 9, ckpt_dir)):
        chunks = build_model(_config("t2v"), seed)  # other draws, overwritten by the load
        assert isinstance(chunks, pipeline.ModelChunks) and len(chunks) == VP
        load_weights(chunks, source)
        for chunk in chunks:
            want = pipeline.stage_state_dict(full_sd, chunk.stage)
            got = dict(chunk.named_parameters())
            assert got.keys() == want.keys(), name
            errs.update({f"{name} {k}": (got[k] - want[k]).abs().max().item() for k in want})
        if name == "file":
            export_model(chunks, ckpt_dir)
    destroy_parallel()
    return errs


def test_teacher_weights_load_into_chunks_and_export(tmp_path):
    """``load_weights`` into ``ModelChunks`` (a full file, a chunks' export) and the chunks' export at PP=1."""
    from megatron_rcm.models.wan import WanModel
    from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
    from megatron_rcm.training.models import load_weights
    from tests.test_wan_pp import _config

    initialize_parallel(tensor_parallel=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        full_sd = {k: v.detach().clone() for k, v in WanModel(_config("t2v")).named_parameters()}
    destroy_parallel()
    torch.save(full_sd, tmp_path / "teacher.pt")
    errs = spawn(_weights_worker, PP, str(tmp_path / "teacher.pt"), str(tmp_path / "export"))
    assert max(errs.values()) == 0.0, max(errs.items(), key=lambda kv: kv[1])
    initialize_parallel(tensor_parallel=1)
    model = WanModel(_config("t2v"))
    load_weights(model, tmp_path / "export")
    destroy_parallel()
    got = dict(model.named_parameters())
    assert max((got[k] - full_sd[k]).abs().max().item() for k in got) == 0.0


def test_vpp_config_errors_name_the_numbers(monkeypatch):
    from megatron_rcm.config.schema import ConfigError
    from megatron_rcm.training import Trainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    Trainer._check_layout(_vcfg("/nonexistent"))
    with pytest.raises(ConfigError, match=r"multiple of pipeline_parallel 2, got 3"):
        Trainer._check_layout(_vcfg("/nonexistent", micro=3))
    with pytest.raises(ConfigError, match=r"4 transformer layers do not split evenly over pipeline_parallel x "
                                          r"virtual_pipeline = 2 x 4 = 8"):
        Trainer._check_layout(_vcfg("/nonexistent", vp=4))
    with pytest.raises(ConfigError, match=r"virtual_pipeline 2 needs pipeline_parallel > 1"):
        Trainer._check_layout(_vcfg("/nonexistent", pp=1))
    # sampling a batch that the micro-batches do not divide: 1F1B falls back to 1, the interleaved schedule can't
    from types import SimpleNamespace

    assert Trainer._pp_microbatches(SimpleNamespace(cfg=_vcfg("/nonexistent")), 8) == 4
    assert Trainer._pp_microbatches(SimpleNamespace(cfg=_vcfg("/nonexistent", vp=1)), 6) == 1
    with pytest.raises(ValueError, match=r"sampling a batch of 6 .* parallel.pipeline_microbatches 4 does not divide it"):
        Trainer._pp_microbatches(SimpleNamespace(cfg=_vcfg("/nonexistent")), 6)


if __name__ == "__main__":
    torch.set_num_threads(1)
    pytest.main([__file__, "-q"])
