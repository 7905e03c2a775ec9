"""Issue 16, data and start-up: atomic shard writing, refused unindexed folders, clear tool errors, and the
start-up checks of data.path, the negative prompt and the teacher checkpoint (before any network is built)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rcm.config import ConfigError, load_config
from megatron_rcm.data import ShardError, ShardWriter
from megatron_rcm.data.format import INDEX_FILE, NEGATIVE_FILE
from megatron_rcm.data.shards import ShardSource

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (4, 1, 4, 4)


def make_shards(*args):
    """Run tools/make_shards.py with this checkout's package first on the path (not an installed copy)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), *map(str, args)],
                          capture_output=True, text=True, env=env)


def _write(root, n=8, per_shard=2, neg=None, overwrite=False, prefix="s"):
    with ShardWriter(root, per_shard, neg, overwrite=overwrite) as w:
        for i in range(n):
            w.write(f"{prefix}{i:03d}", torch.randn(SHAPE), torch.randn(2, 8))


def _source(root):
    return ShardSource(root, 1, SHAPE, text_len=4, text_dim=8, seed=0)


def _loose(folder, n, bad=None):
    folder.mkdir()
    for i in range(n):
        torch.save(torch.randn(SHAPE), folder / f"v{i}.latent.pth")
        torch.save(torch.randn(2, 8), folder / f"v{i}.t5.pth")
    if bad is not None:
        (folder / f"v{bad}.latent.pth").write_bytes(b"not a tensor")


# -- the reader refuses what is not a complete, indexed data set ----------------------------------------
def test_folder_without_index_is_refused_naming_the_fix(tmp_path):
    _write(tmp_path / "d")
    (tmp_path / "d" / INDEX_FILE).unlink()  # what a failed make_shards run used to leave
    with pytest.raises(ShardError, match=rf"{tmp_path / 'd'} has no index.json.*4 \*.tar.*make_shards.py --index"):
        _source(tmp_path / "d")


@pytest.mark.parametrize("text", ["{not json", '{"version": 1}', '{"version": 1, "shards": [{"samples": []}]}',
                                  '{"version": 1, "shards": [{"name": "shard-000000.tar", "samples": [{"k": 1}]}]}'])
def test_malformed_index_is_a_shard_error(tmp_path, text):
    _write(tmp_path / "d")
    (tmp_path / "d" / INDEX_FILE).write_text(text)
    with pytest.raises(ShardError, match=r"index.json is not a valid shard index"):
        _source(tmp_path / "d")


def test_tar_missing_from_the_index_is_refused(tmp_path):
    _write(tmp_path / "d")
    (tmp_path / "d" / "shard-000009.tar").write_bytes((tmp_path / "d" / "shard-000000.tar").read_bytes())
    with pytest.raises(ShardError, match=r"\['shard-000009.tar'\] are not listed in .*index.json"):
        _source(tmp_path / "d")


