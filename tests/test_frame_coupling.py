"""frame_coupling against its closed form, and on the Wan DiT."""

import pytest
import torch

from megatron_rcm.eval.frame_coupling import frame_coupling


@pytest.mark.parametrize("a", [0.0, 0.5, 4.0])
def test_coupling_of_frame_mean_mixer_matches_closed_form(a):
    # v(x) = x + a mean_frames(x): a change d at frame f moves frame f by (1 + a/F) d, the others by (a/F) d
    F = 8
    v = lambda x: x + a * x.mean(dim=2, keepdim=True)
    x = torch.randn(3, 3, F, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = frame_coupling(v, x, frame=5, generator=torch.Generator().manual_seed(1))
    assert got == pytest.approx((a / F) / (1 + a / F), rel=1e-9, abs=1e-12)


def test_per_frame_network_has_zero_coupling_and_bad_input_is_named():
    conv = torch.nn.Conv3d(3, 3, (1, 3, 3), padding=(0, 1, 1))  # mixes pixels within a frame, never across
    x = torch.randn(2, 3, 6, 8, 8)
    assert frame_coupling(conv, x, frame=2) < 1e-6
    with pytest.raises(ValueError, match="frame 6 of a clip with 6 frames"):
        frame_coupling(conv, x, frame=6)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 8, 8\)"):
        frame_coupling(conv, x[:, :, 0], frame=0)
