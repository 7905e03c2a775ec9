"""Smoke test of the context-parallel benchmark (tools/bench_cp.py) on CPU: 2 gloo ranks, the tiny preset,
one warm-up and one timed step of the baseline and both CP flavours; the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.dist_helpers import spawn

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench_cp.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cp", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _worker(rank, world, out, extra=()):
    return _bench().main(["--device", "cpu", "--preset", "wan-tiny-t2v", "--latent", "4", "3", "8", "6",
                          "--text-len", "8", "--warmup", "1", "--steps", "1", "--json", out, *extra])


def test_bench_cp_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = spawn(_worker, 2, str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["tokens"] == 3 * 4 * 3  # odd token count: padded shards
    layouts = {r["layout"]: r for r in res["layouts"]}
    assert set(layouts) == {"1 GPU", "CP=2 p2p", "CP=2 a2a"}
    assert layouts["CP=2 p2p"]["efficiency"] > 0
    assert {"ring_fwd/compute", "ring_fwd/wait", "ring_bwd/compute", "ring_bwd/wait"} <= set(
        layouts["CP=2 p2p"]["phases_s_per_step"])
    assert {"a2a/all_to_all", "a2a/attention"} <= set(layouts["CP=2 a2a"]["phases_s_per_step"])


def test_bench_cp_a2a_head_groups(tmp_path, monkeypatch):
    """--a2a-head-groups 2: the overlapped Ulysses layout runs and is labelled; wan-tiny's 4 heads over CP=2
    leave 2 per rank, so G = 4 is refused (naming the numbers) before any network is built."""
    out = tmp_path / "bench.json"
    res = spawn(_worker, 2, str(out), ["--cp-types", "a2a", "--a2a-head-groups", "2", "--no-baseline"])
    assert res["a2a_head_groups"] == 2
    [layout] = res["layouts"]
    assert layout["layout"] == "CP=2 a2a G=2" and layout["median_step_s"] > 0
    assert {"a2a/all_to_all", "a2a/attention"} <= set(layout["phases_s_per_step"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # the check runs before the process group is initialized
    with pytest.raises(SystemExit, match=r"4 heads per tensor-parallel rank / context_parallel 2 = 2 heads"):
        _bench().main(["--device", "cpu", "--preset", "wan-tiny-t2v", "--cp-types", "a2a", "--a2a-head-groups",
                       "4"])
