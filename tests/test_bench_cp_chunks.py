"""CPU smoke test of tools/bench_cp_chunks.py: every mode runs, prints one JSON line per result, and the
chunked (ring) results equal the full-length call (float32 PyTorch chunks: round-off, 1e-5)."""

from __future__ import annotations

import json

from tools.bench_cp_chunks import main


def test_bench_cp_chunks_cpu_smoke(capsys):
    rows = main(["--device", "cpu", "--tokens", "48", "--heads", "2", "--head-dim", "8", "--warmup", "0",
                 "--iters", "1"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines == rows
    got = {(r["mode"], r["impl"], r["cp"]) for r in rows}
    for mode in ("jvp", "primal"):
        assert {(mode, "full", 1), (mode, "ring", 2), (mode, "ring_legacy", 4)} <= got
    assert {("bwd", "full", 1), ("bwd", "ring", 2), ("bwd", "ring", 4)} <= got
    for r in rows:
        assert r["ms"] > 0
        if r["impl"] != "full":
            assert r["max_rel_err"] <= 1e-5, r
