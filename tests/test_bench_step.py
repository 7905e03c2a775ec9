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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_bench_step_reports_every_phase_and_kind(tmp_path):
    out = tmp_path / "bench.json"
    r = _run([str(ROOT / "tools/bench_step.py"), "--config", str(ROOT / "examples/configs/quickstart.yaml"),
              *TINY, "--warmup", "0", "--iters", "2", "--checkpoint", str(tmp_path / "ckpt"), "--json", str(out)],
             tmp_path)
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
    assert res["checkpoint"]["bytes"] > 0 and res["checkpoint"]["stall_s"] > 0
    assert "step time (s)" in r.stdout and "Params for bucket" not in r.stdout + r.stderr


def test_megatron_listings_only_when_verbose(tmp_path):
    args = ["-m", "megatron_rcm.cli", "{}", "train", "--config", str(ROOT / "examples/configs/quickstart.yaml"),
            "--set", "data.source=mock", "--set", "training.max_steps=1", "--set", f"training.output_dir={tmp_path}/o",
            "--set", "logging.progress_bar=false"]
    quiet = _run([a for a in args if a != "{}"], tmp_path)
    loud = _run([a if a != "{}" else "--verbose" for a in args], tmp_path)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
    assert "Params for bucket" in loud.stderr + loud.stdout
    assert "Params for bucket" not in quiet.stderr + quiet.stdout
