"""Scores of generated clips (the shapes benchmark's table), in the clip evaluator's terms.

Per sample set, generated for conditions ``cond`` (shape, colour, direction) from a fixed noise:
* ``shape`` / ``colour`` / ``direction``: fraction of clips the evaluator assigns to the attribute they
  were generated for (does the sample follow the prompt?).
* ``motion``: fraction of consecutive frame pairs whose predicted direction of motion is the conditioned
  one (does the object move the right way at every frame, not just on average?).
* ``precision`` / ``recall``: k-NN manifold precision / recall (k = 3) against real clips in the 64-d
  feature space (quality / coverage), ``megatron_rcm.eval.metrics.manifold_coverage``.
* ``diversity``: within-condition mean pairwise feature distance relative to real clips (1 = as varied).
* ``fd_real``: Frechet distance to real clips' features. ``fd_teacher``: Frechet distance to the teacher's
  samples of the same conditions and noise (how far the student's distribution is from its teacher's).
* ``mse_teacher``: mean squared pixel distance to the teacher's sample from the same noise
  (``megatron_rcm.eval.metrics.paired_mse``: does the student reproduce the teacher's noise -> clip map?).
The same two teacher columns as the digits quickstart's table (``megatron_rcm.eval.metrics``).
"""

from __future__ import annotations

import math

import torch

from megatron_rcm.data.shapes import condition_attributes
from megatron_rcm.eval.frechet import frechet_distance
from megatron_rcm.eval.metrics import manifold_coverage, within_class_diversity

COLUMNS = ("shape", "colour", "direction", "motion", "precision", "recall", "diversity", "fd_real", "fd_teacher",
           "mse_teacher")


def video_metrics(pred: dict[str, torch.Tensor], cond_N: torch.Tensor, real: dict[str, torch.Tensor],
                  real_cond_M: torch.Tensor, teacher_feats_ND: torch.Tensor | None = None,
                  mse_teacher: float | None = None, k: int = 3) -> dict[str, float | None]:
    """All scores of one sample set. ``pred``/``real``: ``evaluate_clips`` outputs of the samples and of the
    real reference clips; ``teacher_feats_ND``: the teacher's features on the same conditions and noise."""
    feats = pred["features"]
    finite = torch.isfinite(feats).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{int((~finite).sum())} of {len(finite)} clips have non-finite evaluator features")
    s, c, d = condition_attributes(cond_N)
    acc = lambda a, b: float((a == b).double().mean())
    return {
        "shape": acc(pred["shape"], s),
        "colour": acc(pred["colour"], c),
        "direction": acc(pred["direction"], d),
        "motion": acc(pred["pair_direction"], d[:, None]),
        "precision": manifold_coverage(feats, real["features"], k),
        "recall": manifold_coverage(real["features"], feats, k),
        "diversity": within_class_diversity(feats, cond_N, real["features"], real_cond_M),
        "fd_real": frechet_distance(feats, real["features"]),
        "fd_teacher": None if teacher_feats_ND is None else frechet_distance(feats, teacher_feats_ND),
        "mse_teacher": mse_teacher,
    }


def mean_and_spread(per_seed: list[dict[str, dict[str, float | None]]]) -> dict[str, dict[str, dict]]:
    """``{row: {metric: {"mean", "std", "n"}}}`` over seeds; std is the sample standard deviation (n - 1;
    0 for one seed). Missing values (None) are skipped."""
    out: dict[str, dict[str, dict]] = {}
    for row in per_seed[0]:
        out[row] = {}
        for col in per_seed[0][row]:
            vals = [r[row][col] for r in per_seed if r.get(row, {}).get(col) is not None]
            if not vals:
                out[row][col] = {"mean": None, "std": None, "n": 0}
                continue
            m = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            out[row][col] = {"mean": m, "std": sd, "n": len(vals)}
    return out


def format_spread_table(summary: dict[str, dict[str, dict]], columns=COLUMNS) -> str:
    """Fixed-width table of ``mean_and_spread`` output: ``mean`` and, over more than one seed, ``±std``."""
    multi = any(v["n"] > 1 for row in summary.values() for v in row.values())
    width = 13 if multi else 9

    def cell(v):
        if v is None or v["mean"] is None:
            return f"{'-':>{width}}"
        return f"{v['mean']:.3f}±{v['std']:.3f}".rjust(width) if multi else f"{v['mean']:>{width}.3f}"

    name_w = max(len("method"), *(len(r) for r in summary))
    head = f"{'method':<{name_w}}  " + "  ".join(f"{c[:width]:>{width}}" for c in columns)
    lines = [head, "-" * len(head)]
    for name, m in summary.items():
        lines.append(f"{name:<{name_w}}  " + "  ".join(cell(m.get(c)) for c in columns))
    return "\n".join(lines)
