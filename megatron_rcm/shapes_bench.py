"""``megatron-rcm quickstart --data shapes``: the embedded video benchmark (no weights, no downloads).

Per seed (``--seeds``):
1. Train a tiny Wan2.1 DiT teacher (the same ``WanModel`` as the 1.3B/14B models; 8 frames, so the 3D RoPE
   across frames and attention over frames run) with rectified flow on procedural clips of moving shapes
   (``megatron_rcm.data.shapes``: RGB pixels stand in for latents, the condition names shape, colour and
   direction as three embedding tokens).
2. Distill it with rCM and the sCM-only and DMD-only baselines through the same ``Trainer`` / engine.
3. Sample the teacher (RF Euler, CFG) and every student (EMA weights, 1, 2 and 4 steps) from the same noise
   for the same conditions, and score them with a clip evaluator trained once on real clips
   (``megatron_rcm.eval.video_evaluator`` / ``video_metrics``).
Writes ``metrics.json`` (per seed and mean/std over seeds), a PNG contact sheet and a GIF per method per
seed, and prints the table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_rcm.atomic import write_atomic
from megatron_rcm.config.schema import ConfigError
from megatron_rcm.quickstart import pick_num_threads

# The benchmark's distillation config; examples/configs/shapes.yaml holds the same values (a test keeps
# them equal). Frames of 16 x 16 with a (1, 4, 4) patch: 8 x 4 x 4 = 128 tokens per clip (the (1, 2, 2)
# patch would give 512 tokens and ~4x the CPU time per step, measured); the temporal patch stays 1.
SHAPES_OVERRIDES = [
    "model.preset=wan-tiny-t2v",
    "model.params_dtype=fp32",
    "model.overrides={in_channels: 3, out_channels: 3, text_dim: 32, num_layers: 2, hidden_size: 128,"
    " ffn_hidden_size: 256, num_attention_heads: 4, freq_dim: 32, patch_size: [1, 4, 4]}",
    "distill.algorithm=rcm",
    "distill.guidance=2.0",
    "distill.tangent_warmup=50",
    "distill.student_update_freq=2",
    "distill.student_time={kind: lognormal, P_mean: 0.0, P_std: 1.6}",
    "distill.critic_time={kind: uniform_shift, shift: 1.0}",
    "distill.sigma_max=80.0",
    "optimizer.lr=1e-4",
    "optimizer.critic_lr=1e-4",
    "optimizer.warmup_steps=20",
    "optimizer.clip_grad=1.0",
    "data.source=shapes",
    "data.micro_batch_size=16",
    "data.latent_shape=[3,8,16,16]",
    "data.text_len=3",
    "data.text_dim=32",
    "checkpoint.save_every=0",
    "checkpoint.keep_last=1",
    "logging.log_every=50",
    "logging.sample_every=0",
    "training.max_steps=200",
    "training.seed=0",
    "training.output_dir=outputs/shapes/seed_0/rcm",
]


@dataclass
class ShapesBenchOptions:
    output_dir: str = "outputs/shapes"
    """Where the teachers, students, contact sheets, GIFs and metrics.json go."""
    seeds: tuple[int, ...] = (0,)
    """Training seeds (teacher and distillation); the table reports mean and spread over them."""
    teacher_steps: int = 2000
    """Rectified-flow training steps of each teacher (batch ``teacher_batch``); the RF loss still falls at 1000
    (0.143 at 300, 0.076 at 1000, measured), 2000 is what the 20-minute CPU budget leaves (docs/quickstart.md)."""
    teacher_batch: int = 32
    """Teacher training batch size."""
    teacher_lr: float = 1e-3
    """Teacher peak learning rate (AdamW, warm-up then cosine)."""
    teacher_time_mean: float = 0.5
    """Mean of the teacher's logit-normal RF time sampler, s = sigmoid(mean + N(0, 1)): 0.5 puts 11 % of the steps
    at high noise (s > 0.85; 4 % with 0.0), where a clip's layout is decided; at 600 steps it lifted the teacher's
    shape accuracy from 0.33-0.47 to 0.62 (docs/quickstart.md, "Why the teacher did not learn")."""
    distill_steps: int = 200
    """Training steps of each distillation run (student and critic steps together)."""
    methods: tuple[str, ...] = ("rcm", "scm", "dmd")
    """Distillation algorithms to run (``DistillConfig.algorithm`` values)."""
    teacher_sample_steps: int = 50
    """RF Euler steps of the teacher's samples."""
    student_steps: tuple[int, ...] = (1, 2, 4)
    """Student sampling step counts that are evaluated."""
    samples_per_condition: int = 8
    """Generated clips per condition (36 conditions) for every row of the table."""
    evaluator_steps: int = 300
    """Training batches (64 fresh real clips each) of the clip evaluator."""
    overrides: list[str] = field(default_factory=list)
    """Extra ``key=value`` overrides of the distillation config."""
    progress: bool = True
    """Show progress bars."""


