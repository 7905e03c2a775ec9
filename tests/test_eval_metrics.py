"""Frechet distance against a float64 scipy reference and closed forms; the k-NN and diversity scores;
the digits classifier learns the real data."""

import numpy as np
import pytest
import scipy.linalg
import torch

from megatron_rcm.eval import frechet_distance, frechet_distance_from_stats, manifold_coverage, sample_metrics
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
