"""Benchmark: rCM student step under pipeline parallelism (Megatron's 1F1B schedule) against one GPU.

    torchrun --nproc-per-node 2 tools/bench_pp.py --preset wan2.1-t2v-1.3b --latent 16 5 30 52 --batch 8 \
        --micro 4 8
    torchrun --nproc-per-node 2 tools/bench_pp.py --device cpu --preset wan-tiny-t2v --latent 4 3 8 8 \
        --batch 4 --micro 2 4 --warmup 1 --steps 1                 (smoke test)

One run measures, on the same weights and inputs (mock data):
* the one-GPU baseline (rank 0 alone: the whole model, no pipeline; the other ranks wait);
* PP = world size with each ``--micro`` number m of pipeline micro-batches per network call
  (``training/pipelined_net.py``: forward-only schedules for the teacher, the rollout, the critic; the 1F1B
  replay of the calls that carry the gradient).
A step = the engine's rCM student loss (sCM through the JVP + DMD with a rollout of n = 1..4 student steps,
cycling identically in every layout), its backward (under PP: the 1F1B replay and the sum of the replicated
embedders' gradients over the stages) and an AdamW step.

Reported: median step time; efficiency t(1 GPU) / (p t(PP)); the measured bubble 1 - efficiency (idle
stages, p2p transfers, the replicated embedders and the replay's extra forward all count) next to the 1F1B
formula (p - 1) / (m + p - 1); the time in forward-only and in 1F1B schedules; peak memory per GPU.
``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--latent", type=int, nargs=4, default=(16, 5, 30, 52), metavar=("C", "F", "H", "W"))
    p.add_argument("--batch", type=int, default=8, help="samples per step (every --micro must divide it)")
    p.add_argument("--micro", type=int, nargs="+", default=[4, 8], help="pipeline micro-batches per call")
    p.add_argument("--layers", type=int, default=None, help="override num_layers")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--recompute", action="store_true",
                   help="activation recompute of the trained student (the 1-GPU baseline of Wan 1.3B at batch 8 x "
                        "1,950 tokens ran out of an H200's 140 GiB without it)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    bad = [m for m in args.micro if args.batch % m]
    if bad:
        p.error(f"--micro {bad} do not divide --batch {args.batch}")
    return args


def bubble_formula(p: int, m: int) -> float:
    """1F1B's idle fraction per stage: (p - 1) / (m + p - 1)."""
    return (p - 1) / (m + p - 1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Setup:
    """Weights (drawn once from seed 0, identical everywhere) and a mock batch."""

    def __init__(self, args, device, dtype):
        from megatron_rcm.models.wan import WanModel, wan_config

        self.args, self.device, self.dtype = args, device, dtype
        over = {} if args.layers is None else {"num_layers": args.layers}
        self.overrides = dict(over, params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype)
        torch.manual_seed(0)
        self.cfg = wan_config(args.preset, **self.overrides)
        self.weights = {k: v.cpu() if torch.is_tensor(v) else v for k, v in WanModel(self.cfg).state_dict().items()}
        C, F, H, W = args.latent
        g = torch.Generator().manual_seed(1)
        self.x0 = torch.randn(args.batch, C, F, H, W, generator=g).to(device)
        self.context = torch.randn(args.batch, args.text_len, self.cfg.text_dim, generator=g).to(device)
        self.neg = torch.randn(args.batch, args.text_len, self.cfg.text_dim, generator=g).to(device)
        pt, ph, pw = self.cfg.patch_size
        self.tokens = (F // pt) * (H // ph) * (W // pw)

    def networks(self, stage):
        from megatron_rcm.models.config_fields import recompute_fields
        from megatron_rcm.models.wan import WanModel, wan_config
        from megatron_rcm.parallel.pipeline import stage_state_dict

        def build(recompute: bool = False):
            cfg = wan_config(self.args.preset, perform_initialization=False, **recompute_fields(recompute),
                             **self.overrides)
            cfg.has_cond_embedder = True
            model = WanModel(cfg, **({} if stage is None else stage.model_kwargs))
            sd = self.weights if stage is None else stage_state_dict(self.weights, stage)
            model.load_state_dict(sd, strict=True)
            return model.to(self.device)

        teacher = build().requires_grad_(False).eval()
        critic = build().requires_grad_(False).eval()
        return teacher, build(self.args.recompute), critic


class _ScheduleTimes:
    """Wall time inside PipelinedNet's forward-only schedules and 1F1B replays (synchronized at each end)."""

    def __init__(self, net, device):
        self.forward_only = self.one_f_one_b = 0.0
        fwd, replay = net._forward_only, net._schedule

        def timed_forward(*a, **k):
            _sync(device)
            t0 = time.perf_counter()
            out = fwd(*a, **k)
            _sync(device)
            self.forward_only += time.perf_counter() - t0
            return out

        def timed_schedule(mbs, x, with_tangent, forward_only, loss_of):
            if forward_only:
                return replay(mbs, x, with_tangent, forward_only, loss_of)
            _sync(device)
            t0 = time.perf_counter()
            out = replay(mbs, x, with_tangent, forward_only, loss_of)
            _sync(device)
            self.one_f_one_b += time.perf_counter() - t0
            return out

        net._forward_only, net._schedule = timed_forward, timed_schedule


def run_layout(setup: Setup, pp: int, m: int | None) -> dict:
    """Warm-up + timed student steps of one layout (pp = 1: the whole model on this GPU)."""
    from megatron_rcm.parallel.pipeline import allreduce_replicated_grads, pipeline_stage
    from megatron_rcm.rcm import Conditioning, DistillBatch, DistillConfig, RCMEngine
    from megatron_rcm.training.pipelined_net import PipelinedNet

    args, device = setup.args, setup.device
    stage = None if pp == 1 else pipeline_stage(setup.cfg.num_layers)
    teacher, student, critic = setup.networks(stage)
    nets = (student, critic, teacher)
    clocks = []
    if pp > 1:
        nets = tuple(PipelinedNet(n, m) for n in nets)
        clocks = [_ScheduleTimes(n, device) for n in nets]
    engine = RCMEngine(DistillConfig(algorithm="rcm", tangent_warmup=0, student_update_freq=1))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.0, 0.999), weight_decay=0.01, foreach=True)
    batch = DistillBatch(setup.x0, Conditioning(context=setup.context, neg_context=setup.neg))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, fwd_only, one_f_one_b = [], [], []
    for i in range(args.warmup + args.steps):
        gen = torch.Generator(device).manual_seed(100 + i % 4)
        for c in clocks:
            c.forward_only = c.one_f_one_b = 0.0
        _sync(device)
        t0 = time.perf_counter()
        loss, _ = engine.student_loss(*nets, batch, step=i % 4, generator=gen)
        loss.backward()
        if pp > 1:
            nets[0].backward_pending()
            allreduce_replicated_grads(student)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            fwd_only.append(sum(c.forward_only for c in clocks))
            one_f_one_b.append(sum(c.one_f_one_b for c in clocks))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    out = {
        "layout": "1 GPU" if pp == 1 else f"PP={pp} m={m}",
        "step_s": times,
        "median_step_s": statistics.median(times),
        "peak_memory_gib": peak,
    }
    if pp > 1:
        out.update(micro_batches=m, bubble_formula=bubble_formula(pp, m),
                   forward_only_s=statistics.median(fwd_only), one_f_one_b_s=statistics.median(one_f_one_b))
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from megatron_rcm.parallel.pipeline import check_pipeline_layout
    from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel

    world = int(os.environ.get("WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))
    if world < 2:
        raise SystemExit("bench_pp.py: run under torchrun with --nproc-per-node >= 2 (PP = world size)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_pp.py: --device cuda but CUDA is not available (use --device cpu for a smoke test)")
    initialize_parallel(pipeline_parallel=world)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rank = dist.get_rank()
    setup = Setup(args, device, dtype)
    check_pipeline_layout(setup.cfg.num_layers, world)
    results = {"preset": args.preset, "layers": setup.cfg.num_layers, "latent": list(args.latent),
               "batch": args.batch, "tokens": setup.tokens, "world": world,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
               "warmup": args.warmup, "steps": args.steps, "recompute": args.recompute, "layouts": []}
    if not args.no_baseline:
        if rank == 0:
            try:
                results["layouts"].append(run_layout(setup, 1, None))
            except torch.cuda.OutOfMemoryError as err:  # report it and go on with the PP layouts
                print(f"1-GPU baseline: out of memory ({err}); try --recompute", flush=True)
                results["baseline_error"] = "out of memory"
            gc.collect()  # the failed step's tensors, held by the traceback until the except block ended
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier()
    for m in args.micro:
        results["layouts"].append(run_layout(setup, world, m))
    base = next((r["median_step_s"] for r in results["layouts"] if r["layout"] == "1 GPU"), None)
    for r in results["layouts"]:
        if base is not None and r["layout"] != "1 GPU":
            r["efficiency"] = base / (world * r["median_step_s"])
            r["bubble_measured"] = 1 - r["efficiency"]
    if rank == 0:
        print(f"{args.preset} layers={setup.cfg.num_layers} latent={args.latent} batch={args.batch} "
              f"tokens={setup.tokens} on {results['device']}")
        for r in results["layouts"]:
            line = f"  {r['layout']:>12}: step {r['median_step_s']:.3f} s  peak {r['peak_memory_gib']:.1f} GiB"
            if "efficiency" in r:
                line += (f"  efficiency {r['efficiency']:.3f}  bubble measured {r['bubble_measured']:.3f}"
                         f" vs 1F1B formula {r['bubble_formula']:.3f}")
            if "one_f_one_b_s" in r:
                line += f"  forward-only {r['forward_only_s']:.3f} s  1F1B {r['one_f_one_b_s']:.3f} s"
            print(line)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2))
            os.replace(tmp, args.json)
    destroy_parallel()
    return results


if __name__ == "__main__":
    main()
