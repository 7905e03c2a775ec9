"""The step benchmark runs end to end on CPU; Megatron's parameter listings stay out of the logs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "data.micro_batch_size=4", "--set", "distill.student_update_freq=3"]


def _run(args, tmp_path):
    # not MASTER_PORT: an in-process trainer of this test session may have set it, and holds that port
    env = {**{k: v for k, v in os.environ.items() if k != "MASTER_PORT"}, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_bench_step_reports_every_phase_and_kind(tmp_path):
    out = tmp_path / "bench.json"
    r = _run([str(ROOT / "tools/bench_step.py"), "--config", str(ROOT / "examples/configs/quickstart.yaml"),
              *TINY, "--warmup", "0", "--iters", "2", "--checkpoint", str(tmp_path / "ckpt"), "--checkpoint-saves", "2",
              "--prewarm-host-memory", "--json", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["kinds"]) == {"warmup", "student", "critic"}
    phases = {k: v["phases_s"] for k, v in res["kinds"].items()}
    assert {"teacher_forward", "student_jvp", "backward", "optimizer"} <= set(phases["warmup"])
    assert {"teacher_forward", "student_jvp", "dmd_rollout", "critic_forward", "backward", "ema"} <= set(
        phases["student"])
    assert "student_jvp" not in phases["critic"] and {"dmd_rollout", "critic_forward"} <= set(phases["critic"])
    for kind, v in res["kinds"].items():
        assert v["step_time_s"] > 0 and math.isfinite(v["tflops_per_gpu"]) and v["flops_per_step"] > 0
        assert sum(v["phases_s"].values()) <= v["step_time_s"] * 1.05 + 1e-3, kind  # "other" is the rest
    assert res["kinds"]["student"]["rollout_steps"] == [1, 2] == res["kinds"]["critic"]["rollout_steps"]
    assert res["cycle"]["steps"] == 3
    c = res["checkpoint"]
    assert c["async"] and c["bytes"] > 0 and 0 < c["stall_s"] <= c["finalized_s"] and c["write_gb_per_s"] > 0
    assert len(res["checkpoint_saves"]) == 2 and res["checkpoint_saves"][0] == c
    for save in res["checkpoint_saves"]:  # the stall split into where it went: each part inside the stall
        ph = save["save_phases_s"]
        assert set(ph) == {"state_dict_s", "prepare_s", "plan_s", "schedule_s"}, ph
        assert all(v >= 0 for v in ph.values()) and sum(ph.values()) <= save["stall_s"] * 1.05 + 1e-3, save
    assert "checkpoint save 1 (async): training stalled" in r.stdout
    assert "checkpoint save 2 (async): training stalled" in r.stdout
    assert "off on CPU" in res["prewarm"]["skipped"]  # the warm-up is a no-op on CPU
    assert "pinned host memory warm-up: off on CPU" in r.stdout
    assert "step time (s)" in r.stdout and "Params for bucket" not in r.stdout + r.stderr


def test_bench_checkpoint_discard_leaves_no_checkpoint_and_each_save_writes_afresh(tmp_path):
    """``--checkpoint-discard`` (a host with room for one checkpoint): each save is timed, then deleted."""
    out, ckpt = tmp_path / "bench.json", tmp_path / "ckpt"
    r = _run([str(ROOT / "tools/bench_step.py"), "--config", str(ROOT / "examples/configs/quickstart.yaml"), *TINY,
              "--kinds", "critic", "--warmup", "0", "--iters", "1", "--checkpoint", str(ckpt), "--checkpoint-saves", "2",
              "--checkpoint-discard", "--json", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    saves = json.loads(out.read_text())["checkpoint_saves"]
    assert len(saves) == 2 and all(s["discarded"] and s["bytes"] > 0 for s in saves)
    assert abs(saves[0]["bytes"] - saves[1]["bytes"]) < 1e-3 * saves[0]["bytes"]  # the second wrote a whole one too
    assert not list(ckpt.glob("step_*")) and not list(ckpt.glob(".trash-*"))


def test_megatron_listings_only_when_verbose(tmp_path):
    args = ["-m", "megatron_rcm.cli", "{}", "train", "--config", str(ROOT / "examples/configs/quickstart.yaml"),
            "--set", "data.source=mock", "--set", "training.max_steps=1", "--set", f"training.output_dir={tmp_path}/o",
            "--set", "logging.progress_bar=false"]
    quiet = _run([a for a in args if a != "{}"], tmp_path)
    loud = _run([a if a != "{}" else "--verbose" for a in args], tmp_path)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
    assert "Params for bucket" in loud.stderr + loud.stdout
    assert "Params for bucket" not in quiet.stderr + quiet.stdout


def test_bench_checkpoint_async_stall_excludes_the_write_sync_includes_it(tmp_path, monkeypatch):
    """With a writer slowed by 2 s, the asynchronous save stalls training well under the time until it is
    finalized; the synchronous one stalls it for all of it."""
    import importlib.util
    import time

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from megatron_rcm.config import load_config
    from megatron_rcm.training import CheckpointManager, Trainer
    from tests.test_ckpt_resume import TINY as TINY_CFG

    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "tools/bench_step.py")
    bench_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_step)
    original = FileSystemWriterAsync.write_preloaded_data

    def slow(*args, **kwargs):
        time.sleep(2.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(FileSystemWriterAsync, "write_preloaded_data", staticmethod(slow))
    trainer = Trainer(load_config(None, [*TINY_CFG, f"training.output_dir={tmp_path / 'out'}"]))
    trainer.train_step()
    res = {}
    for mode in ("async", "sync"):
        trainer.ckpt = CheckpointManager(tmp_path / mode, keep_last=1, async_save=mode == "async")
        res[mode] = bench_step.bench_checkpoint(trainer)
        assert res[mode]["async"] == (mode == "async") and res[mode]["bytes"] > 0
        assert CheckpointManager(tmp_path / mode).latest().name == "step_00000001"
    # the 2 s the writer sleeps are in the sync stall, not in the async one (margin: a loaded 2-core CI box)
    assert res["async"]["stall_s"] + 1.5 < res["sync"]["stall_s"] and res["async"]["finalized_s"] > 2.0, res
    assert res["sync"]["stall_s"] > 2.0 and res["sync"]["stall_s"] <= res["sync"]["finalized_s"], res


def test_bench_step_block_recompute_prints_a_json_line_per_kind(tmp_path):
    """Block (selective) recompute reaches the trainer's models through ``--set model.recompute_method=block``
    (``model.recompute_granularity=selective``); each kind prints one JSON line with its time, peak memory and
    the recompute setting (what a sweep over N reads)."""
    r = _run([str(ROOT / "tools/bench_step.py"), "--config", str(ROOT / "examples/configs/quickstart.yaml"),
              *TINY, "--kinds", "student", "--warmup", "0", "--iters", "1", "--set", "model.recompute=true",
              "--set", "model.recompute_method=block", "--set", "model.recompute_num_layers=1",
              "--set", "model.recompute_granularity=selective"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"bench": "step"')]
    assert [row["kind"] for row in rows] == ["student"], r.stdout[-2000:]
    layers = 2  # examples/configs/quickstart.yaml: model.overrides.num_layers
    rc = rows[0]["recompute"]
    share = rc.pop("flop_share")  # the self-attention products of the recomputed block are not re-run
    share_jvp = rc.pop("flop_share_jvp")  # nor those of the JVP pass (3x a forward's)
    assert rc == {"on": True, "granularity": "selective", "method": "block", "num_layers": 1,
                  "fraction": 1 / layers}, rc
    assert 0 < share < 1 / layers and 0 < share_jvp < 1 / layers, (share, share_jvp)
    assert rows[0]["step_time_s"] > 0 and "peak_memory_gib" in rows[0]
    assert f"recompute selective block (1), {100 / layers:.0f}% of the blocks" in r.stdout


def test_cli_help_prints_no_library_warnings(tmp_path):
    """The parser imports Megatron-Core (planner, pipeline commands): its fallback warnings (no Apex / TE) are
    filtered before that import unless --verbose."""
    r = _run(["-m", "megatron_rcm.cli", "quickstart", "--help"], tmp_path)
    assert r.returncode == 0 and "--teacher-batch" in r.stdout, r.stderr[-2000:]
    assert "Warning" not in r.stderr, r.stderr[-2000:]
