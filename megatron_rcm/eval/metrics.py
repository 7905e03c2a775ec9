"""Sample-quality metrics in a classifier's feature space (the quickstart's table).

* ``class_acc`` (quality): fraction of samples the classifier assigns to the class they were generated for.
* ``precision`` / ``recall`` (Kynkaanniemi et al. 2019, k-NN manifolds, k = 3): precision is the fraction
  of generated samples inside the real data's manifold (quality); recall the fraction of real samples
  inside the generated samples' manifold (mode coverage).
* ``diversity``: mean within-class pairwise feature distance of the samples divided by that of the real
  data, averaged over classes (1 = as varied as the data; near 0 = collapsed).
* ``fd``: Frechet distance between Gaussian fits of sample and real features.
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


def format_table(rows: dict[str, dict[str, float]], columns=("class_acc", "precision", "recall", "diversity",
                                                             "fd")) -> str:
    """Fixed-width text table: one row per method, one column per metric."""
    name_w = max(len("method"), *(len(r) for r in rows))
    head = f"{'method':<{name_w}}  " + "  ".join(f"{c:>9}" for c in columns)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        cells = []
        for c in columns:
            v = m.get(c)
            cells.append(f"{'-':>9}" if v is None else f"{v:>9.3f}")
        lines.append(f"{name:<{name_w}}  " + "  ".join(cells))
    return "\n".join(lines)
