"""The quickstart end to end at toy sizes (the full run is measured by hand: docs/quickstart.md), and
examples/configs/quickstart.yaml staying equal to the config the quickstart builds in code."""

import json
from pathlib import Path

import pytest

import megatron_rcm.quickstart as qs
from megatron_rcm.cli import main
from megatron_rcm.config import load_config
from megatron_rcm.config.loader import to_dict
from megatron_rcm.config.schema import ConfigError
from megatron_rcm.quickstart import QUICKSTART_OVERRIDES, QuickstartOptions, run_quickstart

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_matches_the_embedded_config():
    assert to_dict(load_config(ROOT / "examples/configs/quickstart.yaml")) == to_dict(
        load_config(None, QUICKSTART_OVERRIDES))


SMALL = ["model.overrides.num_layers=1", "model.overrides.hidden_size=48", "model.overrides.ffn_hidden_size=96",
         "data.micro_batch_size=8", "distill.tangent_warmup=2"]


def toy_options(out, **kw) -> QuickstartOptions:
    kw = {"teacher_steps": 6, "teacher_batch": 16, "distill_steps": 4, "methods": ("rcm", "dmd"),
          "teacher_sample_steps": 3, "overrides": SMALL, "progress": False, **kw}
    return QuickstartOptions(output_dir=str(out), **kw)


def test_quickstart_pipeline_at_toy_size(tmp_path):
    opts = toy_options(tmp_path)
    result = run_quickstart(opts)
    rows = result["metrics"]
    expected = {"real digits (held-out)", "teacher 3-step (CFG 2)"} | {
        f"{m} student {n}-step" for m in ("rcm", "dmd") for n in (1, 2, 4)}
    assert set(rows) == expected
    for name, m in rows.items():
        assert set(m) == {"class_acc", "precision", "recall", "diversity", "fd", "fd_teacher", "mse_teacher"}, name
        assert 0.0 <= m["class_acc"] <= 1.0 and m["fd"] >= 0.0 and m["fd_teacher"] >= -1e-6
    assert rows["real digits (held-out)"]["class_acc"] > 0.9  # the classifier is trained on real data
    assert rows["real digits (held-out)"]["mse_teacher"] is None  # real digits do not share the noise
    assert abs(rows["teacher 3-step (CFG 2)"]["fd_teacher"]) < 1e-6
    assert rows["teacher 3-step (CFG 2)"]["mse_teacher"] == 0.0
    for m in ("rcm", "dmd"):
        for n in (1, 2, 4):
            assert rows[f"{m} student {n}-step"]["mse_teacher"] > 0.0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == rows
    for name in ("grid_rcm.png", "grid_dmd.png", "grid_all.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert (tmp_path / "teacher" / "metadata.json").is_file()


@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to train the teacher fails the test: the checks must come first."""

    def trained(*_a, **_k):
        raise AssertionError("the teacher was trained before the options were checked")

    monkeypatch.setattr(qs, "_train_teacher", trained)


@pytest.mark.parametrize("kw,match", [
    ({"methods": ("rcm", "bogus")}, r"unknown method\(s\) 'bogus' in --methods rcm,bogus; choose from rcm,scm,dmd"),
    ({"methods": ()}, "--methods is empty"),
    ({"methods": ("rcm", "rcm")}, "names a method twice"),
    ({"student_steps": (1, 9)}, r"student_steps \(1, 9\) must be in 1..4"),
    ({"distill_steps": 0}, "distill_steps must be >= 1"),
    ({"overrides": [*SMALL, "distill.tangent_warmup_form=sCM"]}, "tangent_warmup_form"),
])
def test_bad_options_are_refused_before_the_teacher_is_trained(tmp_path, no_training, kw, match):
    with pytest.raises(ConfigError, match=match):
        run_quickstart(toy_options(tmp_path / "out", **kw))
    assert list(tmp_path.iterdir()) == []  # nothing created, not even the temporary folder


def test_output_that_is_a_file_or_a_foreign_folder_is_refused(tmp_path, no_training):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    with pytest.raises(ConfigError, match=r"results.txt exists and is not a folder"):
        run_quickstart(toy_options(f))
    home = tmp_path / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds 1 entry a quickstart does not write \(thesis\)"):
        run_quickstart(toy_options(home))
    assert f.read_text() == "keep me" and (home / "thesis").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "results.txt"]


def test_cli_reports_bad_methods_as_a_config_error(tmp_path, no_training, capsys):
    assert main(["quickstart", "--methods", "rcm,sCM", "--output-dir", str(tmp_path / "out")]) == 2
    assert "unknown method(s) 'sCM'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def previous_run(out: Path):
    """What an earlier quickstart with methods rcm, dmd left."""
    (out / "dmd").mkdir(parents=True)
    (out / "dmd" / "metrics.jsonl").write_text("{}\n")
    (out / "grid_dmd.png").write_bytes(b"old")
    (out / "grid_rcm.png").write_bytes(b"old")
    (out / "metrics.json").write_text(json.dumps({"metrics": {"dmd student 1-step": {}}}))


def test_a_failed_run_keeps_the_previous_results_and_reports_leftovers(tmp_path, monkeypatch, capsys):
    out = tmp_path / "qs"
    previous_run(out)
    (tmp_path / ".qs.tmp-killed").mkdir()  # what a kill -9 of an earlier run leaves

    def fails(opts, base, work, out_, say):
        (work / "metrics.json").write_text("half")
        raise RuntimeError("distillation diverged")

    monkeypatch.setattr(qs, "_run", fails)
    with pytest.raises(RuntimeError, match="diverged"):
        run_quickstart(toy_options(out))
    assert (out / "grid_dmd.png").read_bytes() == b"old" and "dmd student" in (out / "metrics.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".qs.tmp-killed", "qs"]  # its own temp folder removed
    assert str(tmp_path / ".qs.tmp-killed") in capsys.readouterr().out


def test_a_second_run_replaces_the_previous_results_as_a_whole(tmp_path):
    out = tmp_path / "qs"
    previous_run(out)
    result = run_quickstart(toy_options(out, methods=("rcm",), student_steps=(1,)))
    assert sorted(p.name for p in out.iterdir()) == ["grid_all.png", "grid_rcm.png", "metrics.json", "rcm", "teacher"]
    assert (out / "grid_rcm.png").read_bytes() != b"old"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == result["metrics"] and "dmd student 1-step" not in saved["metrics"]
    assert saved["grids"]["rcm"] == str(out / "grid_rcm.png")
    assert (out / "rcm" / "metrics.jsonl").is_file() and (out / "teacher" / "metadata.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["qs"]  # no temporary or old folder left