# (shape, colour, direction) ids of the samples shown in the contact sheet and the GIFs
SHOWCASE = ((1, 0, 0), (2, 1, 3), (0, 2, 2), (1, 2, 1))
REAL_SEED, REFERENCE_SEED, NOISE_SEED = 20_000, 10_000, 2024


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _config(opts: ShapesBenchOptions, *extra: str):
    from megatron_rcm.config import load_config

    return load_config(None, [*SHAPES_OVERRIDES, f"training.max_steps={opts.distill_steps}", *extra,
                              *opts.overrides])


def _train_teacher(opts, cfg, seed: int, out: Path, example, say):
    from tqdm.auto import tqdm

    from megatron_rcm.data.shapes import ShapesSource
    from megatron_rcm.training.models import build_model, build_wan_config, export_model
    from megatron_rcm.training.teacher_pretrain import pretrain_teacher

    device = _device()
    teacher = build_model(build_wan_config(cfg.model, cfg.data, recompute=False), seed).to(device)
    data = ShapesSource(opts.teacher_batch, cfg.data.latent_shape, cfg.data.text_len, cfg.data.text_dim, seed=seed)
    bar = tqdm(total=opts.teacher_steps, desc=f"teacher seed {seed} (rectified flow)", disable=not opts.progress)
    threads = pick_num_threads(teacher, example)

    def on_step(step, loss, _dt):
        nonlocal threads
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4f}", threads=threads, refresh=False)
        if step % 250 == 249:
            threads = pick_num_threads(teacher, example)

    t0 = time.time()
    losses = pretrain_teacher(teacher, data, opts.teacher_steps, lr=opts.teacher_lr,
                              timestep_scale=cfg.distill.timestep_scale, seed=seed, device=device, on_step=on_step,
                              time_mean=opts.teacher_time_mean)
    bar.close()
    teacher.requires_grad_(False)
    path = export_model(teacher, out / "teacher")
    tail = losses[-100:]
    say(f"teacher (seed {seed}): {opts.teacher_steps} steps in {time.time() - t0:.0f} s, final RF loss "
        f"{sum(tail) / len(tail):.4f} -> {path}")
    return teacher, path, time.time() - t0


