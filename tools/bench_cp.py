"""Benchmark: rCM student step under context parallelism (ring p2p and Ulysses a2a) against one GPU.

    torchrun --nproc-per-node 2 tools/bench_cp.py --preset wan2.1-t2v-1.3b --latent 16 20 60 104
    torchrun --nproc-per-node 2 tools/bench_cp.py --preset wan2.1-t2v-14b --layers 2 --latent 16 21 90 160 \
        --no-baseline
    torchrun --nproc-per-node 2 tools/bench_cp.py --cp-types a2a --a2a-head-groups 2 --no-baseline
    torchrun --nproc-per-node 2 tools/bench_cp.py --device cpu --preset wan-tiny-t2v --latent 4 3 8 8 \
        --warmup 1 --steps 1                                     (smoke test)

One run measures, on the same weights and inputs (mock data):
* the one-GPU baseline (rank 0 alone, a CP=1 model; the other ranks wait), unless ``--no-baseline``;
* CP = world size with each ``--cp-types`` flavour (Ulysses with its all-to-all in ``--a2a-head-groups`` G
  head groups overlapped with the attention when G > 1: ``parallel.cp_a2a_head_groups``).
A step = the engine's rCM student loss (sCM through the JVP + DMD with a rollout of n = 1..4 student steps,
cycling over the timed steps identically in every layout), its backward (loss x CP), the all-reduce of
the gradients over the CP group (what DDP's DP x CP reduction adds at DP = 1), and an AdamW step.
Reported: median step time, the scaling efficiency t(1 GPU) / (CP x t(CP)), per-phase times of the CP
attention (``ring_*/compute`` vs ``ring_*/wait``: the wait is communication the kernel did not hide;
``a2a/*``), the gradient all-reduce time, peak memory per GPU; ``--json`` writes everything.
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
    p.add_argument("--latent", type=int, nargs=4, default=(16, 20, 60, 104), metavar=("C", "F", "H", "W"))
    p.add_argument("--layers", type=int, default=None, help="override num_layers (14B block shapes: 2)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--cp-types", nargs="+", default=["p2p", "a2a"], choices=["p2p", "a2a"])
    p.add_argument("--a2a-head-groups", type=int, default=1, metavar="G",
                   help="Ulysses (a2a) layout: all-to-all in G head groups overlapped with the attention")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-GPU baseline (e.g. 14B at 720p)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--recompute", action="store_true", help="activation recompute of the trained student")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Setup:
    """Weights (drawn once, on rank 0's seed, identical everywhere) and a mock batch."""

    def __init__(self, args, device, dtype):
        from megatron_rcm.models.wan import WanModel, wan_config

        self.args, self.device, self.dtype = args, device, dtype
        over = {} if args.layers is None else {"num_layers": args.layers}
        self.overrides = dict(over, params_dtype=dtype, bf16=dtype == torch.bfloat16)
        torch.manual_seed(0)
        cfg = wan_config(args.preset, context_parallel_size=1, **self.overrides)
        self.weights = {k: v.cpu() if torch.is_tensor(v) else v for k, v in WanModel(cfg).state_dict().items()}
        C, F, H, W = args.latent
        g = torch.Generator().manual_seed(1)
        self.x0 = torch.randn(1, C, F, H, W, generator=g).to(device)
        self.context = torch.randn(1, args.text_len, cfg.text_dim, generator=g).to(device)
        self.neg = torch.randn(1, args.text_len, cfg.text_dim, generator=g).to(device)
        self.tokens = F * (H // 2) * (W // 2)

    def networks(self, cp: int, comm: str):
        from megatron_rcm.models.config_fields import recompute_fields
        from megatron_rcm.models.wan import WanModel, wan_config

        def build(recompute: bool):
            groups = self.args.a2a_head_groups if comm == "a2a" else 1
            cfg = wan_config(self.args.preset, context_parallel_size=cp, cp_comm_type=comm,
                             cp_a2a_head_groups=groups, perform_initialization=False, **recompute_fields(recompute), **self.overrides)
            model = WanModel(cfg)
            model.load_state_dict(self.weights, strict=True)
            return model.to(self.device)

        teacher = build(False).requires_grad_(False).eval()
        critic = build(False).requires_grad_(False).eval()
        student = build(self.args.recompute)
        return teacher, student, critic


def run_layout(setup: Setup, cp: int, comm: str, group) -> dict:
    """Warm-up + timed student steps of one layout; returns times, phases, memory."""
    from megatron_rcm.parallel.cp_attention import PhaseTimes, record_phases
    from megatron_rcm.rcm import Conditioning, DistillBatch, DistillConfig, RCMEngine

    args, device = setup.args, setup.device
    teacher, student, critic = setup.networks(cp, comm)
    engine = RCMEngine(DistillConfig(algorithm="rcm", tangent_warmup=0, student_update_freq=1))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.0, 0.999), weight_decay=0.01, foreach=True)
    batch = DistillBatch(setup.x0, Conditioning(context=setup.context, neg_context=setup.neg))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, reduce_times, phases = [], [], PhaseTimes()
    for i in range(args.warmup + args.steps):
        timed = i >= args.warmup
        gen = torch.Generator(device).manual_seed(100 + i % 4)
        _sync(device)
        t0 = time.perf_counter()
        with record_phases(phases if timed else PhaseTimes()):
            loss, _ = engine.student_loss(student, critic, teacher, batch, step=i % 4, generator=gen)
            (loss * cp).backward()  # x CP: the CP ranks' gradients are summed below (DDP averages DP x CP)
        _sync(device)
        t1 = time.perf_counter()
        if cp > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, group=group)
            flat /= cp
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            del flat
        _sync(device)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if timed:
            times.append(time.perf_counter() - t0)
            reduce_times.append(t2 - t1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del teacher, student, critic, opt
    return {
        "layout": "1 GPU" if cp == 1 else f"CP={cp} {comm}" + (
            f" G={args.a2a_head_groups}" if comm == "a2a" and args.a2a_head_groups > 1 else ""),
        "step_s": times,
        "median_step_s": statistics.median(times),
        "grad_allreduce_s": statistics.median(reduce_times),
        "phases_s_per_step": {k: v / len(times) for k, v in sorted(phases.summary().items())},
        "peak_memory_gib": peak,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    device_type = args.device
    if device_type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel

    world = int(os.environ.get("WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))
    if world < 2:
        raise SystemExit("bench_cp.py: run under torchrun with --nproc-per-node >= 2 (CP = world size)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_cp.py: --device cuda but CUDA is not available (use --device cpu for a smoke test)")
    if args.a2a_head_groups != 1:  # before any network is built
        from megatron_rcm.models.wan import wan_config
        from megatron_rcm.parallel.cp_attention import check_cp_layout

        if "a2a" not in args.cp_types:
            raise SystemExit(f"bench_cp.py: --a2a-head-groups {args.a2a_head_groups} applies to the a2a layout; "
                             f"add a2a to --cp-types (got {args.cp_types})")
        heads = wan_config(args.preset, context_parallel_size=1).num_attention_heads
        try:
            check_cp_layout("a2a", world, heads, a2a_head_groups=args.a2a_head_groups)
        except ValueError as err:
            raise SystemExit(f"bench_cp.py: --a2a-head-groups with --preset {args.preset}: {err}") from err
    initialize_parallel(context_parallel=world)
    from megatron.core import parallel_state as ps

    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rank = dist.get_rank()
    setup = Setup(args, device, dtype)
    results = {"preset": args.preset, "layers": args.layers, "latent": list(args.latent), "tokens": setup.tokens,
               "world": world, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "dtype": str(dtype), "a2a_head_groups": args.a2a_head_groups, "warmup": args.warmup, "steps": args.steps, "layouts": []}
    if not args.no_baseline:
        if rank == 0:
            try:
                results["layouts"].append(run_layout(setup, 1, "p2p", None))
            except torch.cuda.OutOfMemoryError as err:  # report it and go on with the CP layouts
                print(f"1-GPU baseline: out of memory ({err}); try --recompute", flush=True)
                results["baseline_error"] = "out of memory"
            gc.collect()  # the failed step's tensors, held by the traceback until the except block ended
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier()
    for comm in args.cp_types:
        results["layouts"].append(run_layout(setup, world, comm, ps.get_context_parallel_group()))
    base = next((r["median_step_s"] for r in results["layouts"] if r["layout"] == "1 GPU"), None)
    for r in results["layouts"]:
        if base is not None and r["layout"] != "1 GPU":
            r["efficiency"] = base / (world * r["median_step_s"])
    if rank == 0:
        print(f"{args.preset} layers={args.layers} latent={args.latent} tokens={setup.tokens} on {results['device']}")
        for r in results["layouts"]:
            eff = f"  efficiency t1/({world} t_cp) = {r['efficiency']:.3f}" if "efficiency" in r else ""
            print(f"  {r['layout']:>12}: step {r['median_step_s']:.3f} s  grad all-reduce {r['grad_allreduce_s']:.3f} s"
                  f"  peak {r['peak_memory_gib']:.1f} GiB{eff}")
            for k, v in r["phases_s_per_step"].items():
                print(f"      {k:>18}: {v:.3f} s/step")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2))
            os.replace(tmp, args.json)
    destroy_parallel()
    return results


if __name__ == "__main__":
    main()
