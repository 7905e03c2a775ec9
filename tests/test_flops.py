"""The FLOP model of the step benchmark against PyTorch's own FLOP counter on the real model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_rcm.parallel.state import initialize_parallel
from megatron_rcm.training.flops import PassFlops, model_flops, recompute_shares, step_flops
from tests.wan_helpers import make_ours


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


def _counted(fn, grad: bool = False) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(grad):
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("grid", [(1, 4, 4), (3, 4, 6)])
def test_model_flops_match_torch_flop_counter(grid, one_thread):
    """Forward and JVP pass of a tiny t2v Wan (float64: the torch attention, every product a counted matmul;
    sdpa's CPU kernel is not counted by FlopCounterMode)."""
    F, H, W = grid
    L = 5
    model = make_ours("t2v", dtype=torch.float64)
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, F, 2 * H, 2 * W, dtype=torch.float64)
    ts = torch.tensor([300.0], dtype=torch.float64)
    ctx = torch.randn(1, L, cfg.text_dim, dtype=torch.float64)
    fwd, jvp = model_flops(cfg, x.shape[1:], L)
    assert _counted(lambda: model(x, ts, ctx)) == fwd.total
    assert _counted(lambda: model.forward_jvp(x, torch.randn_like(x), ts, torch.ones(1, dtype=torch.float64), ctx)) == jvp.total


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_shares_are_what_the_backward_re_runs(one_thread, granularity):
    """FlopCounterMode over a JVP pass + backward and a forward + backward, with recompute minus without: the
    backward of the JVP pass's graph re-runs the JVP pass (primal and tangent) under full recompute and it less
    the self-attention products under selective; a forward's graph re-runs the forward (less those products)."""
    from megatron_rcm.models.config_fields import recompute_fields

    models = {rc: make_ours("t2v", dtype=torch.float64, **recompute_fields(rc, granularity=granularity))
              for rc in (False, True)}
    models[True].load_state_dict(models[False].state_dict())
    cfg = models[True].config
    x = torch.randn(1, cfg.in_channels, 3, 8, 12, dtype=torch.float64)
    ts, ctx = torch.tensor([300.0], dtype=torch.float64), torch.randn(1, 5, cfg.text_dim, dtype=torch.float64)
    t_x, t_ts = torch.randn_like(x), torch.ones(1, dtype=torch.float64)
    fwd, jvp = model_flops(cfg, x.shape[1:], 5)

    def jvp_and_backward(model):
        v, _ = model.forward_jvp(x, t_x, ts, t_ts, ctx)
        v.sum().backward()

    def forward_and_backward(model):
        model(x, ts, ctx).sum().backward()

    count = lambda fn, rc: _counted(lambda: fn(models[rc]), grad=True)  # noqa: E731
    extra_jvp = count(jvp_and_backward, True) - count(jvp_and_backward, False)
    extra_fwd = count(forward_and_backward, True) - count(forward_and_backward, False)
    share, share_jvp = recompute_shares(cfg, fwd, jvp, x.shape[1:], 1.0, text_len=5)
    assert extra_jvp == pytest.approx(share_jvp * jvp.total, rel=1e-12)
    assert extra_fwd == pytest.approx(share * fwd.total, rel=1e-12)
    assert 0 < share < 1 and 0 < share_jvp < 1  # embeddings and head are not recomputed
    half = recompute_shares(cfg, fwd, jvp, x.shape[1:], 0.5, text_len=5)
    assert half == pytest.approx((share / 2, share_jvp / 2), rel=1e-12)


def test_step_flops_compose_passes():
    F, J = PassFlops(3.0, 1.0), PassFlops(5.0, 3.0)  # F = 4, J = 8
    assert step_flops("warmup", F, J, batch=1) == 2 * 4 + 8 + 2 * 4
    assert step_flops("student", F, J, batch=2, rollout_steps=3) == 2 * (24 + 3 * 4 + 8 + 4 + 8)
    assert step_flops("critic", F, J, batch=1, rollout_steps=2, recompute=True) == 2 * 4 + 4 + 3 * 4
    # block recompute of a quarter of the blocks: a quarter of a forward more per backward
    assert step_flops("critic", F, J, batch=1, rollout_steps=2, recompute=0.25) == 2 * 4 + 4 + 2.25 * 4
    # the JVP pass's graph re-runs the JVP pass: full recompute, and a selective share of it
    assert step_flops("warmup", F, J, batch=1, recompute=True) == 2 * 4 + 8 + 2 * 4 + 8
    assert step_flops("warmup", F, J, batch=1, recompute=0.5, recompute_jvp=0.25) == 2 * 4 + 8 + 2 * 4 + 2
    with pytest.raises(ValueError, match=r"share of the blocks in \[0, 1\], got 2"):
        step_flops("critic", F, J, batch=1, recompute=2)
    with pytest.raises(ValueError, match="step kind"):
        step_flops("teacher", F, J, batch=1)
