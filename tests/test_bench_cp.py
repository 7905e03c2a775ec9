"""Smoke test of the context-parallel benchmark (tools/bench_cp.py) on CPU: 2 gloo ranks, the tiny preset,
one warm-up and one timed step of the baseline and both CP flavours; the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.dist_helpers import spawn

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench_cp.py"


def _worker(rank, world, out):
    spec = importlib.util.spec_from_file_location("bench_cp", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.main(["--device", "cpu", "--preset", "wan-tiny-t2v", "--latent", "4", "3", "8", "6",
                       "--text-len", "8", "--warmup", "1", "--steps", "1", "--json", out])


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
