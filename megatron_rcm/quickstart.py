"""``megatron-rcm quickstart``: the embedded end-to-end demo (no weights, no downloads).

1. Train a tiny Wan2.1 DiT teacher (the same ``WanModel`` code path as the 1.3B/14B models) with
   rectified flow on scikit-learn's 8x8 digits as 1-frame videos; label -> fixed random "text embedding".
2. Distill it with rCM and the sCM-only and DMD-only baselines through the same ``Trainer`` / engine.
3. Evaluate the teacher (50-step RF Euler, CFG) and every student (EMA weights, 1, 2 and 4 steps) on the
   same seeds and labels as the held-out real digits, with a classifier trained on the real training
   split: class accuracy, k-NN precision/recall, within-class diversity and Frechet distance to the real
   digits in its feature space, and, for what distillation aims at, the Frechet distance to the
   teacher's samples and the mean squared distance to the teacher's sample from the same noise
   (``megatron_rcm.eval``). Writes PNG grids, ``metrics.json`` and prints the table.

The options, the config of every method and the output folder are checked before the teacher is
trained. Everything is written into a temporary folder beside the output folder, which replaces the
output folder only once the run has finished: a second run into the same folder replaces the first
run's results as a whole (no stale grids beside new metrics), a failed run leaves them untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_rcm.atomic import make_temp_dir, publish_dir, sweep_leftovers
from megatron_rcm.config.schema import ConfigError
from megatron_rcm.rcm.engine import ALGORITHMS

# The quickstart's distillation config; examples/configs/quickstart.yaml holds the same values (a test
# keeps them equal) so that `megatron-rcm train --config examples/configs/quickstart.yaml` reproduces it.
QUICKSTART_OVERRIDES = [
    "model.preset=wan-tiny-t2v",
    "model.params_dtype=fp32",
    "model.overrides={in_channels: 1, out_channels: 1, text_dim: 32, num_layers: 2, hidden_size: 128,"
    " ffn_hidden_size: 256, num_attention_heads: 4, freq_dim: 32}",
    "distill.algorithm=rcm",
    "distill.guidance=2.0",
    "distill.tangent_warmup=100",
    "distill.student_update_freq=2",
    "distill.student_time={kind: lognormal, P_mean: 0.0, P_std: 1.6}",
    "distill.critic_time={kind: uniform_shift, shift: 1.0}",
    "distill.sigma_max=80.0",
    "optimizer.lr=1e-4",
    "optimizer.critic_lr=1e-4",
    "optimizer.warmup_steps=20",
    "optimizer.clip_grad=1.0",
    "data.source=digits",
    "data.micro_batch_size=64",
    "data.latent_shape=[1,1,8,8]",
    "data.text_len=4",
    "data.text_dim=32",
    "checkpoint.save_every=0",
    "checkpoint.keep_last=1",
    "logging.log_every=50",
    "logging.sample_every=0",
    "training.max_steps=400",
    "training.seed=0",
    "training.output_dir=outputs/quickstart/rcm",
]


@dataclass
class QuickstartOptions:
    output_dir: str = "outputs/quickstart"
    """Where the teacher, the students, the grids and metrics.json go."""
    teacher_steps: int = 1000
    """Rectified-flow training steps of the teacher (batch ``teacher_batch``)."""
    teacher_batch: int = 128
    """Teacher training batch size."""
    teacher_lr: float = 1e-3
    """Teacher peak learning rate (AdamW, warm-up then cosine)."""
    distill_steps: int = 400
    """Training steps of each distillation run (student and critic steps together)."""
    methods: tuple[str, ...] = ("rcm", "scm", "dmd")
    """Distillation algorithms to run (``DistillConfig.algorithm`` values)."""
    teacher_sample_steps: int = 50
    """RF Euler steps of the teacher reference samples."""
    student_steps: tuple[int, ...] = (1, 2, 4)
    """Student sampling step counts that are evaluated."""
    overrides: list[str] = field(default_factory=list)
    """Extra ``key=value`` overrides of the distillation config."""
    progress: bool = True
    """Show progress bars."""


_MAX_THREADS = torch.get_num_threads()


def digit_example(text_len: int, text_dim: int) -> tuple:
    """Network inputs of one batch of 128 digit images (x, timestep, context) for ``pick_num_threads``."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(128, 1, 1, 8, 8, generator=g), torch.rand(128, generator=g) * 1000,
            torch.randn(128, text_len, text_dim, generator=g))


