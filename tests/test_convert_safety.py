"""The converter never destroys its input: an OUT that is, contains or lies inside the source is refused
(symbolic links and relative paths resolved), leftovers of a killed run are removed or reported; and bad
arguments get short errors before any work (--tp, --preset, a path that does not exist, a bad 'latest')."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rcm.convert.errors import ConversionError, OutputExistsError
from megatron_rcm.convert.exporter import run_export
from megatron_rcm.convert.importer import run_import
from megatron_rcm.parallel.state import initialize_parallel
from tests.test_convert_common import write_diffusers
from tests.wan_helpers import make_diffusers

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


@pytest.fixture(scope="module")
def tiny():
    return make_diffusers("t2v", seed=21)


def _digest(root: Path) -> dict:
    """Every file below ``root`` (hidden ones too) -> sha256: the source must come out unchanged."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_import_refuses_an_output_that_is_contains_or_lies_inside_the_source(tmp_path, tiny, monkeypatch):
    src = write_diffusers(tmp_path / "pipe", tiny)
    before = _digest(tmp_path)
    (tmp_path / "link").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    outs = [
        src,  # import SRC/transformer SRC --overwrite (the case)
        src / "transformer",
        tmp_path,  # above the source
        src / "transformer" / "sub",  # inside it
        Path("pipe"),  # relative
        Path("link") / "transformer",  # through a symbolic link
        src / "transformer" / "diffusion_pytorch_model.safetensors",  # the weight file itself
    ]
    for out in outs:
        for given in (src / "transformer", Path("pipe"), Path("link")):
            with pytest.raises(
                OutputExistsError, match=r"(is|contains|lies inside) the source .*would destroy"
            ):
                run_import(given, out, overwrite=True, **QUIET)
    with pytest.raises(OutputExistsError, match=rf"output pipe \(= {src}\) is the source {src}:"):
        run_import(Path("link"), "pipe", overwrite=True, **QUIET)
    with pytest.raises(OutputExistsError, match=rf"contains the source {src / 'transformer'}:"):
        run_import(src / "transformer", src, overwrite=True, **QUIET)
    with pytest.raises(OutputExistsError, match=rf"lies inside the source {src}:"):
        run_import(src, src / "transformer" / "sub", overwrite=True, **QUIET)
    # SRC a single file: OUT = its folder contains it; a sibling folder is fine
    weights = src / "transformer" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(OutputExistsError, match=r"contains the source .*diffusion_pytorch_model"):
        run_import(weights, src / "transformer", overwrite=True, **QUIET)
    assert _digest(tmp_path) == before
    run_import(weights, src / "transformer" / "ckpt", **QUIET)
    assert (src / "transformer" / "ckpt" / "wan_config.json").is_file()


def test_export_refuses_an_output_overlapping_the_checkpoint(tmp_path, tiny):
    run_import(write_diffusers(tmp_path / "pipe", tiny), tmp_path / "run" / "step_00000001", **QUIET)
    (tmp_path / "run" / "latest").write_text("step_00000001\n")
    before = _digest(tmp_path / "run")
    ckpt = tmp_path / "run" / "step_00000001"
    for given, out, relation in [
        (ckpt, ckpt, "is"),  # export CKPT CKPT --overwrite
        (ckpt, tmp_path / "run", "contains"),
        (ckpt, ckpt / "exported", "lies inside"),
        (tmp_path / "run", tmp_path / "run", "is"),
        (tmp_path / "run", tmp_path / "run" / "x", "lies inside"),
        (tmp_path / "run" / "latest", tmp_path / "run", "contains"),
    ]:
        with pytest.raises(OutputExistsError, match=rf"{relation} the checkpoint"):
            run_export(given, out, fmt="diffusers", overwrite=True, **QUIET)
    assert _digest(tmp_path / "run") == before


