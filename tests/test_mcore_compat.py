"""The megatron-core workarounds are gated by the release that retires them."""

import pytest
import torch

from megatron_rcm.parallel import mcore_compat


def test_workarounds_apply_until_their_fixed_release(monkeypatch):
    monkeypatch.setattr(mcore_compat, "mcore_version", lambda: mcore_compat.Version("0.16.1"))
    assert mcore_compat.applies(None) and mcore_compat.applies("0.17.0")
    monkeypatch.setattr(mcore_compat, "mcore_version", lambda: mcore_compat.Version("0.17.0"))
    assert mcore_compat.applies(None) and not mcore_compat.applies("0.17.0")


def test_materialize_adamw_state_is_retired_by_its_release(monkeypatch):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    mcore_compat.materialize_adamw_state(opt)
    assert float(opt.state[p]["step"]) == 0 and torch.equal(opt.state[p]["exp_avg"], torch.zeros(3))
    fresh = torch.optim.AdamW([q := torch.nn.Parameter(torch.ones(2))])
    monkeypatch.setattr(mcore_compat, "ADAMW_COMMON_STEP_FIXED_IN", "0.1.0")  # "fixed" long ago: retired
    mcore_compat.materialize_adamw_state(fresh)
    assert len(fresh.state[q]) == 0


class _FakeDistOpt:
    """The two pieces of megatron-core 0.16's DistributedOptimizer that ``load_states_around_step`` wraps:
    the state lookup and ``_set_main_param_and_optimizer_states``, which copies every key of the state."""

    def __init__(self):
        self.main = torch.nn.Parameter(torch.zeros(4))
        self.optimizer = torch.optim.AdamW([self.main])
        self.optimizer.state[self.main] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4),
                                           "exp_avg_sq": torch.zeros(4)}
        self.model_param_group_index_map = {"w": (0, 0)}

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        dst = {"param": self.main, **self.optimizer.state[self.main]}
        for key in dst:
            dst[key].data.copy_(tensors[key])


@pytest.mark.parametrize("with_stale_step", [False, True])
def test_loaded_states_keep_the_step_from_the_param_groups(with_stale_step):
    """fully_reshardable tensors carry no step (KeyError without the workaround); dp_reshardable ones carry
    the load template's stale step 0 (the step went back to 0 without the workaround, seen on an H200)."""
    from megatron_rcm.parallel.mcore_compat import load_states_around_step

    opt = _FakeDistOpt()
    tensors = {"param": torch.ones(4), "exp_avg": torch.full((4,), 2.0), "exp_avg_sq": torch.full((4,), 5.0)}
    if with_stale_step:
        tensors["step"] = torch.tensor(0.0)
    load_states_around_step(opt)
    opt._set_main_param_and_optimizer_states("w", tensors)
    state = opt.optimizer.state[opt.main]
    assert float(state["step"]) == 3.0
    assert torch.equal(opt.main.data, tensors["param"]) and torch.equal(state["exp_avg_sq"], tensors["exp_avg_sq"])


class _FusedAdamLike(torch.optim.Optimizer):
    """The state API of Transformer Engine's FusedAdam that ``materialize_adamw_state`` relies on (TE cannot be
    imported here): step kept in the param group, ``initialize_state`` making zero moments, and a
    ``name_to_dtype_map`` with no entry for a per-parameter ``step`` (its ``state_dict`` raises on one)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-3})
        self.name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32}

    def initialize_state(self, param, store_param_remainders):
        self.state[param]["exp_avg"] = torch.zeros_like(param)
        self.state[param]["exp_avg_sq"] = torch.zeros_like(param)

    def state_dict(self):
        for st in self.state.values():
            for name in st:
                self.name_to_dtype_map[name]  # KeyError 'step', as TE's FusedAdam.state_dict
        return super().state_dict()


def test_materialize_gives_fused_adam_its_own_state_not_torch_adamws_step():
    from megatron_rcm.parallel.mcore_compat import materialize_adamw_state

    p = torch.nn.Parameter(torch.randn(3))
    opt = _FusedAdamLike([p])
    materialize_adamw_state(opt)
    assert set(opt.state[p]) == {"exp_avg", "exp_avg_sq"}
    opt.state_dict()  # raised KeyError 'step' before (seen on an H200 with TE installed)


def test_materialize_gives_torch_adamw_the_common_step():
    from megatron_rcm.parallel.mcore_compat import materialize_adamw_state

    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([a, b])
    a.grad = torch.ones(3)
    opt.step()
    materialize_adamw_state(opt)
    assert float(opt.state[b]["step"]) == 1.0 and torch.equal(opt.state[b]["exp_avg"], torch.zeros(3))
