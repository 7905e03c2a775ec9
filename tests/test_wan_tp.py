"""Tensor (+sequence) parallel Wan equals the single-process model: outputs, tangents and gradients.

TP=2 and TP=4 run as gloo process groups on CPU; the reference is TP=1 in the test process. Float32:
the sharded run sums the same products in a different order, so the tolerance is round-off (1e-5 rel).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_rcm.convert.wan_keys import to_ours
from megatron_rcm.parallel.sharding import gather_full_state_dict, load_full_state_dict
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.dist_helpers import spawn
from tests.wan_helpers import make_diffusers, make_inputs, make_ours, rel_err


def _run(kind: str, full_sd: dict, inp: dict):
    """Forward + JVP + backward of sum(v * w); returns (v, t_v, full grads)."""
    from megatron_rcm.models.wan import WanModel, wan_config

    model = WanModel(wan_config(f"wan-tiny-{kind}"))
    load_full_state_dict(model, full_sd)
    v, t_v = model.forward_jvp(
        inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"], inp["clip"]
    )
    (v * inp["w"]).sum().backward()
    group = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and group is not None:
            dist.all_reduce(p.grad, group=group)  # what finalize_model_grads does for SP-applied params
    return v.detach(), t_v, _grads(model)


def _grads(model):
    """Full (TP-gathered) gradients, by reusing the parameter gatherer on a grad-swapped model."""
    saved = {n: p.data for n, p in model.named_parameters()}
    for p in model.parameters():
        p.data = p.grad
    full = gather_full_state_dict(model)
    for n, p in model.named_parameters():
        p.data = saved[n]
    return full


def _worker(rank, world, kind, full_sd, inp):
    initialize_parallel(tensor_parallel=world)
    out = _run(kind, full_sd, inp)
    destroy_parallel()
    return out


def _reference(kind):
    ref = make_diffusers(kind)
    full_sd = to_ours(ref.state_dict(), "diffusers")
    inp = make_inputs(kind, frames=3, size=8)  # 3*4*4 = 48 tokens, divisible by 2 and 4
    inp["w"] = torch.randn(inp["x"].shape[0], 4, *inp["x"].shape[2:])
    return full_sd, inp


@pytest.mark.parametrize("kind,tp", [("t2v", 2), ("t2v", 4), ("i2v", 2)])
def test_tp_matches_single_process(kind, tp):
    full_sd, inp = _reference(kind)
    initialize_parallel(tensor_parallel=1)
    v1, t_v1, g1 = _run(kind, full_sd, inp)
    v, t_v, g = spawn(_worker, tp, kind, full_sd, inp)
    assert rel_err(v, v1) <= 1e-5
    assert rel_err(t_v, t_v1) <= 1e-5
    assert g.keys() == g1.keys()
    errs = {k: rel_err(g[k], g1[k]) for k in g1}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-5, (worst, errs[worst])


def test_tp_per_token_timesteps_match_single_process():
    """Wan2.2 TI2V's timestep per token [B, S] (first frame at t = 0, its tangent 0 there): the per-token
    modulation is split over the sequence-parallel ranks like the tokens, and the time embedding's gradients
    (partial sums over each rank's tokens) add up to the TP=1 ones."""
    full_sd, inp = _reference("t2v")
    per_frame, S = 16, 48  # 4*4 tokens per latent frame, 3 frames
    noisy = torch.ones(2, S)
    noisy[:, :per_frame] = 0
    inp["timestep"] = inp["timestep"][:, None] * noisy
    inp["t_timestep"] = inp["t_timestep"][:, None] * noisy
    initialize_parallel(tensor_parallel=1)
    v1, t_v1, g1 = _run("t2v", full_sd, inp)
    v, t_v, g = spawn(_worker, 2, "t2v", full_sd, inp)
    assert rel_err(v, v1) <= 1e-5 and rel_err(t_v, t_v1) <= 1e-5
    errs = {k: rel_err(g[k], g1[k]) for k in g1}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-5, (worst, errs[worst])
    assert errs["time_embedding.linear_1.weight"] <= 1e-5 and g1["time_embedding.linear_1.weight"].abs().max() > 0


def test_heads_not_divisible_by_tp_is_a_clear_error():
    from megatron_rcm.models.wan import wan_config

    # raised by Megatron's TransformerConfig validation; the message names both numbers
    with pytest.raises(ValueError, match=r"num_attention_heads \(2\).*tensor_model_parallel_size \(4\)"):
        wan_config("wan-tiny-t2v", num_attention_heads=2, tensor_model_parallel_size=4)


def _bad_tokens_worker(rank, world):
    initialize_parallel(tensor_parallel=world)
    from megatron_rcm.models.wan import WanModel, wan_config

    model = WanModel(wan_config("wan-tiny-t2v"))
    inp = make_inputs("t2v", frames=1, size=6)  # 1*3*3 = 9 tokens
    try:
        model(inp["x"], inp["timestep"], inp["context"])
    except ValueError as e:
        return str(e)
    finally:
        destroy_parallel()
    return "no error"


def test_tokens_not_divisible_by_sp_is_a_clear_error():
    msg = spawn(_bad_tokens_worker, 2)
    assert "9 tokens" in msg and "sequence-parallel size 2" in msg


def test_bad_inputs_name_the_problem():
    initialize_parallel(tensor_parallel=1)
    model = make_ours("t2v")
    inp = make_inputs("t2v")
    with pytest.raises(ValueError, match=r"x must be \[B, C=4"):
        model(inp["x"][:, :3], inp["timestep"], inp["context"])
    with pytest.raises(ValueError, match="not divisible by patch"):
        model(inp["x"][..., :7], inp["timestep"], inp["context"])
    with pytest.raises(ValueError, match=r"context must be \[B=2, L, 32\]"):
        model(inp["x"], inp["timestep"], inp["context"][..., :5])
    with pytest.raises(ValueError, match="unknown Wan preset"):
        from megatron_rcm.models.wan import wan_config

        wan_config("wan2.1-t2v-7b")
