"""The posterior-mean denoiser against a hand computation, and the teacher's RF Euler sampler driven by it
(an end-to-end check of the sampler's time scale, velocity sign and last step with no trained network)."""

import math

import pytest
import torch

from megatron_rcm.data.shapes import prompt_embeddings, sample_clips
from megatron_rcm.eval.oracle_denoiser import oracle_gap, posterior_mean_x0
from megatron_rcm.rcm import Conditioning, TrigFlowDenoiser, euler_sample


def test_posterior_mean_against_hand_weights():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(3, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    s = 0.6
    for b in range(2):
        logits = [-float(((x[b] - (1 - s) * c) ** 2).sum()) / (2 * s * s) for c in bank]
        top = max(logits)
        w = [math.exp(v - top) for v in logits]
        expected = sum(wk / sum(w) * c for wk, c in zip(w, bank))
        torch.testing.assert_close(posterior_mean_x0(x, s, bank)[b], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(posterior_mean_x0(x, s, bank[:1]), bank[:1].expand_as(x))  # one clip: itself
    with pytest.raises(ValueError, match=r"x_s clips \(3, 2, 2, 2\) and bank clips \(3, 2, 2, 3\)"):
        posterior_mean_x0(x, s, torch.zeros(1, 3, 2, 2, 3))
    with pytest.raises(ValueError, match="s=0.0"):
        posterior_mean_x0(x, 0.0, bank)


class _OracleNet(torch.nn.Module):
    """A stand-in Wan network: net(x_s, T_scale * s, context) = v* = (x_s - x0*) / s over ``bank``."""

    def __init__(self, bank, timestep_scale):
        super().__init__()
        self.bank, self.timestep_scale = bank, timestep_scale

    def forward(self, x, timestep_B, context, clip_fea=None):
        s = float(timestep_B[0]) / self.timestep_scale
        return (x - posterior_mean_x0(x, s, self.bank)) / s


def test_rf_euler_sampler_driven_by_the_oracle_lands_on_real_clips():
    bank = sample_clips(torch.zeros(64, dtype=torch.long), 4, 8, 8, torch.Generator().manual_seed(1)).double()
    emb, neg = prompt_embeddings(8, 3)
    noise = torch.randn(6, 3, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    teacher = TrigFlowDenoiser(_OracleNet(bank, 1000.0), timestep_scale=1000.0)
    x = euler_sample(teacher, noise, Conditioning(context=emb[:6].double()), guidance=None, num_steps=30, shift=1.0)
    nearest = torch.cdist(x.flatten(1), bank.flatten(1)).min(1).values.square() / bank[0].numel()
    assert float(nearest.max()) < 1e-3  # each sample ends on a bank clip (a bank clip's mean square is ~0.9)
    distinct = torch.cdist(x.flatten(1), bank.flatten(1)).argmin(1).unique().numel()
    assert distinct >= 4  # six noises, mostly different clips: the sampler follows the noise, not one mode


def test_oracle_gap_bookkeeping_and_the_oracle_beats_a_blank_clip():
    kw = dict(conditions=(0, 7), frames=4, height=8, width=8, levels=(0.5, 0.9), clips_per_condition=3, bank_size=64)
    gap = oracle_gap(lambda x, s, c: torch.full_like(x, -1.0), seed=3, **kw)  # a blank (black) clip
    g, expected = torch.Generator().manual_seed(3), 0.0  # the same draws: bank, clips, then one noise per level
    for c in (0, 7):
        sample_clips(torch.full((64,), c), 4, 8, 8, g)
        clips = sample_clips(torch.full((3,), c), 4, 8, 8, g)
        torch.randn((2, *clips.shape), generator=g)
        expected += float((clips + 1).square().mean()) / 2
    for level in ("s=0.5", "s=0.9"):
        assert gap[level]["teacher_vs_clean"] == pytest.approx(expected, rel=1e-6)
        assert gap[level]["oracle_vs_clean"] < gap[level]["teacher_vs_clean"]
    assert gap["s=0.5"]["oracle_vs_clean"] < gap["s=0.9"]["oracle_vs_clean"]  # less noise, better estimate
