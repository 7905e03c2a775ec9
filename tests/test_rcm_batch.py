"""The one broadcast-over-batch helper and the one TrigFlow noising helper (rcm_math.md section 1)."""

from __future__ import annotations

import math

import torch

from megatron_rcm.rcm.batch import add_noise, per_sample


def test_per_sample_shape_and_dtype():
    c_B = torch.tensor([0.1, 0.2], dtype=torch.float64)
    like = torch.zeros(2, 3, 4, 5, 6)
    out = per_sample(c_B, like)
    assert out.shape == (2, 1, 1, 1, 1) and out.dtype == torch.float32  # cast to like's dtype
    promoted = per_sample(c_B, like, promote=True)
    assert promoted.dtype == torch.float64 and torch.equal(promoted.flatten(), c_B)  # float64 kept
    assert per_sample(c_B.float(), like.double(), promote=True).dtype == torch.float64


def test_add_noise_is_cos_t_x0_plus_sin_t_eps():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t_B = torch.tensor([0.0, 0.7, math.pi / 2], dtype=torch.float64)
    x_t = add_noise(x0, eps, t_B)
    for i, t in enumerate(t_B.tolist()):  # independent: per sample, Python trig
        assert torch.allclose(x_t[i], math.cos(t) * x0[i] + math.sin(t) * eps[i], atol=1e-6)
    assert torch.equal(add_noise(x0, eps, 0.7), math.cos(0.7) * x0 + math.sin(0.7) * eps)
