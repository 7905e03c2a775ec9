"""The FLOP model of the step benchmark against PyTorch's own FLOP counter on the real model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_rcm.parallel.state import initialize_parallel
from megatron_rcm.training.flops import PassFlops, model_flops, recompute_share, step_flops
from tests.wan_helpers import make_ours


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


def _counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
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


def test_selective_recompute_share_leaves_out_the_counted_self_attention(one_thread):
    """Selective recompute re-runs a forward without the self-attention cores: the share is the forward's
    FLOPs less those FlopCounterMode counts for the cores (the forward counted with them and with a zero-FLOP
    stand-in; float64 torch attention)."""
    from megatron_rcm.models.config_fields import recompute_fields

    model = make_ours("t2v", dtype=torch.float64, **recompute_fields(True, granularity="selective"))
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 3, 8, 12, dtype=torch.float64)
    ts, ctx = torch.tensor([300.0], dtype=torch.float64), torch.randn(1, 5, cfg.text_dim, dtype=torch.float64)
    fwd, _ = model_flops(cfg, x.shape[1:], 5)
    with_cores = _counted(lambda: model(x, ts, ctx))
    for block in model.blocks:
        block.self_attn.core = lambda q, k, v, *rest: (torch.zeros_like(q), None)
    core_flops = with_cores - _counted(lambda: model(x, ts, ctx))
    assert core_flops > 0
    want = (fwd.total - core_flops) / fwd.total
    assert recompute_share(cfg, fwd, x.shape[1:], 1.0) == pytest.approx(want, rel=1e-12)
    assert recompute_share(cfg, fwd, x.shape[1:], 0.5) == pytest.approx(0.5 * want, rel=1e-12)
    full = make_ours("t2v", dtype=torch.float64, **recompute_fields(True)).config
    assert recompute_share(full, fwd, x.shape[1:], 0.5) == 0.5


def test_step_flops_compose_passes():
    F, J = PassFlops(3.0, 1.0), PassFlops(5.0, 3.0)  # F = 4, J = 8
    assert step_flops("warmup", F, J, batch=1) == 2 * 4 + 8 + 2 * 4
    assert step_flops("student", F, J, batch=2, rollout_steps=3) == 2 * (24 + 3 * 4 + 8 + 4 + 8)
    assert step_flops("critic", F, J, batch=1, rollout_steps=2, recompute=True) == 2 * 4 + 4 + 3 * 4
    # block recompute of a quarter of the blocks: a quarter of a forward more per backward
    assert step_flops("critic", F, J, batch=1, rollout_steps=2, recompute=0.25) == 2 * 4 + 4 + 2.25 * 4
    with pytest.raises(ValueError, match=r"share of the blocks in \[0, 1\], got 2"):
        step_flops("critic", F, J, batch=1, recompute=2)
    with pytest.raises(ValueError, match="step kind"):
        step_flops("teacher", F, J, batch=1)
