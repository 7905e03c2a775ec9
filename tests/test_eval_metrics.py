"""Frechet distance against a float64 scipy reference and closed forms; the k-NN and diversity scores;
the digits classifier learns the real data."""

import numpy as np
import pytest
import scipy.linalg
import torch

from megatron_rcm.eval import (
    format_table,
    frechet_distance,
    frechet_distance_from_stats,
    manifold_coverage,
    paired_mse,
    sample_metrics,
    teacher_metrics,
)
from megatron_rcm.eval.metrics import within_class_diversity


def _scipy_fd(a, b):
    """The textbook FID formula with scipy's general matrix square root, float64."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fd_matches_scipy_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(300, 6)) @ rng.normal(size=(6, 6))
    assert frechet_distance(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-8)


def test_fd_identical_sets_is_zero_and_shift_is_squared_norm():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 5))
    assert abs(frechet_distance(a, a)) < 1e-9
    # same covariance, mean shifted by delta: FD = ||delta||^2 exactly
    delta = np.array([1.0, -2.0, 0.0, 0.5, 3.0])
    assert frechet_distance(a, a + delta) == pytest.approx((delta**2).sum(), rel=1e-9)


def test_fd_closed_form_for_diagonal_gaussians():
    # FD(N(0, diag(s1^2)), N(0, diag(s2^2))) = sum (s1 - s2)^2
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 1.0, 0.5])
    fd = frechet_distance_from_stats(np.zeros(3), np.diag(s1**2), np.zeros(3), np.diag(s2**2))
    assert fd == pytest.approx(((s1 - s2) ** 2).sum(), rel=1e-12)


def test_coverage_detects_a_missing_mode():
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(200, 2, generator=g) + 10, torch.randn(200, 2, generator=g) - 10])
    one_mode = torch.randn(200, 2, generator=g) + 10
    assert manifold_coverage(real, one_mode) == pytest.approx(0.5, abs=0.05)  # recall: half the data missed
    assert manifold_coverage(one_mode, real) > 0.9  # precision: what it makes is realistic


def test_diversity_is_one_for_same_distribution_and_small_for_collapse():
    g = torch.Generator().manual_seed(0)
    ref, lab = torch.randn(600, 4, generator=g), torch.arange(600) % 3
    same = torch.randn(600, 4, generator=g)
    assert within_class_diversity(same, lab, ref, lab) == pytest.approx(1.0, abs=0.08)
    collapsed = ref.mean(0, keepdim=True) + 0.01 * torch.randn(600, 4, generator=g)
    assert within_class_diversity(collapsed, lab, ref, lab) < 0.05


def test_sample_metrics_refuses_non_finite_features():
    f = torch.randn(10, 3)
    f[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sample_metrics(torch.rand(10, 2), f, torch.zeros(10, dtype=torch.long), torch.randn(10, 3),
                       torch.zeros(10, dtype=torch.long))


def test_digits_classifier_learns_the_real_data():
    from megatron_rcm.data.digits import load_digits_images, train_test_split
    from megatron_rcm.eval.classifier import predict, train_classifier

    x, y = load_digits_images()
    tr, te = train_test_split(len(y))
    model = train_classifier(x[tr], y[tr], epochs=15)
    probs, feats = predict(model, x[te])
    acc = float((probs.argmax(-1) == y[te]).double().mean())
    assert acc > 0.9
    assert feats.shape == (len(te), 64)


def test_paired_mse_matches_numpy_and_refuses_unpaired_shapes():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(7, 1, 1, 8, 8)), rng.normal(size=(7, 1, 1, 8, 8))
    want = sum(((a[i] - b[i]) ** 2).sum() for i in range(7)) / (7 * 64)  # per pair, then per element
    got = paired_mse(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert got == pytest.approx(want, rel=1e-6)
    assert paired_mse(torch.from_numpy(a), torch.from_numpy(a)) == 0.0
    with pytest.raises(ValueError, match=r"\(7, 1, 1, 8, 8\) and \(6, 1, 1, 8, 8\)"):
        paired_mse(torch.from_numpy(a), torch.from_numpy(b[:6]))


def test_teacher_columns_rank_the_student_that_matches_the_teacher_first():
    """The point of the teacher columns: a student that drifts from its (sharpened) teacher towards the
    data looks better against the data, and worse against the teacher, than one that matches it."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(800, 4, generator=g, dtype=torch.float64)
    teacher = 0.5 * torch.randn(800, 4, generator=g, dtype=torch.float64) + 1.0  # CFG-like: shifted, sharper
    matches = teacher + 0.05 * torch.randn(800, 4, generator=g, dtype=torch.float64)
    drifts = 0.5 * teacher + 0.5 * real  # halfway to the data, same noise pairing
    assert frechet_distance(drifts, real) < frechet_distance(matches, real)
    m_match = teacher_metrics(matches, teacher, matches, teacher)
    m_drift = teacher_metrics(drifts, teacher, drifts, teacher)
    assert m_match["fd_teacher"] < m_drift["fd_teacher"] and m_match["mse_teacher"] < m_drift["mse_teacher"]
    assert m_match["mse_teacher"] == pytest.approx(0.05**2, rel=0.1)
    assert m_match["fd_teacher"] == pytest.approx(frechet_distance(matches, teacher), rel=1e-12)
    unpaired = teacher_metrics(real, teacher)  # real data: no same-noise pairing
    assert unpaired["mse_teacher"] is None and unpaired["fd_teacher"] > 0


def test_format_table_has_the_teacher_columns_and_dashes_for_none():
    table = format_table({"real": {"fd": 1.0, "fd_teacher": 2.0, "mse_teacher": None},
                          "student": {"fd": 3.0, "fd_teacher": 0.5, "mse_teacher": 0.125},
                          "teacher": {"fd": 3.0, "fd_teacher": -2e-12, "mse_teacher": 0.0}})
    head, _, real, student, teacher = table.splitlines()
    assert teacher.split()[-2:] == ["0.000", "0.000"]  # a -2e-12 rounding residue is not printed "-0.000"
    assert head.split()[-2:] == ["fd_teacher", "mse_teacher"]
    assert real.split()[-3:] == ["1.000", "2.000", "-"] and student.split()[-2:] == ["0.500", "0.125"]
    assert len({len(line) for line in table.splitlines()}) == 1  # columns stay aligned
