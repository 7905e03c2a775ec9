"""Sample-quality metrics in a classifier's feature space (the quickstart's table).

* ``class_acc`` (quality): fraction of samples the classifier assigns to the class they were generated for.
* ``precision`` / ``recall`` (Kynkaanniemi et al. 2019, k-NN manifolds, k = 3): precision is the fraction
  of generated samples inside the real data's manifold (quality); recall the fraction of real samples
  inside the generated samples' manifold (mode coverage).
* ``diversity``: mean within-class pairwise feature distance of the samples divided by that of the real
  data, averaged over classes (1 = as varied as the data; near 0 = collapsed).
* ``fd``: Frechet distance between Gaussian fits of sample and real features.

Against the teacher (``teacher_metrics``; what distillation aims at: a student is good when it reproduces
its teacher, not when it drifts from the teacher towards the data):

* ``fd_teacher``: Frechet distance between the sample features and the teacher's sample features (same
  labels, same noise): does the student reproduce the teacher's *distribution*?
* ``mse_teacher``: mean over samples and pixels of (x - x_teacher)^2, x_teacher the teacher's sample from
  the same noise and label: does the student reproduce the teacher's *noise -> sample map* (its ODE)?
"""

from __future__ import annotations

import torch

from megatron_rcm.eval.frechet import frechet_distance


def knn_radii(feats_ND: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = torch.cdist(feats_ND.double(), feats_ND.double())
    return d.kthvalue(k + 1, dim=1).values


def manifold_coverage(query_MD: torch.Tensor, ref_ND: torch.Tensor, k: int = 3) -> float:
    """Fraction of query points within the k-NN ball of at least one reference point."""
    radii = knn_radii(ref_ND, k)
    d = torch.cdist(query_MD.double(), ref_ND.double())
    return float((d <= radii[None]).any(dim=1).double().mean())


def mean_pairwise_distance(feats_ND: torch.Tensor) -> float:
    n = feats_ND.shape[0]
    if n < 2:
        return float("nan")
    d = torch.cdist(feats_ND.double(), feats_ND.double())
    return float(d.sum() / (n * (n - 1)))


def within_class_diversity(feats_ND, labels_N, ref_feats_MD, ref_labels_M) -> float:
    ratios = []
    for c in torch.unique(ref_labels_M):
        a, b = feats_ND[labels_N == c], ref_feats_MD[ref_labels_M == c]
        if len(a) >= 2 and len(b) >= 2:
            ratios.append(mean_pairwise_distance(a) / mean_pairwise_distance(b))
    return float(sum(ratios) / len(ratios)) if ratios else float("nan")


def sample_metrics(probs_NK, feats_ND, labels_N, ref_feats_MD, ref_labels_M, k: int = 3) -> dict[str, float]:
    """All scores of one sample set against the real reference features."""
    finite = torch.isfinite(feats_ND).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{int((~finite).sum())} samples have non-finite classifier features")
    return {
        "class_acc": float((probs_NK.argmax(-1) == labels_N).double().mean()),
        "precision": manifold_coverage(feats_ND, ref_feats_MD, k),
        "recall": manifold_coverage(ref_feats_MD, feats_ND, k),
        "diversity": within_class_diversity(feats_ND, labels_N, ref_feats_MD, ref_labels_M),
        "fd": frechet_distance(feats_ND, ref_feats_MD),
    }


def paired_mse(samples_NCFHW: torch.Tensor, reference_NCFHW: torch.Tensor) -> float:
    """Mean over pairs and elements of (x - x_ref)^2 (float64); pair i shares its noise and label."""
    if samples_NCFHW.shape != reference_NCFHW.shape:
        raise ValueError(f"paired_mse needs samples and references of one shape, got "
                         f"{tuple(samples_NCFHW.shape)} and {tuple(reference_NCFHW.shape)}")
    return float((samples_NCFHW.double().cpu() - reference_NCFHW.double().cpu()).square().mean())


def teacher_metrics(feats_ND, teacher_feats_ND, samples_NCFHW=None, teacher_samples_NCFHW=None
                    ) -> dict[str, float | None]:
    """``fd_teacher`` and ``mse_teacher`` (module docstring) of one sample set against the teacher's
    samples. Without ``samples_NCFHW`` (e.g. real data, which has no same-noise pairing) ``mse_teacher``
    is None."""
    mse = None if samples_NCFHW is None else paired_mse(samples_NCFHW, teacher_samples_NCFHW)
    return {"fd_teacher": frechet_distance(feats_ND, teacher_feats_ND), "mse_teacher": mse}


TABLE_COLUMNS = ("class_acc", "precision", "recall", "diversity", "fd", "fd_teacher", "mse_teacher")
"""The quickstart's columns: five against the real data, then two against the teacher's samples."""


def format_table(rows: dict[str, dict[str, float | None]], columns=TABLE_COLUMNS) -> str:
    """Fixed-width text table: one row per method, one column per metric ("-" where a value is None)."""
    name_w = max(len("method"), *(len(r) for r in rows))
    widths = [max(9, len(c)) for c in columns]
    head = f"{'method':<{name_w}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        cells = []
        for c, w in zip(columns, widths):
            v = m.get(c)
            v = 0.0 if v is not None and round(v, 3) == 0 else v  # "0.000", not "-0.000" for -1e-12
            cells.append(f"{'-':>{w}}" if v is None else f"{v:>{w}.3f}")
        lines.append(f"{name:<{name_w}}  " + "  ".join(cells))
    return "\n".join(lines)
