"""Checkpoint hardening (issue 16, items 5 and 6, and the metrics numbering):

* a broken newest checkpoint (bad ``latest``, missing or truncated metadata, truncated ``.distcp``) is
  skipped by ``checkpoint.resume: auto`` with a warning naming it, and refused with an error naming it and
  what is wrong when pinned; a load that fails anyway names the checkpoint directory;
* ``meta.json`` stores the run's config; resuming with another architecture or algorithm is refused with
  the differing keys, other changes (lr, seed, batch size, max_steps) are warned about, layout is ignored;
* ``metrics.jsonl`` numbers steps 1-based like the console and the checkpoints, once each after a resume.
"""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

import megatron_rcm.training.trainer as trainer_mod
from megatron_rcm.config import load_config
from megatron_rcm.training import CheckpointManager, Trainer
from megatron_rcm.training.checkpoint import CheckpointError, check_intact, config_changes, read_meta
from tests.test_ckpt_resume import TINY


def _args(out, max_steps, save_every=2, extra=()):
    return [*TINY, f"training.max_steps={max_steps}", f"training.output_dir={out}", f"checkpoint.dir={out / 'ckpt'}",
            f"checkpoint.save_every={save_every}", *extra]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A run of 4 steps with checkpoints step_00000002 and step_00000004 (built once, copied per test)."""
    out = tmp_path_factory.mktemp("pristine") / "run"
    Trainer(load_config(None, _args(out, 4))).train()
    return out


@pytest.fixture
def run(pristine, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(pristine, out)
    return out


def _truncate(path, size=None):
    size = path.stat().st_size // 2 if size is None else size
    with open(path, "r+b") as f:
        f.truncate(size)


def _distcp(step_dir):
    return sorted(step_dir.glob("*.distcp"))[0]


# (name, corruption of the newest checkpoint step_00000004, words the error must contain)
CORRUPTIONS = [
    ("meta_missing", lambda d: (d / "meta.json").unlink(), "has no meta.json"),
    ("meta_truncated", lambda d: _truncate(d / "meta.json", 7), "unreadable meta.json"),
    ("mcore_metadata_truncated", lambda d: _truncate(d / "metadata.json", 5), "unreadable metadata.json"),
    ("metadata_missing", lambda d: (d / ".metadata").unlink(), "has no .metadata"),
    ("metadata_truncated", lambda d: _truncate(d / ".metadata"), "unreadable .metadata"),
    ("distcp_truncated", lambda d: _truncate(_distcp(d)), "truncated __"),
    ("distcp_missing", lambda d: _distcp(d).unlink(), "lacks __"),
    ("common_truncated", lambda d: _truncate(d / "common.pt"), "unreadable common.pt"),
]


@pytest.mark.parametrize("name,corrupt,words", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_broken_newest_checkpoint_auto_falls_back_pinned_refuses(run, caplog, name, corrupt, words):
    ckpt = run / "ckpt"
    newest, older = ckpt / "step_00000004", ckpt / "step_00000002"
    assert check_intact(newest) is None and check_intact(older) is None
    corrupt(newest)
    problem = check_intact(newest)
    assert problem is not None and words in problem, problem
    with caplog.at_level(logging.WARNING, logger="megatron_rcm.train"):
        assert CheckpointManager(ckpt).resolve_resume("auto") == older
    assert str(newest) in caplog.text and words in caplog.text
    with pytest.raises(CheckpointError, match=re.escape(str(newest)) + ".*" + re.escape(words)):
        CheckpointManager(ckpt).resolve_resume(str(newest))


@pytest.mark.parametrize("pointer", ["step_00000009\n", "garbage\x00\n", ""])
def test_bad_latest_pointer_falls_back_to_newest_intact(run, caplog, pointer):
    ckpt = run / "ckpt"
    (ckpt / "latest").write_text(pointer)
    with caplog.at_level(logging.WARNING, logger="megatron_rcm.train"):
        assert CheckpointManager(ckpt).resolve_resume("auto") == ckpt / "step_00000004"
    assert str(ckpt / "latest") in caplog.text


def test_run_resumed_past_a_bad_latest_pointer_finishes(run):
    """The end-of-run save check reads no pointer: a run resumed through the fallback ends normally."""
    (run / "ckpt" / "latest").write_text("garbage\n")
    trainer = Trainer(load_config(None, _args(run, 4)))
    assert trainer.step == 4
    assert trainer.train() == []  # nothing left to run; the checkpoint of step 4 exists: no save


def test_all_checkpoints_broken_is_an_error_naming_each(run):
    ckpt = run / "ckpt"
    for d in ("step_00000002", "step_00000004"):
        _truncate(_distcp(ckpt / d))
    with pytest.raises(CheckpointError) as info:
        CheckpointManager(ckpt).resolve_resume("auto")
    assert "step_00000002" in str(info.value) and "step_00000004" in str(info.value)


def test_trainer_resumes_from_newest_intact_and_refuses_pinned_broken_before_building(run, monkeypatch):
    ckpt = run / "ckpt"
    _truncate(_distcp(ckpt / "step_00000004"))
    trainer = Trainer(load_config(None, _args(run, 4)))
    assert trainer.step == 2 and trainer.resumed_from == ckpt / "step_00000002"

    def no_networks(*args, **kwargs):
        raise AssertionError("a network was built before the pinned checkpoint was checked")

    monkeypatch.setattr(trainer_mod, "build_model", no_networks)
    pinned = _args(run, 4, extra=[f"checkpoint.resume={ckpt / 'step_00000004'}"])
    with pytest.raises(CheckpointError, match="step_00000004.*truncated"):
        Trainer(load_config(None, pinned))


def test_load_failure_names_the_checkpoint(run):
    """Damage the intact check cannot see (bytes overwritten, sizes kept): the load error names the folder."""
    step_dir = run / "ckpt" / "step_00000004"
    data = _distcp(step_dir)
    size = data.stat().st_size
    data.write_bytes(b"\xff" * size)
    assert check_intact(step_dir) is None
    with pytest.raises(CheckpointError, match=re.escape(str(step_dir))):
        Trainer(load_config(None, _args(run, 4)))


# -- config stored in the checkpoint and compared on resume -----------------------------------------------
def test_meta_stores_the_config(pristine):
    meta = read_meta(pristine / "ckpt" / "step_00000004")
    assert meta["config"]["model"]["overrides"]["num_layers"] == 1
    assert meta["config"]["distill"]["algorithm"] == "rcm" and meta["config"]["training"]["seed"] == 3


def test_config_changes_classification():
    old = {"model": {"preset": "p", "overrides": {"num_layers": 1}}, "distill": {"algorithm": "rcm", "guidance": 2.0},
           "optimizer": {"lr": 1e-3}, "parallel": {"tensor_parallel": 1}, "training": {"seed": 3, "output_dir": "a"}}
    new = json.loads(json.dumps(old))
    assert config_changes(old, new) == ([], [])
    new["parallel"]["tensor_parallel"] = 2  # layout-agnostic checkpoints
    new["training"]["output_dir"] = "b"
    assert config_changes(old, new) == ([], [])
    new["model"]["overrides"]["num_layers"] = 2
    new["model"]["overrides"]["hidden_size"] = 64
    new["distill"]["algorithm"] = "scm"
    new["distill"]["guidance"] = 3.0
    new["optimizer"]["lr"] = 1e-4
    refused, warned = config_changes(old, new)
    assert refused == ["distill.algorithm: 'rcm' -> 'scm'", "model.overrides.hidden_size: '<absent>' -> 64",
                       "model.overrides.num_layers: 1 -> 2"]
    assert warned == ["distill.guidance: 2.0 -> 3.0", "optimizer.lr: 0.001 -> 0.0001"]


@pytest.mark.parametrize("change,key", [
    ("model.overrides.num_layers=2", "model.overrides.num_layers: 1 -> 2"),
    ("distill.algorithm=scm", "distill.algorithm: 'rcm' -> 'scm'"),
])
def test_resume_with_other_architecture_or_algorithm_is_refused(run, monkeypatch, change, key):
    monkeypatch.setattr(trainer_mod, "build_model", lambda *a, **k: pytest.fail("network built before the check"))
    with pytest.raises(CheckpointError, match=re.escape(key)):
        Trainer(load_config(None, _args(run, 6, extra=[change])))


def test_resume_with_other_lr_seed_batch_warns_and_resumes(run, caplog):
    extra = ["optimizer.lr=5e-4", "training.seed=4", "data.micro_batch_size=2", "parallel.distributed_optimizer=false"]
    with caplog.at_level(logging.WARNING, logger="megatron_rcm.train"):
        trainer = Trainer(load_config(None, _args(run, 6, extra=extra)))
    assert trainer.step == 4
    for line in ("optimizer.lr: 0.001 -> 0.0005", "training.seed: 3 -> 4", "data.micro_batch_size: 4 -> 2",
                 "training.max_steps: 4 -> 6"):
        assert line in caplog.text, caplog.text
    assert "parallel." not in caplog.text


# -- metrics.jsonl numbering ------------------------------------------------------------------------------
def _console_steps(text):
    return [int(m) for m in re.findall(r"^step (\d+) \(mean of last 1\)", text, re.M)]


def test_metrics_steps_match_console_and_checkpoints_once_each_after_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = _args(out, 6, save_every=3, extra=["logging.log_every=1"])
    Trainer(load_config(None, args)).train()
    console = _console_steps(capsys.readouterr().out)
    ckpt = out / "ckpt"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000003", "step_00000006"]
    assert console == [1, 2, 3, 4, 5, 6]

    resumed = Trainer(load_config(None, [*args, f"checkpoint.resume={ckpt / 'step_00000003'}"]))
    assert resumed.step == 3
    resumed.train()
    assert _console_steps(capsys.readouterr().out) == [4, 5, 6]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {f"step_{r['step']:08d}" for r in records} >= {p.name for p in ckpt.glob("step_*")}


def test_cli_reports_a_broken_pinned_checkpoint_with_exit_code_2(tmp_path, capsys):
    from megatron_rcm.cli import main

    broken = tmp_path / "ckpt" / "step_00000003"
    broken.mkdir(parents=True)
    (broken / "meta.json").write_text("{")
    config = Path(__file__).resolve().parents[1] / "examples/configs/quickstart.yaml"
    rc = main(["train", "--config", str(config), "--set", "data.source=mock",
               "--set", f"training.output_dir={tmp_path / 'out'}", "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
               "--set", f"checkpoint.resume={broken}"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint error" in err and str(broken) in err