# -- the writer is atomic ---------------------------------------------------------------------------------
def test_failed_write_leaves_no_output_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "d"
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(out, 2) as w:
        for i in range(5):
            w.write(f"s{i}", torch.randn(SHAPE), torch.randn(2, 8))
        raise RuntimeError("boom")
    assert not out.exists() and os.listdir(tmp_path) == []  # no partial tar, no temporary folder
    _write(out, n=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(out, 2, overwrite=True) as w:
        w.write("x0", torch.randn(SHAPE), torch.randn(2, 8))
        raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert os.listdir(tmp_path) == ["d"]


def test_rewrite_needs_overwrite_and_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "d"
    _write(out, n=8)  # 4 shards
    with pytest.raises(FileExistsError, match=rf"{out} exists and is not empty.*--overwrite"):
        ShardWriter(out, 2)
    _write(out, n=3, overwrite=True, prefix="t")  # 2 shards: shard-000002/3 of the first write must go
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert len(_source(out).samples) == 3 and os.listdir(tmp_path) == ["d"]


def test_leftover_temporary_folder_of_a_dead_writer_is_removed(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".d.tmp-{int(proc.stdout)}"  # a pid that has exited
    dead.mkdir()
    (dead / "shard-000000.tar").write_bytes(b"partial")
    _write(tmp_path / "d", n=2)
    assert os.listdir(tmp_path) == ["d"]


# -- tools/make_shards.py -------------------------------------------------------------------------------
def test_failed_make_shards_leaves_no_output(tmp_path):
    _loose(tmp_path / "loose", 8, bad=5)
    proc = make_shards("--from-dir", tmp_path / "loose", "--out", tmp_path / "out", "--samples-per-shard", 2)
    assert proc.returncode == 1 and "v5.latent.pth cannot be read" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["loose"]  # no partial tar, no folder for the trainer to scan


def test_make_shards_rerun_needs_overwrite(tmp_path):
    _loose(tmp_path / "loose", 5)
    out = tmp_path / "out"
    assert make_shards("--mock", 7, "--latent-shape", *SHAPE, "--text-len", 3, "--text-dim", 8, "--out", out,
                       "--samples-per-shard", 2).returncode == 0
    proc = make_shards("--from-dir", tmp_path / "loose", "--out", out, "--samples-per-shard", 2)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "--overwrite" in proc.stderr
    assert len(_source(out).samples) == 7  # untouched
    proc = make_shards("--from-dir", tmp_path / "loose", "--out", out, "--samples-per-shard", 2, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.tar"))) == 3 and sorted(s["key"] for _, s in _source(out).samples) == \
        [f"v{i}" for i in range(5)]


@pytest.mark.parametrize("args, match", [
    (["--from-dir", "{tmp}/nope", "--out", "{tmp}/o"], r"--from-dir .*nope: no such folder"),
    (["--mock", "4", "--samples-per-shard", "0", "--out", "{tmp}/o"], r"--samples-per-shard: .*0 is not a positive"),
    (["--mock", "-3", "--out", "{tmp}/o"], r"--mock: .*-3 is not a positive"),
    (["--mock", "2", "--text-len", "x", "--out", "{tmp}/o"], r"--text-len: .*'x' is not an integer"),
    (["--mock", "2", "--negative", "{tmp}/neg.pth", "--out", "{tmp}/o"], r"--negative .*neg.pth: no such file"),
    (["--from-dir", "{tmp}", "--out", "{tmp}", "--overwrite"], r"is or contains --from-dir"),
    (["--index", "{tmp}/nope"], r"--index .*nope: no such folder"),
])
def test_make_shards_argument_errors(tmp_path, args, match, capsys):
    """Argument errors exit with status 2 and a usage line, before any work (run in-process: fast)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards_tool", ROOT / "tools/make_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as exc:
        tool.main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_make_shards_index_of_a_truncated_tar_is_an_error(tmp_path):
    _write(tmp_path / "d", n=4)
    (tmp_path / "d" / INDEX_FILE).unlink()
    tar = tmp_path / "d" / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1500])
    proc = make_shards("--index", tmp_path / "d")
    assert proc.returncode == 1 and "shard-000001.tar" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "d" / INDEX_FILE).exists()


# -- start-up checks, before any network is built -----------------------------------------------------
@pytest.fixture
def no_networks(monkeypatch):
    """Fail the test if the trainer gets as far as building a model or process groups."""
    import megatron_rcm.parallel.state as state
    import megatron_rcm.training.trainer as trainer

    def reached(*_a, **_k):
        raise AssertionError("the start-up checks must run before networks and process groups are built")

    monkeypatch.setattr(trainer, "build_model", reached)
    monkeypatch.setattr(state, "initialize_parallel", reached)
    return trainer.Trainer


def _cfg(tmp_path, *extra):
    return load_config(None, ["data.source=shards", f"data.path={tmp_path / 'd'}", "data.latent_shape=[4, 1, 4, 4]",
                              "data.text_len=4", "data.text_dim=8", "model.overrides.text_dim=8",
                              "model.overrides.in_channels=4", "model.overrides.out_channels=4",
                              f"training.output_dir={tmp_path / 'run'}", *extra])


def test_startup_refuses_missing_or_unindexed_data(tmp_path, no_networks):
    with pytest.raises(ConfigError, match=rf"data.path={tmp_path / 'd'}.*does not exist"):
        no_networks(_cfg(tmp_path))
    _write(tmp_path / "d", neg=torch.randn(2, 8))
    (tmp_path / "d" / INDEX_FILE).unlink()
    with pytest.raises(ConfigError, match=r"data.path=.*has no index.json.*make_shards.py --index"):
        no_networks(_cfg(tmp_path))


def test_startup_needs_a_negative_prompt_for_cfg(tmp_path, no_networks):
    _write(tmp_path / "d")
    with pytest.raises(ConfigError, match=r"distill.guidance=5.0.*no negative.t5.pth.*8 of 8 samples.*--negative"):
        no_networks(_cfg(tmp_path, "distill.guidance=5"))
    with pytest.raises(ConfigError, match=r"distill.guidance=0.5.*--negative"):
        no_networks(_cfg(tmp_path, "distill.guidance=0.5"))
    torch.save(torch.randn(2, 8), tmp_path / "d" / NEGATIVE_FILE)
    with pytest.raises(AssertionError, match="start-up checks must run before"):  # the checks pass
        no_networks(_cfg(tmp_path, "distill.guidance=5"))


def test_conditional_teacher_needs_no_negative_prompt(tmp_path, no_networks):
    _write(tmp_path / "d")
    for g in ("1", "null"):
        with pytest.raises(AssertionError, match="start-up checks must run before"):
            no_networks(_cfg(tmp_path, f"distill.guidance={g}"))


def test_startup_refuses_a_missing_or_bogus_teacher(tmp_path, no_networks):
    _write(tmp_path / "d", neg=torch.randn(2, 8))
    with pytest.raises(ConfigError, match=r"model.teacher_checkpoint=.*nope.*does not exist"):
        no_networks(_cfg(tmp_path, f"model.teacher_checkpoint={tmp_path / 'nope'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model.teacher_checkpoint=.*empty.*no metadata.json"):
        no_networks(_cfg(tmp_path, f"model.teacher_checkpoint={tmp_path / 'empty'}"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"model.teacher_checkpoint=.*notes.txt.*not a .*state dict"):
        no_networks(_cfg(tmp_path, f"model.teacher_checkpoint={tmp_path / 'notes.txt'}"))
    (tmp_path / "w.safetensors").write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(ConfigError, match=r"model.teacher_checkpoint=.*w.safetensors.*safetensors header"):
        no_networks(_cfg(tmp_path, f"model.teacher_checkpoint={tmp_path / 'w.safetensors'}"))
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(AssertionError, match="start-up checks must run before"):
        no_networks(_cfg(tmp_path, f"model.teacher_checkpoint={tmp_path / 'w.pt'}"))
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    with pytest.raises(AssertionError, match="start-up checks must run before"):
        no_networks(_cfg(tmp_path, f"model.teacher_checkpoint={tmp_path / 'export'}"))


def test_cli_train_reports_startup_errors_with_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_rcm.cli", "train", "--config",
                           str(ROOT / "examples/configs/wan2.1_t2v_1.3b.yaml"), "--set", f"data.path={tmp_path}/nope"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "config error" in proc.stderr and "nope" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
