"""FP8 vs BF16 loss curves: the same 200-step rCM distillation (Wan architecture, a few layers, mock data, same
seed) with Transformer Engine linears in BF16 and in FP8 (current scaling), on one GPU.

    python tools/fp8_curves.py [--steps 200] [--out docs/img/fp8_curves]

Writes ``OUT.json`` (per-step losses of both runs) and ``OUT.png`` (both curves), atomically, and prints one
JSON line with the max / mean relative difference of the curves: per step |l_fp8 - l_bf16| / |l_bf16| of the
step's loss (``loss/student`` on student steps, ``loss/critic`` on critic steps), raw and over a 10-step moving
average (the per-step losses of one run are noisy: random times and noise each step). Sized to run in well
under two minutes on one H200 (about 4k tokens per step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ARCH = ("model.overrides={num_layers: 2, hidden_size: 512, ffn_hidden_size: 1536, num_attention_heads: 4, "
        "in_channels: 16, out_channels: 16, text_dim: 64, freq_dim: 64}")
"""The Wan2.1 DiT at 2 layers, 512 wide (head dim 128 as in the released models)."""


def _overrides(steps: int, fp8: str | None, out_dir: str) -> list[str]:
    return [ARCH, "model.preset=wan2.1-t2v-1.3b", "model.params_dtype=bf16", "model.transformer_impl=transformer_engine",
            f"model.fp8={fp8 or 'null'}", "data.source=mock", "data.micro_batch_size=4", "data.text_len=16",
            "data.text_dim=64", "data.latent_shape=[16,4,32,32]", "distill.algorithm=rcm",
            "distill.tangent_warmup=20", "distill.student_update_freq=2", "optimizer.lr=1e-4",
            "optimizer.critic_lr=1e-4", "optimizer.warmup_steps=10", f"training.max_steps={steps}",
            "training.seed=7", f"training.output_dir={out_dir}", "checkpoint.dir=null",
            "logging.progress_bar=false", "logging.log_every=100000", "logging.wandb_mode=disabled"]


def _step_loss(m: dict) -> float:
    return float(m["loss/student"] if "loss/student" in m else m["loss/critic"])


def run(steps: int, fp8: str | None, out_dir: str) -> list[float]:
    from megatron_rcm.config import load_config
    from megatron_rcm.training import Trainer

    trainer = Trainer(load_config(None, _overrides(steps, fp8, out_dir)))
    history = trainer.train()
    trainer.close()
    return [_step_loss(m) for m in history]


def _moving_average(xs: list[float], k: int = 10) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(xs))]


def curve_difference(bf16: list[float], fp8: list[float]) -> dict:
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(fp8, bf16)]
    ma = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(_moving_average(fp8), _moving_average(bf16))]
    return {"max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel),
            "max_rel_diff_ma10": max(ma), "mean_rel_diff_ma10": sum(ma) / len(ma)}


def plot(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """A line plot (log-scale loss vs step) drawn with PIL, written atomically."""
    import math
    import os

    from PIL import Image, ImageDraw

    W, H, pad = 900, 500, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    vals = [math.log10(max(v, 1e-12)) for c in curves.values() for v in c]
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1
    n = max(len(c) for c in curves.values())
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        y = H - pad - (e - lo) / (hi - lo) * (H - 2 * pad)
        if pad <= y <= H - pad:
            d.line([pad - 5, y, pad, y], fill="black")
            d.text((5, y - 6), f"1e{e}", fill="black")
    for s in range(0, n + 1, max(1, n // 5)):
        x = pad + s / max(1, n - 1) * (W - 2 * pad)
        d.text((x - 8, H - pad + 8), str(s), fill="black")
    colors = ["#1f77b4", "#d62728", "#2ca02c"]
    for (name, c), color in zip(curves.items(), colors):
        pts = [(pad + i / max(1, n - 1) * (W - 2 * pad),
                H - pad - (math.log10(max(v, 1e-12)) - lo) / (hi - lo) * (H - 2 * pad)) for i, v in enumerate(c)]
        d.line(pts, fill=color, width=2)
        d.text((W - pad - 150, pad + 10 + 15 * colors.index(color)), name, fill=color)
    d.text((pad, 20), title, fill="black")
    d.text((W // 2 - 20, H - 25), "step", fill="black")
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def main(argv=None) -> int:
    import os
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="docs/img/fp8_curves", help="writes OUT.json and OUT.png")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = run(args.steps, None, f"{tmp}/bf16")
        fp8 = run(args.steps, "current", f"{tmp}/fp8")
    diff = curve_difference(bf16, fp8)
    record = {"steps": args.steps, "config": _overrides(args.steps, "<fp8>", "<tmp>"), "loss_bf16": bf16,
              "loss_fp8_current": fp8, **diff}
    tmp_json = out.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(record, indent=1))
    os.replace(tmp_json, out.with_suffix(".json"))
    plot({"TE BF16": bf16, "TE FP8 (current)": fp8}, out.with_suffix(".png"),
         f"rCM loss, {args.steps} steps: max rel diff {diff['max_rel_diff']:.3f}, "
         f"mean {diff['mean_rel_diff']:.3f} (10-step avg: {diff['mean_rel_diff_ma10']:.3f})")
    print(json.dumps({"bench": "fp8_curves", "steps": args.steps, **diff}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
