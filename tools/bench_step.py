"""Step benchmark: per-phase times, achieved TFLOP/s and MFU of each kind of distillation step.

    python tools/bench_step.py --config examples/configs/wan2.1_t2v_1.3b.yaml [--set key=value ...]
    torchrun --nproc-per-node 2 tools/bench_step.py --config ... --set parallel.tensor_parallel=2
    python tools/bench_step.py --config examples/configs/quickstart.yaml --warmup 1 --iters 1   # CPU smoke run

Mock data of the config's latent shape, a random teacher, the full trainer (DDP, optimizer, EMA). For
each step kind (warm-up sCM student, rCM student, critic) it runs ``--warmup`` untimed then ``--iters``
timed steps (consecutive steps of that kind, so rollout lengths cycle through 1..N_max) and reports: the step time, the time of each phase (teacher forward, student JVP pass, DMD
rollout, critic forward, backward, gradient reduction, optimizer, EMA, data; "other" is the rest: the
engine's elementwise math and launch gaps), TFLOP/s and MFU by the FLOP model of
``megatron_rcm.training.flops`` (docs/throughput.md), tokens/s and peak memory; then the MFU of a cycle
of one student and ``student_update_freq - 1`` critic steps, and with ``--checkpoint DIR`` one checkpoint
save (asynchronous unless ``--sync-checkpoint``): the stall (time the training loop is blocked: the save
call plus the polls, the finalizing one included), the time from the save's start until it is finalized
(``latest`` names it) and the write bandwidth (checkpoint bytes over that time). Prints a table on rank 0 and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_rcm.cli import configure_logging
from megatron_rcm.config.loader import load_config
from megatron_rcm.models.config_fields import recomputed_fraction
from megatron_rcm.ops.attention import SDPA_PREFERENCES, set_sdpa_preference
from megatron_rcm.training.flops import model_flops, recompute_shares, step_flops
from megatron_rcm.training.kernel_profile import device_kernels, format_shares, kernel_shares
from megatron_rcm.training.phases import instrument_network

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}
"""Dense bf16 tensor-core peak (TFLOP/s, SXM parts) by device-name substring."""

KINDS = ("warmup", "student", "critic")


def _peak_tflops(override: float | None) -> float | None:
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _steps_for(kind: str, trainer, count: int) -> list[int]:
    """``count`` consecutive steps of ``kind`` under the config's schedule: their rollout lengths
    n = (k mod N_max) + 1 cycle through 1..N_max, so 4 iterations average over the rollouts as training does."""
    cfg, sched = trainer.cfg.distill, trainer.engine.schedule
    warm = cfg.dmd_start
    if kind == "warmup":
        if cfg.algorithm != "rcm" or warm == 0:
            raise ValueError("warm-up steps exist only for distill.algorithm=rcm with tangent_warmup > 0")
        return list(range(min(count, warm)))
    if kind == "critic" and not trainer.engine.has_critic:
        raise ValueError(f"distill.algorithm={cfg.algorithm!r} has no critic step")
    want_student = kind == "student"
    steps, s = [], warm
    while len(steps) < count:
        if sched.is_student_step(s) == want_student:
            steps.append(s)
        s += 1
    return steps


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def profile_step(trainer, step: int) -> dict:
    """Kernel-class shares of one step (``trainer.step = step``) under ``torch.profiler`` (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    trainer.step = step
    trainer.timers.collect()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        metrics = trainer.train_step()
        torch.cuda.synchronize()
    trainer.timers.collect()
    shares = kernel_shares(device_kernels(prof.events()))
    shares["rollout_steps"] = int(metrics.get("dmd/rollout_steps", metrics.get("critic/rollout_steps", 0)))
    shares["step"] = step
    return shares


def bench(args) -> dict:
    from megatron_rcm.training import Trainer

    overrides = ["data.source=mock", "checkpoint.dir=null", "logging.wandb_mode=disabled",
                 "logging.progress_bar=false", "distill.tangent_warmup=1000", *args.sets]
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg)
    t = trainer.timers
    t.enabled = True
    instrument_network(trainer.teacher, t, "teacher_forward")
    instrument_network(trainer.student, t, "dmd_rollout", "student_jvp")
    if trainer.critic is not None:
        instrument_network(trainer.critic, t, "critic_forward")
    rank0 = trainer.rank == 0
    wan_cfg, pp = trainer.wan_cfg, cfg.parallel.pipeline_parallel
    recompute = {"on": cfg.model.recompute, "granularity": wan_cfg.recompute_granularity,
                 "method": wan_cfg.recompute_method, "num_layers": wan_cfg.recompute_num_layers,
                 "fraction": recomputed_fraction(wan_cfg, wan_cfg.num_layers // pp)}

    C, F, H, W = cfg.data.latent_shape
    fwd, jvp = model_flops(trainer.wan_cfg, (C, F, H, W), cfg.data.text_len)
    recompute["flop_share"], recompute["flop_share_jvp"] = recompute_shares(
        wan_cfg, fwd, jvp, (C, F, H, W), recompute["fraction"], cfg.data.text_len)
    B = cfg.data.micro_batch_size * cfg.optimizer.grad_accumulation_steps
    peak = _peak_tflops(args.peak_tflops)
    world = torch.distributed.get_world_size()
    results: dict = {"config": args.config, "overrides": overrides, "sdpa": args.sdpa, "world_size": world,
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "peak_tflops_per_gpu": peak, "flops_per_forward": fwd.total, "recompute": recompute,
                     "kinds": {}}
    kinds = [k for k in args.kinds.split(",") if k]
    for kind in kinds:
        if kind not in KINDS:
            raise SystemExit(f"--kinds: unknown step kind {kind!r}; choose from {', '.join(KINDS)}")
        steps = _steps_for(kind, trainer, args.iters)
        times, phases, flops_list, rollouts = [], [], [], []
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + len(steps)):
            trainer.step = steps[max(0, i - args.warmup)]
            t.collect()
            metrics = trainer.train_step()
            ph = t.collect()
            if i >= args.warmup:
                n_roll = int(metrics.get("dmd/rollout_steps", metrics.get("critic/rollout_steps", 0)))
                times.append(metrics["step_time_s"])
                phases.append(ph)
                rollouts.append(n_roll)
                flops_list.append(step_flops(kind, fwd, jvp, B, n_roll, recompute["flop_share"],
                                             cfg.distill.guidance not in (None, 1.0), recompute["flop_share_jvp"]))
        dt, flops = statistics.mean(times), statistics.mean(flops_list)
        # every model-parallel rank works on the same samples: the world's FLOPs are the DP ranks' sum
        tflops_per_gpu = flops * trainer.dp_size / dt / world / 1e12
        names = sorted({k for p in phases for k in p})
        per_phase = {k: statistics.mean(p.get(k, 0.0) for p in phases) for k in names}
        per_phase["other"] = max(0.0, dt - sum(per_phase.values()))
        if args.profile:
            results.setdefault("profile", {})[kind] = profile_step(trainer, _steps_for(kind, trainer,
                                                                                       len(steps) + 1)[-1])
        results["kinds"][kind] = {
            "step_time_s": dt, "step_times_s": times, "rollout_steps": rollouts, "flops_per_step": flops,
            "tflops_per_gpu": tflops_per_gpu, "mfu": tflops_per_gpu / peak if peak else None,
            "tokens_per_s": metrics["tokens_per_s"], "peak_memory_gib": metrics["memory_gib"],
            "phases_s": per_phase,
        }
    r = results["kinds"]
    if "student" in r and "critic" in r:
        f = cfg.distill.student_update_freq
        t_cycle = r["student"]["step_time_s"] + (f - 1) * r["critic"]["step_time_s"]
        flops_cycle = r["student"]["flops_per_step"] + (f - 1) * r["critic"]["flops_per_step"]
        tf = flops_cycle * trainer.dp_size / t_cycle / world / 1e12
        results["cycle"] = {"steps": f, "time_s": t_cycle, "tflops_per_gpu": tf, "mfu": tf / peak if peak else None}
    if args.checkpoint:
        from megatron_rcm.training.checkpoint import CheckpointManager

        root = Path(args.checkpoint) if args.checkpoint != "tmp" else Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
        trainer.ckpt = CheckpointManager(str(root), keep_last=1, async_save=not args.sync_checkpoint)
        if args.prewarm_host_memory:
            results["prewarm"] = bench_prewarm(trainer)
        saves = []
        for _ in range(args.checkpoint_saves):
            saves.append(bench_checkpoint(trainer))
            if args.checkpoint_discard:  # untimed: the next save then has no checkpoint to replace
                if rank0:
                    shutil.rmtree(saves[-1]["path"])
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()
                saves[-1]["discarded"] = True
        results["checkpoint"] = saves[0]
        results["checkpoint_saves"] = saves
    trainer.close()
    if rank0:
        print(format_table(results))
        for kind, r in results["kinds"].items():
            print(json.dumps({"bench": "step", "kind": kind, "world_size": world, "overrides": overrides, "sdpa": args.sdpa,
                              "step_time_s": r["step_time_s"], "mfu": r["mfu"],
                              "tflops_per_gpu": r["tflops_per_gpu"], "peak_memory_gib": r["peak_memory_gib"],
                              "recompute": recompute}), flush=True)
        for kind, shares in results.get("profile", {}).items():
            print(format_shares(kind, shares))
            print(json.dumps({"bench": "step_profile", "kind": kind, "world_size": world, "overrides": overrides, "sdpa": args.sdpa,
                              **shares}), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def bench_prewarm(trainer) -> dict:
    """``checkpoint.prewarm_host_memory`` before the first save: the warm-up the trainer would run in the
    background during its first steps, from the full state dict (the save's own view: it materializes the
    moments of an optimizer the benchmark never stepped, as the save would), timed to its end."""
    from megatron_rcm.training.host_prewarm import pinned_block_counts, preload_sizes

    trainer.cfg.checkpoint.prewarm_host_memory = True
    trainer.prewarm = trainer.host_memory_prewarm()
    if trainer.prewarm is None:
        return {"skipped": "off on CPU, without async saves, or at data x context parallel size > 1"}
    pw = trainer.prewarm.prewarmer
    t0 = time.perf_counter()
    counts = pinned_block_counts(preload_sizes(trainer.sharded_state_dict()))
    pw.request(counts)
    pw.wait()
    return {"wall_s": time.perf_counter() - t0, "alloc_s": pw.seconds, "blocks": sum(counts.values()),
            "bytes": sum(b * n for b, n in counts.items()), "error": None if pw.error is None else str(pw.error)}


def bench_checkpoint(trainer, poll_every_s: float = 0.05) -> dict:
    """Time one save the way the trainer makes it: the save call, then one non-blocking poll per
    ``poll_every_s`` (the trainer polls once per step) until the save is finalized."""
    trainer.timers.collect()
    t0 = time.perf_counter()
    path = trainer.save_checkpoint()
    stall = time.perf_counter() - t0
    while True:
        t_poll = time.perf_counter()
        done = trainer.finalize_checkpoints(blocking=False)
        stall += time.perf_counter() - t_poll
        if done:
            break
        time.sleep(poll_every_s)
    finalized = time.perf_counter() - t0
    size = _bytes_under(path)
    return {"async": trainer.ckpt.async_save, "stall_s": stall, "finalized_s": finalized, "bytes": size,
            "write_gb_per_s": size / finalized / 1e9, "path": str(path),
            "save_phases_s": dict(trainer.ckpt.last_save_phases)}


def format_table(res: dict) -> str:
    kinds = list(res["kinds"])
    phases = sorted({p for k in kinds for p in res["kinds"][k]["phases_s"]}, key=lambda p: (p == "other", p))
    w = 14
    rc = res["recompute"]
    lines = [f"device {res['device']} x{res['world_size']}, peak {res['peak_tflops_per_gpu']} TFLOP/s per GPU; "
             + (f"recompute {rc['granularity']} {rc['method']} ({rc['num_layers']}), {100 * rc['fraction']:.0f}% "
                "of the blocks"
                if rc["on"] else "no recompute"),
             f"{'':<22}" + "".join(f"{k:>{w}}" for k in kinds)]
    row = lambda name, fmt, get: lines.append(f"{name:<22}" + "".join(f"{fmt(get(res['kinds'][k])):>{w}}" for k in kinds))
    row("step time (s)", lambda v: f"{v:.3f}", lambda r: r["step_time_s"])
    for p in phases:
        row(f"  {p} (s)", lambda v: f"{v:.3f}", lambda r, p=p: r["phases_s"].get(p, 0.0))
    row("TFLOP/s per GPU", lambda v: f"{v:.1f}", lambda r: r["tflops_per_gpu"])
    row("MFU", lambda v: "-" if v is None else f"{100 * v:.1f}%", lambda r: r["mfu"])
    row("tokens/s", lambda v: f"{v:.0f}", lambda r: r["tokens_per_s"])
    row("peak memory (GiB)", lambda v: f"{v:.1f}", lambda r: r["peak_memory_gib"])
    row("rollout steps", lambda v: ",".join(map(str, v)), lambda r: r["rollout_steps"])
    if "cycle" in res:
        c = res["cycle"]
        mfu = "-" if c["mfu"] is None else f"{100 * c['mfu']:.1f}%"
        lines.append(f"cycle of 1 student + {c['steps'] - 1} critic steps: {c['time_s']:.3f} s, "
                     f"{c['tflops_per_gpu']:.1f} TFLOP/s per GPU, MFU {mfu}")
    if "prewarm" in res:
        w = res["prewarm"]
        lines.append(f"pinned host memory warm-up: {w['skipped']}" if "skipped" in w else
                     f"pinned host memory warm-up (background in training): {w['bytes'] / 1e9:.2f} GB in "
                     f"{w['blocks']} blocks, {w['wall_s']:.2f} s" + (f", FAILED: {w['error']}" if w["error"] else ""))
    for i, c in enumerate(res.get("checkpoint_saves", [res["checkpoint"]] if "checkpoint" in res else [])):
        phases = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in c.get("save_phases_s", {}).items())
        lines.append(f"checkpoint save {i + 1} ({'async' if c['async'] else 'sync'}): training stalled {c['stall_s']:.2f} s "
                     f"({phases}); {c['bytes'] / 1e9:.2f} GB finalized after {c['finalized_s']:.2f} s, "
                     f"{c['write_gb_per_s']:.2f} GB/s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/configs/wan2.1_t2v_1.3b.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--kinds", default="warmup,student,critic", help="comma-separated step kinds")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind")
    ap.add_argument("--iters", type=int, default=4,
                    help="timed steps of each kind (mean reported; 4 covers rollout lengths 1-4)")
    ap.add_argument("--checkpoint", default=None, help="also time one checkpoint save into DIR ('tmp': a temp dir)")
    ap.add_argument("--checkpoint-saves", type=int, default=1,
                    help="with --checkpoint: this many saves one after another (the first pays for fresh pinned "
                         "host memory; later ones reuse PyTorch's cached host allocations)")
    ap.add_argument("--prewarm-host-memory", action="store_true",
                    help="with --checkpoint: warm PyTorch's pinned host memory cache before the first save "
                         "(checkpoint.prewarm_host_memory; timed apart, as it runs beside training)")
    ap.add_argument("--checkpoint-discard", action="store_true",
                    help="with --checkpoint: delete each checkpoint once it is finalized and timed (untimed), for a "
                         "host with room for one: the next save then replaces none")
    ap.add_argument("--sync-checkpoint", action="store_true",
                    help="time a synchronous save (training waits for the write) instead of an asynchronous one")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-GPU peak for MFU (default: by device)")
    ap.add_argument("--profile", action="store_true",
                    help="one more step of each kind under torch.profiler: GPU time per kernel class (CUDA only)")
    ap.add_argument("--sdpa", default="cudnn", choices=SDPA_PREFERENCES,
                    help="kernel PyTorch's SDPA tries first for attention without a tangent (CUDA)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("-v", "--verbose", action="store_true", help="Megatron-Core's INFO logs and warnings too")
    args = ap.parse_args(argv)
    configure_logging(args.verbose)
    if args.warmup < 0 or args.iters < 1:
        ap.error(f"--warmup must be >= 0 and --iters >= 1 (got {args.warmup}, {args.iters})")
    if args.profile and not torch.cuda.is_available():
        ap.error("--profile classifies CUDA kernels: it needs a GPU")
    set_sdpa_preference(args.sdpa)
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