def test_export_follows_the_latest_pointer_file(tmp_path, tiny):
    """The README's ``export .../checkpoints/latest OUT``: the pointer file is followed like the root."""
    run_import(write_diffusers(tmp_path / "pipe", tiny), tmp_path / "ckpts" / "step_00000002", **QUIET)
    (tmp_path / "ckpts" / "latest").write_text("step_00000002\n")
    report = run_export(tmp_path / "ckpts" / "latest", tmp_path / "out", fmt="diffusers", **QUIET)
    assert report.ckpt == str(tmp_path / "ckpts" / "step_00000002")
    assert (tmp_path / "out" / "config.json").is_file()
    from megatron_rcm.convert.dist_ckpt import load_wan_config

    assert load_wan_config(tmp_path / "ckpts" / "latest").num_attention_heads == 4
    (tmp_path / "ckpts" / "latest").write_text("step_00000009\n")
    with pytest.raises(
        ConversionError, match=r"latest names 'step_00000009', which is not a complete checkpoint"
    ):
        run_export(tmp_path / "ckpts" / "latest", tmp_path / "out2", fmt="diffusers", **QUIET)
    with pytest.raises(ConversionError, match=r"not a checkpoint pointer file"):
        run_export(tmp_path / "pipe" / "model_index.json", tmp_path / "out2", fmt="diffusers", **QUIET)


def test_leftovers_of_a_killed_run_are_removed_or_reported(tmp_path, tiny):
    src = write_diffusers(tmp_path / "pipe", tiny)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (
            f".out.tmp-{dead.pid}-ab12",
            f".out.tmp-{alive.pid}-cd34",
            ".out.tmp-x9y8",
            ".out.old-77",
        ):
            (tmp_path / name).mkdir()
            (tmp_path / name / "__0_0.distcp").write_bytes(b"partial")
        lines = []
        run_import(src, tmp_path / "out", progress=False, log=lines.append)
    finally:
        alive.kill()
        alive.wait()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))
    assert left == [".out.old-77", f".out.tmp-{alive.pid}-cd34", ".out.tmp-x9y8"]
    text = "\n".join(lines)
    assert f"removed {tmp_path / f'.out.tmp-{dead.pid}-ab12'}" in text
    assert f"warning: {tmp_path / f'.out.tmp-{alive.pid}-cd34'} is the unfinished output" in text
    assert f"warning: {tmp_path / '.out.tmp-x9y8'} is the unfinished output" in text
    assert f"warning: {tmp_path / '.out.old-77'} holds a previous out" in text
    # this run's own temporary folder carries its pid, so the next run can tell it from a live one's
    assert (tmp_path / "out" / "wan_config.json").is_file()


def test_wrong_preset_is_summarized(tmp_path, tiny):
    src = write_diffusers(tmp_path / "pipe", tiny)
    with pytest.raises(ConversionError) as e:
        run_import(src, tmp_path / "out", preset="wan2.1-t2v-1.3b", **QUIET)
    msg = str(e.value)
    assert msg.startswith("--preset wan2.1-t2v-1.3b does not describe")
    assert len(msg.splitlines()) <= 12 and "missing" not in msg, msg
    for field, found, want in [
        ("num_layers", 2, 30),
        ("hidden_size", 128, 1536),
        ("ffn_hidden_size", 256, 8960),
        ("in_channels", 4, 16),
        ("out_channels", 4, 16),
        ("text_dim", 32, 4096),
        ("num_attention_heads (config.json)", 4, 12),
    ]:
        assert any(line.split() == [*field.split(), str(found), str(want)] for line in msg.splitlines()), (
            field,
            msg,
        )
    assert not (tmp_path / "out").exists()


def test_missing_paths_say_they_do_not_exist(tmp_path):
    with pytest.raises(ConversionError, match=r"nope: no such file or directory"):
        run_export(tmp_path / "nope", tmp_path / "out", fmt="diffusers", **QUIET)
    with pytest.raises(ConversionError, match=r"nope: no such file or directory"):
        run_import(tmp_path / "nope", tmp_path / "out", **QUIET)
    with pytest.raises(ConversionError, match=r"--tp 0: must be >= 1"):
        run_import(tmp_path / "nope", tmp_path / "out", tp=0, **QUIET)


ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize("tp", ["0", "-2", "two"])
def test_cli_rejects_a_bad_tp_before_any_work(tmp_path, tp):
    res = _cli("import", tmp_path / "does-not-exist", tmp_path / "out", "--tp", tp)
    assert res.returncode == 2 and "argument --tp:" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()