def pick_num_threads(model, example: tuple) -> int:
    """CPU only: time a forward pass of ``model`` on ``example`` inputs with all cores and with one, keep
    the faster.

    When another process keeps a core busy, PyTorch's intra-op threads wait on each other at every
    barrier and a 2-thread step became ~25x slower (0.13 s -> 3 s per teacher step, measured); one
    thread then wins. Re-checked at every stage because the machine's load changes."""
    if torch.cuda.is_available() or _MAX_THREADS == 1:
        return torch.get_num_threads()
    best = None
    for n in (_MAX_THREADS, 1):
        torch.set_num_threads(n)
        with torch.no_grad():
            model(*example)
            t0 = time.perf_counter()
            for _ in range(3):
                model(*example)
        dt = time.perf_counter() - t0
        if best is None or dt < best[1]:
            best = (n, dt)
    torch.set_num_threads(best[0])
    return best[0]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _train_teacher(opts: QuickstartOptions, cfg, out: Path, say):
    from tqdm.auto import tqdm

    from megatron_rcm.data.digits import DigitsSource
    from megatron_rcm.training.models import build_model, build_wan_config, export_model
    from megatron_rcm.training.teacher_pretrain import pretrain_teacher

    device = _device()
    teacher = build_model(build_wan_config(cfg.model, cfg.data, recompute=False), cfg.training.seed).to(device)
    data = DigitsSource(opts.teacher_batch, cfg.data.text_len, cfg.data.text_dim, seed=cfg.training.seed,
                        split="train")
    bar = tqdm(total=opts.teacher_steps, desc="teacher (rectified flow)", disable=not opts.progress)

    threads = pick_num_threads(teacher, digit_example(cfg.data.text_len, cfg.data.text_dim))

    def on_step(step, loss, _dt):
        nonlocal threads
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4f}", threads=threads, refresh=False)
        if step % 250 == 249:
            threads = pick_num_threads(teacher, digit_example(cfg.data.text_len, cfg.data.text_dim))

    t0 = time.time()
    losses = pretrain_teacher(teacher, data, opts.teacher_steps, lr=opts.teacher_lr,
                              timestep_scale=cfg.distill.timestep_scale, seed=cfg.training.seed, device=device,
                              on_step=on_step)
    bar.close()
    teacher.requires_grad_(False)
    path = export_model(teacher, out / "teacher")
    tail = losses[-100:]
    say(f"teacher: {opts.teacher_steps} steps in {time.time() - t0:.0f} s, final RF loss "
        f"{sum(tail) / len(tail):.4f}")
    return teacher, path, time.time() - t0


def _eval_setup(cfg):
    from megatron_rcm.data.digits import class_embeddings, load_digits_images, train_test_split
    from megatron_rcm.eval.classifier import predict, train_classifier

    images, labels = load_digits_images()
    train, test = train_test_split(len(labels))
    clf = train_classifier(images[train], labels[train])
    _, ref_feats = predict(clf, images[train])
    emb, neg = class_embeddings(cfg.data.text_len, cfg.data.text_dim)
    return dict(clf=clf, ref_feats=ref_feats, ref_labels=labels[train], test_images=images[test],
                test_labels=labels[test], emb=emb, neg=neg)


def _score(ev, samples, labels, teacher=None, paired=True):
    """Real-data scores of ``samples`` and, given ``teacher`` (``{"x": samples, "feats": features}``),
    the scores against the teacher's samples; ``paired=False``: no same-noise pairing (real data)."""
    from megatron_rcm.eval import sample_metrics, teacher_metrics
    from megatron_rcm.eval.classifier import predict

    x = samples.float().cpu().clamp(-1, 1)
    probs, feats = predict(ev["clf"], x)
    scores = sample_metrics(probs, feats, labels, ev["ref_feats"], ev["ref_labels"])
    if teacher is not None:
        scores.update(teacher_metrics(feats, teacher["feats"], x if paired else None, teacher["x"]))
    return scores, feats