def _run_seed(opts, seed: int, ev, real, real_cond, held_out, cond, out: Path, say) -> tuple[dict, dict, dict, dict]:
    """One seed: teacher, distillations, samples, scores. Returns (metrics rows, timings, media paths, teacher
    diagnostics)."""
    from megatron_rcm.data.batch import Batch
    from megatron_rcm.data.shapes import condition_index, prompt_embeddings
    from megatron_rcm.eval.metrics import paired_mse
    from megatron_rcm.eval.video_evaluator import evaluate_clips
    from megatron_rcm.eval.video_media import save_contact_sheet, save_gif
    from megatron_rcm.eval.video_metrics import video_metrics
    from megatron_rcm.rcm import Conditioning, TrigFlowDenoiser, euler_sample
    from megatron_rcm.training import Trainer

    device = _device()
    base = _config(opts, f"training.seed={seed}")
    C, F, H, W = (int(v) for v in base.data.latent_shape)
    emb, neg = prompt_embeddings(base.data.text_dim, base.data.text_len)
    ex_B = min(32, len(cond))
    example = (torch.zeros(ex_B, C, F, H, W, device=device), torch.full((ex_B,), 500.0, device=device),
               emb[cond[:ex_B]].to(device))
    timings = {}
    teacher, teacher_path, timings["teacher_train"] = _train_teacher(opts, base, seed, out, example, say)

    t0 = time.time()
    ctx = Conditioning(context=emb[cond].to(device), neg_context=neg.to(device))
    noise = torch.randn((len(cond), C, F, H, W), generator=torch.Generator().manual_seed(NOISE_SEED + seed)).to(device)
    w = base.distill.guidance
    pick_num_threads(teacher, example)
    teacher_x = euler_sample(TrigFlowDenoiser(teacher, base.distill.timestep_scale), noise, ctx, guidance=w,
                             num_steps=opts.teacher_sample_steps, shift=1.0).float().cpu()
    teacher_pred = evaluate_clips(ev, teacher_x)
    diagnostics = _teacher_oracle_gap(teacher, base, emb, device, seed)
    say(f"teacher (seed {seed}): x0 error vs the posterior-mean oracle (oracle's own error) on noised real clips: "
        + ", ".join(f"{k} {v['teacher_vs_oracle']:.4f} ({v['oracle_vs_clean']:.4f})"
                    for k, v in diagnostics["oracle_gap"].items()))
    teacher_name = f"teacher {opts.teacher_sample_steps}-step (CFG {w:g})"
    rows = {"real clips (held-out)": video_metrics(evaluate_clips(ev, held_out), cond, real, real_cond,
                                                   teacher_pred["features"]),
            teacher_name: video_metrics(teacher_pred, cond, real, real_cond)}
    timings["sample_teacher"] = time.time() - t0

    show = torch.tensor([int(torch.nonzero(cond == condition_index(*map(torch.tensor, a)))[0, 0]) for a in SHOWCASE])
    sheet = {"real (held-out)": held_out[show], f"teacher {opts.teacher_sample_steps}-step": teacher_x[show]}
    media = {"gif_real": str(save_gif([[held_out[i], teacher_x[i]] for i in show], out / "anim_real_teacher.gif"))}
    for method in opts.methods:
        t0 = time.time()
        cfg = _config(opts, f"training.seed={seed}", f"distill.algorithm={method}",
                      f"model.teacher_checkpoint={teacher_path}", f"training.output_dir={out / method}",
                      f"logging.progress_bar={opts.progress}")
        trainer = Trainer(cfg, teacher=teacher)
        threads = pick_num_threads(teacher, example)
        say(f"seed {seed}: distilling with {method}: {opts.distill_steps} steps"
            + (f" ({threads} CPU threads)" if device.type == "cpu" else ""))
        recheck = lambda tr, _m: (pick_num_threads(teacher, example) if device.type == "cpu" and tr.step % 100 == 0
                                  else None)
        trainer.train(on_step=recheck)
        timings[f"distill_{method}"] = time.time() - t0
        t0 = time.time()
        batch = Batch(latent_BCFHW=noise, context_BLD=ctx.context, neg_context_BLD=ctx.neg_context)
        gif_cols = [[teacher_x[i]] for i in show]
        for n in opts.student_steps:
            xs = trainer.sample(n, batch, use_ema=True, seed=NOISE_SEED + seed, noise=noise).float().cpu()
            rows[f"{method} student {n}-step"] = video_metrics(evaluate_clips(ev, xs), cond, real, real_cond,
                                                               teacher_pred["features"], paired_mse(xs, teacher_x))
            sheet[f"{method} {n}-step"] = xs[show]
            for col, i in zip(gif_cols, show):
                col.append(xs[i])
        media[f"gif_{method}"] = str(save_gif(gif_cols, out / f"anim_{method}.gif"))
        timings[f"eval_{method}"] = time.time() - t0
        trainer.close()
    media["contact_sheet"] = str(save_contact_sheet(sheet, out / "contact_sheet.png"))
    return rows, timings, media, diagnostics


def _teacher_oracle_gap(teacher, base, emb, device, seed: int) -> dict:
    """``oracle_gap`` of the teacher's conditional x0 estimate ``x_s - s v`` on the showcase conditions."""
    from megatron_rcm.data.shapes import condition_index
    from megatron_rcm.eval.oracle_denoiser import oracle_gap
    from megatron_rcm.rcm import Conditioning, TrigFlowDenoiser

    den = TrigFlowDenoiser(teacher, base.distill.timestep_scale)
    _, F, H, W = (int(v) for v in base.data.latent_shape)

    def x0_fn(x_s, s, c):
        B = x_s.shape[0]
        x_s = x_s.to(device)
        cond = Conditioning(context=emb[c].expand(B, -1, -1).to(device))
        return x_s - s * den.velocity(x_s, torch.full((B,), s, dtype=torch.float64), cond)

    conditions = [int(condition_index(*map(torch.tensor, a))) for a in SHOWCASE]
    return {"oracle_gap": oracle_gap(x0_fn, conditions, F, H, W, seed=NOISE_SEED + seed),
            "oracle_conditions": conditions}


