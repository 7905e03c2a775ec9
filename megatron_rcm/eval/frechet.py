"""Frechet distance between Gaussians fitted to two feature sets (the FID formula, in any feature space).

    FD = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr( (S_1^1/2 S_2 S_1^1/2)^1/2 )

computed in float64 with symmetric eigendecompositions (tr sqrt(S_1 S_2) equals the trace of the square
root of the symmetric PSD matrix S_1^1/2 S_2 S_1^1/2, whose eigenvalues are clipped at 0).
"""

from __future__ import annotations

import numpy as np
import torch


def gaussian_stats(feats_ND) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) in float64; covariance with the unbiased 1/(N-1) normalization."""
    x = torch.as_tensor(feats_ND).detach().cpu().numpy().astype(np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def _sqrt_psd(S: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh((S + S.T) / 2)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def frechet_distance_from_stats(mu1, S1, mu2, S2) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    S1, S2 = np.atleast_2d(np.asarray(S1, np.float64)), np.atleast_2d(np.asarray(S2, np.float64))
    r1 = _sqrt_psd(S1)
    M = r1 @ S2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * tr_covmean)


def frechet_distance(feats_a_ND, feats_b_ND) -> float:
    """FD between Gaussian fits of two feature sets [N, D] and [M, D]."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a_ND), *gaussian_stats(feats_b_ND))