def quickstart_config(opts: QuickstartOptions, method: str | None = None, extra: tuple[str, ...] = ()):
    """The distillation config of ``method`` (None: the base config) with the run's overrides."""
    from megatron_rcm.config import load_config

    algo = [] if method is None else [f"distill.algorithm={method}"]
    return load_config(None, [*QUICKSTART_OVERRIDES, f"training.max_steps={opts.distill_steps}", *algo,
                              *extra, *opts.overrides])


def check_options(opts: QuickstartOptions):
    """ConfigError naming the bad value before anything is trained; returns the base config."""
    methods = tuple(opts.methods)
    if not methods:
        raise ConfigError("quickstart: --methods is empty; give one or more of " + ",".join(ALGORITHMS))
    bad = [m for m in methods if m not in ALGORITHMS]
    if bad:
        raise ConfigError(f"quickstart: unknown method(s) {', '.join(map(repr, bad))} in --methods "
                          f"{','.join(methods)}; choose from {','.join(ALGORITHMS)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"quickstart: --methods {','.join(methods)} names a method twice")
    for name in ("teacher_steps", "teacher_batch", "distill_steps", "teacher_sample_steps"):
        if int(getattr(opts, name)) < 1:
            raise ConfigError(f"quickstart: {name} must be >= 1, got {getattr(opts, name)}")
    base = quickstart_config(opts)
    n_max = len(base.distill.mid_t) + 1
    if not opts.student_steps or any(not 1 <= int(n) <= n_max for n in opts.student_steps):
        raise ConfigError(f"quickstart: student_steps {tuple(opts.student_steps)} must be in 1..{n_max} "
                          f"(distill.mid_t has {n_max - 1} intermediate times)")
    for method in methods:  # the overrides must hold for every method, not only the base config
        quickstart_config(opts, method)
    return base


def quickstart_entries() -> set[str]:
    """Names a quickstart writes into its output folder (the only ones it will replace)."""
    return {"teacher", "metrics.json", "grid_all.png", *ALGORITHMS, *(f"grid_{a}.png" for a in ALGORITHMS)}


def prepare_output(out: Path, say) -> Path:
    """Check the output folder and make the temporary folder the run writes into (beside ``out``).

    ``out`` may be missing, empty, or a previous quickstart's output (only names from
    ``quickstart_entries``): anything else is refused, so that a mistyped ``--output-dir`` never
    replaces a folder of other files. Leftover temporary folders of killed runs are reported."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"quickstart: output folder {out} exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in quickstart_entries())
        if foreign:
            raise ConfigError(
                f"quickstart: output folder {out} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
                f"a quickstart does not write ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                f"it would be replaced: choose another --output-dir or empty it")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"quickstart: output folder {out} is not writable")
    sweep_leftovers(out, "quickstart", say)
    try:
        return make_temp_dir(out)
    except OSError as err:
        raise ConfigError(f"quickstart: cannot write beside the output folder {out}: {err}") from err


def run_quickstart(opts: QuickstartOptions) -> dict:
    """Run the whole demo; returns ``{"metrics": {row: {metric: value}}, "timings_s": {...}}``.

    Raises ConfigError for bad options or output folder before the teacher is trained."""
    say = lambda msg: print(msg, flush=True)
    base = check_options(opts)
    out = Path(opts.output_dir)
    work = prepare_output(out, say)
    try:
        result = _run(opts, base, work, out, say)
        publish_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(f"\ngrids: {', '.join(result['grids'].values())}\nmetrics: {out / 'metrics.json'}\n"
        f"total wall time: {result['timings_s']['total']:.0f} s")
    return result


def _run(opts: QuickstartOptions, base, work: Path, out: Path, say) -> dict:
    """The demo, writing into ``work``; paths in the result name their place in ``out``."""
    from megatron_rcm.eval import format_table, teacher_metrics
    from megatron_rcm.parallel.state import initialize_parallel
    from megatron_rcm.rcm import Conditioning, TrigFlowDenoiser, euler_sample
    from megatron_rcm.training import Trainer
    from megatron_rcm.training.samples import save_grid

    t_start = time.time()
    if not torch.cuda.is_available():
        torch.set_flush_denormal(True)  # denormal AdamW moments slow CPU steps ~30x (see Trainer)
    initialize_parallel(1, seed=base.training.seed)
    device = _device()
    say(f"megatron-rcm quickstart on {device}: teacher {opts.teacher_steps} steps, "
        f"{len(opts.methods)} distillations x {opts.distill_steps} steps -> {out}")
    timings = {}

    teacher, teacher_path, timings["teacher_train"] = _train_teacher(opts, base, work, say)
    t0 = time.time()
    ev = _eval_setup(base)
    labels = ev["test_labels"]
    cond = Conditioning(context=ev["emb"][labels].to(device), neg_context=ev["neg"].to(device))
    noise = torch.randn((len(labels), 1, 1, 8, 8), generator=torch.Generator().manual_seed(2024)).to(device)
    show = torch.cat([torch.nonzero(labels == c)[:2, 0] for c in range(10)])  # two of each digit, same seeds
    w = base.distill.guidance
    pick_num_threads(teacher, digit_example(base.data.text_len, base.data.text_dim))
    denoiser = TrigFlowDenoiser(teacher, base.distill.timestep_scale)
    teacher_x = euler_sample(denoiser, noise, cond, guidance=w, num_steps=opts.teacher_sample_steps, shift=1.0)
    teacher_name = f"teacher {opts.teacher_sample_steps}-step (CFG {w:g})"
    teacher_scores, teacher_feats = _score(ev, teacher_x, labels)
    ref = {"x": teacher_x.float().cpu().clamp(-1, 1), "feats": teacher_feats}
    teacher_scores.update(teacher_metrics(teacher_feats, teacher_feats, ref["x"], ref["x"]))  # 0 by definition
    metrics = {"real digits (held-out)": _score(ev, ev["test_images"], labels, ref, paired=False)[0],
               teacher_name: teacher_scores}
    timings["eval_teacher"] = time.time() - t0
    grids = {}
    rows_all = {"real (held-out)": ev["test_images"][show], f"teacher {opts.teacher_sample_steps}-step":
                teacher_x[show]}

    for method in opts.methods:
        t0 = time.time()
        cfg = quickstart_config(opts, method, (f"model.teacher_checkpoint={teacher_path}",
                                               f"training.output_dir={work / method}",
                                               f"logging.progress_bar={opts.progress}"))
        trainer = Trainer(cfg, teacher=teacher)
        threads = pick_num_threads(teacher, digit_example(cfg.data.text_len, cfg.data.text_dim))
        say(f"distilling with {method}: {opts.distill_steps} steps ({threads} CPU threads)" if device.type == "cpu"
            else f"distilling with {method}: {opts.distill_steps} steps")
        recheck = lambda tr, _m: (pick_num_threads(teacher, digit_example(base.data.text_len, base.data.text_dim))
                                  if device.type == "cpu" and tr.step % 100 == 0 else None)
        trainer.train(on_step=recheck)
        timings[f"distill_{method}"] = time.time() - t0
        rows = {teacher_name: teacher_x[show]}
        for n in opts.student_steps:
            from megatron_rcm.data.batch import Batch

            batch = Batch(latent_BCFHW=noise, context_BLD=cond.context, neg_context_BLD=cond.neg_context)
            xs = trainer.sample(n, batch, use_ema=True, seed=2024, noise=noise)
            metrics[f"{method} student {n}-step"] = _score(ev, xs, labels, ref)[0]
            rows[f"{method} {n}-step"] = xs[show]
            rows_all[f"{method} {n}-step"] = xs[show]
        save_grid(rows, work / f"grid_{method}.png", label_width=170)
        grids[method] = str(out / f"grid_{method}.png")
        trainer.close()
    save_grid(rows_all, work / "grid_all.png", label_width=170)
    grids["all"] = str(out / "grid_all.png")
    timings["total"] = time.time() - t_start

    table = format_table(metrics)
    result = {"metrics": metrics, "timings_s": timings, "grids": grids, "device": str(device),
              "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()},
              "notes": "students are evaluated with their power-EMA weights; every row uses the same noise "
                       "and the labels of the held-out real digits; features/classes from a classifier trained "
                       "on the real training split (megatron_rcm/eval). class_acc, precision, recall, "
                       "diversity, fd: against the real digits (sample quality); fd_teacher: Frechet distance "
                       "to the teacher's samples (does the student match the teacher's distribution?); "
                       "mse_teacher: mean squared pixel distance to the teacher's sample from the same noise "
                       "(does it match the teacher's noise-to-sample map?); see docs/quickstart.md."}
    (work / "metrics.json").write_text(json.dumps(result, indent=1))
    say("\n" + table)
    return result