def _check_options(opts: ShapesBenchOptions) -> None:
    if not opts.seeds or len(set(opts.seeds)) != len(opts.seeds):
        raise ConfigError(f"--seeds must name distinct seeds, got {list(opts.seeds)}")
    for name in ("teacher_steps", "teacher_batch", "distill_steps", "teacher_sample_steps", "samples_per_condition",
                 "evaluator_steps"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"shapes benchmark option {name}={getattr(opts, name)} must be >= 1")
    if opts.samples_per_condition < 2:
        raise ConfigError(f"samples_per_condition={opts.samples_per_condition}: diversity needs >= 2 per condition")


def run_shapes_bench(opts: ShapesBenchOptions) -> dict:
    """Run the benchmark; returns ``{"metrics": {row: {metric: {mean, std, n}}}, "per_seed": {...}, ...}``."""
    from megatron_rcm.data.shapes import NUM_CONDITIONS, check_latent_shape, sample_clips
    from megatron_rcm.eval.video_evaluator import HEADS, evaluate_clips, train_evaluator
    from megatron_rcm.eval.video_metrics import format_spread_table, mean_and_spread
    from megatron_rcm.parallel.state import initialize_parallel

    t_start = time.time()
    _check_options(opts)
    base = _config(opts)  # config errors before any work
    F, H, W = check_latent_shape(base.data.latent_shape)
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(msg, flush=True)
    if not torch.cuda.is_available():
        torch.set_flush_denormal(True)  # denormal AdamW moments slow CPU steps ~30x (see Trainer)
    initialize_parallel(1, seed=base.training.seed)
    say(f"megatron-rcm shapes benchmark on {_device()}: clips [3, {F}, {H}, {W}], seeds {list(opts.seeds)}, "
        f"teacher {opts.teacher_steps} steps, {len(opts.methods)} distillations x {opts.distill_steps} steps -> {out}")

    t0 = time.time()
    ev = train_evaluator(F, H, W, steps=opts.evaluator_steps)
    cond = torch.arange(NUM_CONDITIONS).repeat(opts.samples_per_condition)
    real_cond = torch.arange(NUM_CONDITIONS).repeat(2 * opts.samples_per_condition)
    real = evaluate_clips(ev, sample_clips(real_cond, F, H, W, torch.Generator().manual_seed(REFERENCE_SEED)))
    held_out = sample_clips(cond, F, H, W, torch.Generator().manual_seed(REAL_SEED))
    chance = {"shape": 1 / 3, "colour": 1 / 3, "direction": 1 / 4}
    pred = evaluate_clips(ev, held_out)
    from megatron_rcm.data.shapes import condition_attributes

    evaluator_acc = {k: float((pred[k] == a).double().mean()) for k, a in zip(HEADS, condition_attributes(cond))}
    say(f"clip evaluator ({time.time() - t0:.0f} s): held-out real accuracy "
        + ", ".join(f"{k} {v:.3f} (chance {chance[k]:.2f})" for k, v in evaluator_acc.items()))

    per_seed, timings, media, diagnostics = {}, {"evaluator": time.time() - t0}, {}, {}
    for seed in opts.seeds:
        seed_out = out / f"seed_{seed}"
        rows, timings[f"seed_{seed}"], media[f"seed_{seed}"], diagnostics[f"seed_{seed}"] = _run_seed(
            opts, seed, ev, real, real_cond, held_out, cond, seed_out, say)
        per_seed[str(seed)] = rows
    summary = mean_and_spread(list(per_seed.values()))
    timings["total"] = time.time() - t_start
    table = format_spread_table(summary)
    result = {"metrics": summary, "per_seed": per_seed, "evaluator_accuracy": evaluator_acc, "timings_s": timings,
              "teacher_diagnostics": diagnostics, "media": media, "device": str(_device()),
              "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()},
              "notes": "students are evaluated with their power-EMA weights; every row of a seed uses the same "
                       "noise and conditions; fd_teacher/mse_teacher compare with the teacher's sample from the "
                       "same noise; the clip evaluator is trained once (seed 0) on real clips."}
    write_atomic(out / "metrics.json", json.dumps(result, indent=1))
    say("\n" + table)
    say(f"\nmetrics: {out / 'metrics.json'}\ntotal wall time: {timings['total']:.0f} s")
    return result
