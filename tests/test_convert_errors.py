"""Wrong inputs give errors that name the problem; OUT is never half-written; a broken key mapping is
caught by the parity check and by --verify; the command line works end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_rcm.convert import importer, wan_keys
from megatron_rcm.convert.errors import (
    CorruptFileError,
    KeyMismatchError,
    OutputExistsError,
    ShapeMismatchError,
    UnknownLayoutError,
    VerificationError,
)
from megatron_rcm.convert.importer import run_import
from megatron_rcm.parallel.state import initialize_parallel
from tests.test_convert_common import write_diffusers
from tests.wan_helpers import diffusers_config, make_diffusers, make_inputs, rel_err, run_diffusers

QUIET = dict(progress=False, log=lambda *_: None)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


@pytest.fixture(scope="module")
def tiny():
    return make_diffusers("t2v", seed=12)


def _save_sd(folder: Path, sd: dict, config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "diffusion_pytorch_model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unknown_layout(tmp_path):
    src = _save_sd(tmp_path / "x", {"encoder.layer.0.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)})
    with pytest.raises(UnknownLayoutError, match=r"no Wan2\.1 layout.*'decoder\.bias'.*attn1\.to_q"):
        run_import(src, tmp_path / "out", **QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownLayoutError, match="no weight files"):
        run_import(tmp_path / "empty", tmp_path / "out", **QUIET)


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny):
    sd = dict(tiny.state_dict())
    del sd["blocks.1.attn2.norm_k.weight"]
    sd["blocks.1.attn2.extra_gate"] = torch.zeros(3)
    src = _save_sd(tmp_path / "x", sd, dict(tiny.config))
    with pytest.raises(KeyMismatchError) as e:
        run_import(src, tmp_path / "out", **QUIET)
    assert e.value.missing == ["blocks.1.attn2.norm_k.weight"]
    assert e.value.unexpected == ["blocks.1.attn2.extra_gate"]
    assert "missing: blocks.1.attn2.norm_k.weight" in str(
        e.value
    ) and "unexpected: blocks.1.attn2.extra_gate" in str(e.value)


def test_shape_not_matching_the_preset_names_key_found_expected(tmp_path):
    from diffusers import WanTransformer3DModel

    wide = WanTransformer3DModel(**(diffusers_config("t2v") | {"ffn_dim": 192}))
    src = write_diffusers(tmp_path / "pipe", wide)
    # a config.json that disagrees with the tensors (--preset gets a summary instead: test_wrong_preset_...)
    config = src / "transformer" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"ffn_dim": 256}))
    with pytest.raises(ShapeMismatchError, match=r"preset wan-tiny-t2v") as e:
        run_import(src, tmp_path / "out", **QUIET)
    assert ("blocks.0.ffn.net.0.proj.weight", (192, 128), (256, 128)) in e.value.mismatches
    assert "blocks.1.ffn.net.2.weight: found (128, 192), expected (128, 256)" in str(e.value)


def test_truncated_and_missing_shards_are_named(tmp_path, tiny):
    src = write_diffusers(tmp_path / "pipe", tiny, max_shard_size="100KB")
    shard = sorted((tmp_path / "pipe" / "transformer").glob("*-00002-of-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    with pytest.raises(CorruptFileError, match=rf"{shard.name}.*truncated"):
        run_import(src, tmp_path / "out", **QUIET)
    shard.unlink()
    with pytest.raises(CorruptFileError, match=rf"shard {shard.name} is missing"):
        run_import(src, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


def test_output_holding_a_checkpoint_is_refused_and_never_half_written(tmp_path, tiny, monkeypatch):
    src = write_diffusers(tmp_path / "pipe", tiny)
    out = tmp_path / "out"
    run_import(src, out, **QUIET)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(
        OutputExistsError, match=r"already holds a Megatron dist_checkpointing checkpoint.*--overwrite"
    ):
        run_import(src, out, **QUIET)

    # a failure in the middle of writing (here: the 10th tensor read) leaves OUT exactly as it was
    calls = {"n": 0}
    real_read = importer.Source.read

    def failing_read(self, key):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk on fire")
        return real_read(self, key)

    monkeypatch.setattr(importer.Source, "read", failing_read)
    with pytest.raises(OSError, match="disk on fire"):
        run_import(src, out, overwrite=True, dtype="bf16", **QUIET)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pipe"]  # no temporary folder left

    run_import(src, out, overwrite=True, dtype="bf16", **QUIET)
    assert json.loads((out / "wan_config.json").read_text())["dtype"] == "bf16"


def _swap_q_and_k(table):
    """A broken mapping: self-attention to_q and to_k exchanged (same shapes, so no check can see it)."""
    out = []
    for pattern, template in table:
        if "attn1\\.to_(q|k|v)" in pattern:
            out += [
                (wan_keys._BLOCK + r"attn1\.to_q\.(weight|bias)", r"blocks.\1.self_attn.linear_k.\2"),
                (wan_keys._BLOCK + r"attn1\.to_k\.(weight|bias)", r"blocks.\1.self_attn.linear_q.\2"),
                (wan_keys._BLOCK + r"attn1\.to_v\.(weight|bias)", r"blocks.\1.self_attn.linear_v.\2"),
            ]
        else:
            out.append((pattern, template))
    return out


def test_broken_mapping_fails_parity_and_verify(tmp_path, tiny, monkeypatch):
    from tests.test_convert_import import _forward, _load_ours

    monkeypatch.setitem(wan_keys.TABLES, "diffusers", _swap_q_and_k(wan_keys.DIFFUSERS_TO_OURS))
    src = write_diffusers(tmp_path / "pipe", tiny)
    # --verify sees it (the correct mapping: ~3e-7) and fails, writing nothing
    with pytest.raises(
        VerificationError, match=r"relative difference 1\.\d+e-01 > tolerance 1\.0e-04.*not written"
    ):
        run_import(src, tmp_path / "ckpt", verify=True, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    # a tolerance above the error lets it through, and reports it
    report = run_import(src, tmp_path / "ckpt", verify=True, verify_tol=0.5, **QUIET)
    assert 1e-2 < report.verify["rel"] <= 0.5 and "tolerance 5.0e-01) on input" in report.summary()
    inp = make_inputs("t2v")
    assert rel_err(_forward(_load_ours(tmp_path / "ckpt"), inp), run_diffusers(tiny, inp)) > 1e-2


# ---------------------------------------------------------------------------------------------------
# command line


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},  # this checkout's package, not an installed one
    )


def test_cli_end_to_end(tmp_path):
    """Four invocations (each pays for importing Megatron-Core): --help, import --verify, export, refusal."""
    help_ = _cli("--help")
    assert help_.returncode == 0 and "import" in help_.stdout and "export" in help_.stdout

    write_diffusers(tmp_path / "pipe", make_diffusers("i2v", seed=13))
    imp = _cli("import", tmp_path / "pipe", tmp_path / "ckpt", "--tp", "2", "--verify", "--no-progress")
    assert imp.returncode == 0, imp.stderr
    for line in ("layout:  diffusers", "preset:  wan-tiny-i2v", "wrote:", "verify:  max |ours - source|"):
        assert line in imp.stdout, imp.stdout
    exp = _cli("export", tmp_path / "ckpt", tmp_path / "out", "--format", "original", "--no-progress")
    assert exp.returncode == 0 and "original layout, 87 tensors" in exp.stdout, exp.stderr

    again = _cli("import", tmp_path / "pipe", tmp_path / "ckpt", "--no-progress")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith("error: output directory"), again.stderr


def test_tp_that_does_not_divide_the_heads_is_refused(tmp_path, tiny):
    from megatron_rcm.convert.errors import ConversionError

    with pytest.raises(
        ConversionError, match=r"--tp 3: num_attention_heads 4, ffn_hidden_size 256 not divisible"
    ):
        run_import(write_diffusers(tmp_path / "pipe", tiny), tmp_path / "ckpt", tp=3, **QUIET)
    assert not (tmp_path / "ckpt").exists()
