"""Smoke test of the pipeline-parallel benchmark (tools/bench_pp.py) on CPU: 2 gloo ranks, the tiny preset,
one warm-up and one timed step of the baseline and of PP=2 with 2 and 4 micro-batches; the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.dist_helpers import spawn

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench_pp.py"


def _worker(rank, world, out):
    spec = importlib.util.spec_from_file_location("bench_pp", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.main(["--device", "cpu", "--preset", "wan-tiny-t2v", "--latent", "4", "3", "8", "8",
                       "--text-len", "8", "--batch", "4", "--micro", "2", "4", "--warmup", "1", "--steps", "1",
                       "--json", out])


def test_bench_pp_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = spawn(_worker, 2, str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    layouts = {r["layout"]: r for r in res["layouts"]}
    assert set(layouts) == {"1 GPU", "PP=2 m=2", "PP=2 m=4"}
    for m in (2, 4):
        r = layouts[f"PP=2 m={m}"]
        assert r["bubble_formula"] == 1 / (m + 1)
        assert r["efficiency"] > 0 and r["bubble_measured"] == 1 - r["efficiency"]
        assert r["forward_only_s"] > 0 and r["one_f_one_b_s"] > 0


def test_bench_pp_rejects_micro_batches_that_do_not_divide():
    import pytest

    spec = importlib.util.spec_from_file_location("bench_pp", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch", "6", "--micro", "4"])
