"""The CPU fallback optimizer equals torch AdamW with Megatron's conventions (no weight decay on biases /
1-D params, clip by global norm with coefficient max_norm / (norm + 1e-6)); the warm-up schedule."""

import copy

import pytest
import torch

from megatron_rcm.training.optim import CpuAdamW, LinearWarmup


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))


def _reference_step(model, lr, wd, clip):
    """Hand-written reference: global-norm clip, then torch AdamW with wd only on 2-D weights."""
    params = list(model.parameters())
    norm = torch.sqrt(sum(p.grad.double().square().sum() for p in params)).item()
    if clip > 0 and clip / (norm + 1e-6) < 1:
        for p in params:
            p.grad.mul_(clip / (norm + 1e-6))
    return norm


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_cpu_adamw_matches_reference(clip):
    ours_model, ref_model = _model(), None
    ref_model = copy.deepcopy(ours_model)
    ours = CpuAdamW(ours_model.named_parameters(), lr=1e-2, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.1,
                    clip_grad=clip)
    decay = [p for n, p in ref_model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in ref_model.named_parameters() if p.ndim == 1 or n.endswith(".bias")]
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.0, 0.999), eps=1e-8, foreach=False)
    for step in range(3):
        x = torch.randn(7, 5, generator=torch.Generator().manual_seed(step))
        for m in (ours_model, ref_model):
            m.zero_grad()
            m(x).square().sum().backward()
        ok, norm = ours.step()
        ref_norm = _reference_step(ref_model, 1e-2, 0.1, clip)
        ref.step()
        assert ok and norm == pytest.approx(ref_norm, rel=1e-12)
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_params_keep_fp32_master():
    model = _model().to(torch.bfloat16)
    opt = CpuAdamW(model.named_parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.0, clip_grad=0)
    assert all(m.dtype == torch.float32 for m in opt.master)
    w0 = [m.clone() for m in opt.master]
    model(torch.randn(3, 5, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    # the fp32 master moved by ~lr even where the bf16 copy cannot represent the change
    assert all((m - w).abs().max() > 5e-4 for m, w in zip(opt.master, w0))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    torch.testing.assert_close(model[0].weight, opt.master[0].to(torch.bfloat16), rtol=0, atol=0)


def test_non_finite_gradient_is_reported_not_applied():
    model = _model()
    opt = CpuAdamW(model.named_parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.0, clip_grad=1)
    before = [p.clone() for p in model.parameters()]
    model(torch.randn(2, 5)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    ok, _ = opt.step()
    assert not ok
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_linear_warmup():
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "wd_mult": 0.0},
                             {"params": [torch.nn.Parameter(torch.zeros(2, 2))]}], lr=0.0)
    sched = LinearWarmup(peak_lr=1.0, warmup_steps=4, weight_decay=0.01)
    lrs = []
    for _ in range(6):
        lrs.append(sched.apply(opt))
        sched.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[1]["weight_decay"] == 0.01
    again = LinearWarmup(1.0, 4, 0.01)
    again.load_state_dict(sched.state_dict())
    assert again.lr() == 1.0 and LinearWarmup(2.0, 0, 0.0).lr() == 2.0


def test_dealias_steps_restores_one_increment_per_step():
    """The aliasing megatron-core 0.16's DistributedOptimizer.load_state_dict leaves behind (one step tensor in
    every state) makes torch AdamW count N steps per step; dealias_steps undoes it."""
    from megatron_rcm.parallel.mcore_compat import dealias_steps

    def run(fix: bool):
        params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
        opt = torch.optim.AdamW(params, foreach=True)
        for p in params:
            p.grad = torch.ones(3)
        opt.step()
        sd = opt.state_dict()
        shared = torch.tensor(1.0)
        for s in sd["state"].values():
            s["step"] = shared  # what Megatron's load_state_dict does
        opt.load_state_dict(sd)
        n_shared = dealias_steps(opt) if fix else 0
        opt.step()
        return n_shared, [float(opt.state[p]["step"]) for p in params]

    assert run(fix=False)[1] == [5.0] * 4  # the bug this guards against: 1 + 4 parameters
    assert run(fix=True) == (3, [2.0] * 4)
