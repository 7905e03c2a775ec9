"""``megatron-rcm plan``: rank the parallel layouts of a training run by predicted throughput.

    megatron-rcm plan --preset wan2.1-t2v-14b --frames 81 --size 1280x720 --gpus 128 --gpu-memory 80
    megatron-rcm plan ... --measured docs/bench_data/step_2gpu_tp2.json --all --json plan.json

Memory and time models: docs/throughput.md, Planner. The models are calibrated on a one-GPU bench_step run
(``--calibration``); every run checks the predictions against it and the ``--measured`` runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from megatron_rcm.planner.layouts import Problem, enumerate_layouts, latent_grid
from megatron_rcm.planner.measured import DEFAULT_CALIBRATION, load_measured
from megatron_rcm.planner.memory import CONTEXT_ALLOWANCE_GIB, MemoryModel, stepped_in_run
from megatron_rcm.planner.timing import TimingModel

__all__ = ["add_parser", "run"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return vals


def add_parser(sub) -> None:
    ap = sub.add_parser("plan", help="rank parallel layouts (TP, CP, PP, DP, recompute, micro-batch) by "
                        "predicted memory and step time", description=__doc__)
    ap.add_argument("--preset", required=True, help="Wan preset (wan2.1-t2v-1.3b, wan2.1-t2v-14b, ...)")
    ap.add_argument("--frames", type=int, required=True, help="video frames (1 + 4k: 77, 81)")
    ap.add_argument("--size", required=True, help="WIDTHxHEIGHT in pixels, e.g. 1280x720")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs of the run (nodes of 8)")
    ap.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU a layout may use")
    ap.add_argument("--text-len", type=int, default=512, help="text tokens per sample")
    ap.add_argument("--micro-batch", default="1", help="samples per micro-batch to try (comma-separated)")
    ap.add_argument("--pp-micro-batches", default="4,8,16", help="micro-batches per step for PP > 1 layouts")
    ap.add_argument("--n-max", type=int, default=4, help="distill.N_max (mean rollout (N_max + 1) / 2)")
    ap.add_argument("--student-update-freq", type=int, default=5, help="steps per cycle (1 student + rest critic)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU for MFU")
    ap.add_argument("--calibration", default=str(DEFAULT_CALIBRATION), help="1-GPU bench_step JSON the "
                    "rates and activation memory are fitted to")
    ap.add_argument("--measured", nargs="*", default=[], metavar="FILE",
                    help="more bench_step JSON files to check the predictions against")
    ap.add_argument("--top", type=int, default=20, help="rows of the ranked table (0: all)")
    ap.add_argument("--all", action="store_true", help="also list layouts that do not fit or break a rule")
    ap.add_argument("--json", metavar="FILE", help="write the plan as JSON")


def _problem(args) -> Problem:
    from megatron_rcm.models.wan import wan_config

    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be WIDTHxHEIGHT, e.g. 1280x720, got {args.size!r}") from None
    F, H, W = latent_grid(args.frames, h, w)
    cfg = wan_config(args.preset, tensor_model_parallel_size=1)
    return Problem(cfg, (cfg.in_channels, F, H, W), args.text_len, True, (args.n_max + 1) / 2,
                   args.student_update_freq)


def predict(problem, layout, mem: MemoryModel, tm: TimingModel, peak_tflops: float) -> dict:
    """Memory, per-kind step times, cycle time, tokens/s per GPU and MFU of one layout."""
    steps = {k: tm.step(problem, layout, k) for k in ("warmup", "student", "critic")}
    f = problem.student_update_freq
    cycle = steps["student"].total + (f - 1) * steps["critic"].total
    flops = tm.flops_per_gpu(problem, layout, "student") + (f - 1) * tm.flops_per_gpu(problem, layout, "critic")
    tokens = layout.samples_per_step * problem.tokens * f / cycle / layout.gpus
    return {"layout": layout.name(), "tp": layout.tp, "cp": layout.cp, "cp_comm": layout.cp_comm,
            "pp": layout.pp, "dp": layout.dp, "recompute": layout.recompute, "recompute_layers": layout.recompute_layers,
            "recompute_granularity": layout.recompute_granularity if layout.recompute else None,
            "micro_batch": layout.micro_batch,
            "num_micro_batches": layout.num_micro_batches, "status": layout.status,
            "memory_gib": mem.per_gpu_gib(problem, layout),
            "step_s": {k: s.total for k, s in steps.items()},
            "student_parts_s": vars(steps["student"]), "cycle_s": cycle,
            "tokens_per_s_per_gpu": tokens, "mfu": flops / cycle / (peak_tflops * 1e12)}


def check(measured, mem: MemoryModel, tm: TimingModel) -> list[dict]:
    """Predicted vs measured step time and peak memory per step kind of each measured run."""
    rows = []
    for m in measured:
        stepped = stepped_in_run(m.kinds)  # a network's AdamW moments exist from its first step in the run
        for kind, k in m.kinds.items():
            t = tm.step(m.problem, m.layout, kind, k["rollout_mean"]).total
            g = mem.peak_gib(m.problem, m.layout, kind, stepped[kind])
            rows.append({"file": m.path, "layout": m.layout.name(), "gpus": m.layout.gpus, "kind": kind,
                         "measured_s": k["step_time_s"], "predicted_s": t,
                         "time_error": t / k["step_time_s"] - 1,
                         "measured_gib": k["peak_memory_gib"], "predicted_gib": g,
                         "memory_error": g / k["peak_memory_gib"] - 1})
    return rows


def plan(args) -> dict:
    problem = _problem(args)
    cal = load_measured(args.calibration)
    mem = MemoryModel.calibrate(cal.problem, cal.layout, {k: v["peak_memory_gib"] for k, v in cal.kinds.items()},
                                stepped_in_run(cal.kinds))
    tm = TimingModel.calibrate(cal.problem, cal.layout, cal.kinds)
    missing = {"warmup", "student", "critic"} - set(cal.kinds)
    if missing:
        raise ValueError(f"{args.calibration}: the calibration run lacks step kinds {sorted(missing)}")
    measured = [cal] + [load_measured(p) for p in args.measured]
    cfg = problem.wan_cfg
    enum = enumerate_layouts(args.gpus, cfg.num_attention_heads, cfg.num_layers, _ints(args.micro_batch),
                             _ints(args.pp_micro_batches))
    rows = [predict(problem, lay, mem, tm, args.peak_tflops) for lay in enum.layouts]
    fits = sorted((r for r in rows if r["memory_gib"] <= args.gpu_memory),
                  key=lambda r: -r["tokens_per_s_per_gpu"])
    too_big = sorted((r for r in rows if r["memory_gib"] > args.gpu_memory), key=lambda r: r["memory_gib"])
    for r in too_big:
        r["reason"] = f"memory: needs {r['memory_gib']:.1f} GiB > {args.gpu_memory:g} GiB"
    return {"problem": {"preset": args.preset, "frames": args.frames, "size": args.size,
                        "latent_CFHW": list(problem.latent_CFHW), "tokens": problem.tokens,
                        "gpus": args.gpus, "gpu_memory_gib": args.gpu_memory,
                        "rollout_mean": problem.rollout_mean, "student_update_freq": problem.student_update_freq},
            "calibration": {"file": str(args.calibration), "rates_tflops": {k: v / 1e12 for k, v in tm.rate.items()},
                            "activation_alpha": mem.alpha, "context_allowance_gib": CONTEXT_ALLOWANCE_GIB},
            "layouts": fits, "too_big": too_big,
            "rejected": [{"layout": r.desc, "reason": r.reason} for r in enum.rejected],
            "check": check(measured, mem, tm)}


def format_plan(result: dict, top: int, show_all: bool) -> str:
    p = result["problem"]
    out = [f"{p['preset']}: {p['frames']} frames {p['size']} -> latent {p['latent_CFHW']} = {p['tokens']:,} tokens; "
           f"{p['gpus']} GPUs of {p['gpu_memory_gib']:g} GiB; cycle = 1 student + {p['student_update_freq'] - 1} "
           f"critic steps, mean rollout n = {p['rollout_mean']:g}", ""]
    head = (f"{'#':>3} {'layout':<34} {'GiB/GPU':>8} {'fits':>4} {'student s':>9} {'critic s':>8} {'cycle s':>8} "
            f"{'tok/s/GPU':>9} {'MFU':>6}  status")

    def line(i, r, fits):
        s = r["step_s"]
        return (f"{i:>3} {r['layout']:<34} {r['memory_gib']:>8.1f} {fits:>4} {s['student']:>9.2f} "
                f"{s['critic']:>8.2f} {r['cycle_s']:>8.2f} {r['tokens_per_s_per_gpu']:>9.1f} "
                f"{100 * r['mfu']:>5.1f}%  {r['status']}")

    layouts = result["layouts"]
    shown = layouts if top <= 0 else layouts[:top]
    out.append(f"Feasible layouts, ranked by predicted tokens/s per GPU over a cycle ({len(layouts)}):")
    out += [head] + [line(i + 1, r, "yes") for i, r in enumerate(shown)]
    if not layouts:
        out.append("    none fits: more GPUs, more memory, or a smaller problem")
    runnable = [(i + 1, r) for i, r in enumerate(layouts) if r["status"] == "ok"]
    if runnable:
        out.append(f"    best layout the trainer runs today: #{runnable[0][0]} {runnable[0][1]['layout']}")
    elif layouts:
        out.append("    no feasible layout is implemented today (see the status column)")
    if len(shown) < len(layouts):
        out.append(f"    ... {len(layouts) - len(shown)} more feasible layouts (--top 0 lists them all)")
    if show_all:
        out += ["", f"Layouts that do not fit ({len(result['too_big'])}):", head]
        out += [line(i + 1, r, "no") + f"  [{r['reason']}]" for i, r in enumerate(result["too_big"])]
        out += ["", f"Factorizations that break a rule ({len(result['rejected'])}):"]
        out += [f"    {r['layout']:<22} {r['reason']}" for r in result["rejected"]]
    else:
        out.append(f"({len(result['too_big'])} layouts do not fit, {len(result['rejected'])} factorizations break "
                   f"a rule: --all lists them)")
    out += ["", "Check against measured runs (the first is the calibration run):",
            f"    {'file':<44} {'layout':<26} {'kind':<8} {'meas s':>8} {'pred s':>8} {'err':>7} "
            f"{'meas GiB':>8} {'pred GiB':>8} {'err':>7}"]
    for c in result["check"]:
        out.append(f"    {Path(c['file']).name:<44} {c['layout']:<26} {c['kind']:<8} {c['measured_s']:>8.3f} "
                   f"{c['predicted_s']:>8.3f} {100 * c['time_error']:>+6.1f}% {c['measured_gib']:>8.1f} "
                   f"{c['predicted_gib']:>8.1f} {100 * c['memory_error']:>+6.1f}%")
    return "\n".join(out)


def _write_json(path: str, result: dict) -> None:
    """Atomically: a temporary file beside ``path``, renamed over it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args) -> int:
    result = plan(args)
    print(format_plan(result, args.top, args.all))
    if args.json:
        _write_json(args.json, result)
    return 0
