"""Measured runs: a ``tools/bench_step.py`` JSON file read back into the planner's (problem, layout, measurements).

The file names its config and overrides; the layout comes from ``parallel.*``, ``model.recompute`` (with ``recompute_method`` / ``recompute_num_layers``;
the granularity from the file's own ``recompute`` record, full where it has none) and
``data.micro_batch_size`` / ``optimizer.grad_accumulation_steps`` of that config, the data-parallel size from
``world_size``. Relative config paths are looked up from the working directory, then from the repository root.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from megatron_rcm.planner.layouts import Layout, Problem

__all__ = ["DEFAULT_CALIBRATION", "Measured", "load_measured"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CALIBRATION = REPO_ROOT / "docs" / "bench_data" / "step_1p3b_fused_2026-11-30.json"
"""Wan2.1 1.3B, 480p 77 frames (31,200 tokens), TP=1, recompute on, fused elementwise kernels, one H200
(docs/benchmarks.md)."""


@dataclass(frozen=True)
class Measured:
    path: str
    problem: Problem
    layout: Layout
    kinds: dict
    """step kind -> {"step_time_s", "phases_s", "rollout_mean", "peak_memory_gib"}."""
    device: str


def problem_from_config(cfg) -> Problem:
    """The planner's problem of an ``ExperimentConfig``: its preset (+ overrides), latent shape, distill schedule."""
    from megatron_rcm.models.wan import wan_config

    wan_cfg = wan_config(cfg.model.preset, **{**cfg.model.overrides, "tensor_model_parallel_size": 1})
    d = cfg.distill
    return Problem(wan_cfg, tuple(cfg.data.latent_shape), cfg.data.text_len, d.guidance not in (None, 1.0),
                   (d.N_max + 1) / 2, d.student_update_freq)


def load_measured(path: str | Path) -> Measured:
    """Read a bench_step JSON; errors name the file and the missing key."""
    from megatron_rcm.config.loader import load_config

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read a bench_step JSON file: {err}") from None
    for key in ("config", "overrides", "world_size", "kinds"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r} (not a tools/bench_step.py JSON file?)")
    config = Path(data["config"])
    if not config.is_absolute() and not config.exists():
        config = REPO_ROOT / config
    if not config.exists():
        raise ValueError(f"{path}: its config {data['config']!r} does not exist (cwd or {REPO_ROOT})")
    cfg = load_config(config, list(data["overrides"]))
    par = cfg.parallel
    tp, cp, pp = par.tensor_parallel, par.context_parallel, par.pipeline_parallel
    world = int(data["world_size"])
    if world % (tp * cp * pp):
        raise ValueError(f"{path}: world_size {world} is not a multiple of TP*CP*PP = {tp}*{cp}*{pp}")
    block = cfg.model.recompute and cfg.model.recompute_method == "block"
    # the granularity the run used, as bench_step recorded it; files from before selective recompute existed
    # (no "granularity") ran full, whatever the config file says today
    granularity = (data.get("recompute") or {}).get("granularity") or "full"
    layout = Layout(tp, cp, pp, world // (tp * cp * pp), cfg.model.recompute, cfg.data.micro_batch_size,
                    cfg.optimizer.grad_accumulation_steps, getattr(par, "cp_comm_type", "p2p") if cp > 1 else None,
                    recompute_layers=cfg.model.recompute_num_layers if block else None,
                    recompute_granularity=granularity)
    kinds = {}
    for kind, k in data["kinds"].items():
        missing = [x for x in ("step_time_s", "phases_s", "rollout_steps", "peak_memory_gib") if x not in k]
        if missing:
            raise ValueError(f"{path}: kinds.{kind} lacks {missing}")
        kinds[kind] = {"step_time_s": float(k["step_time_s"]), "phases_s": k["phases_s"],
                       "rollout_mean": statistics.mean(k["rollout_steps"]),
                       "peak_memory_gib": k["peak_memory_gib"]}
    return Measured(str(path), problem_from_config(cfg), layout, kinds, data.get("device", "?"))
