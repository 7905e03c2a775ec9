"""The megatron-core workarounds are gated by the release that retires them."""

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
