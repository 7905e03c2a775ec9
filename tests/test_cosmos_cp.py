"""Context-parallel Cosmos equals the single-process model: outputs, tangents and every parameter gradient.

One gloo group of 4 CPU processes runs every layout in turn (process start-up dominates the test time):
CP=4 (p2p, a2a: the tiny presets' 4 heads), CP=2 x TP=2 (p2p, a2a) and CP=2 x DP=2 (p2p, a2a). Inputs:
Text2Image (learnable position embedding, padding mask) at 48 tokens and at 27 tokens (not divisible by CP:
the last shard is padded), Video2World (condition-mask channel, rope_fps) at 27 tokens with a timestep per
latent frame (frame 0 clean, 9 tokens a frame, so the shards start mid-frame). The reference is CP=1 in the
test process, every parameter random (a diffusers oracle's weights). Float32: the sharded run sums the same
products in a different order, so the tolerance is round-off (1e-5 relative).

Negatives (CP=4 ring, in the same processes): RoPE at each rank's local positions (0 .. s - 1) instead of the
global ones, and the per-frame modulation indexed by the local token index, each move the output by > 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.convert.cosmos_keys import to_ours
from megatron_rcm.parallel.sharding import load_full_state_dict
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.cosmos_helpers import make_diffusers, make_inputs, rel_err
from tests.dist_helpers import reduced_full_grads, spawn

TOL = 1e-5
LAYOUTS = [(4, 1, "p2p"), (4, 1, "a2a"), (2, 2, "p2p"), (2, 2, "a2a"), (2, 1, "p2p"), (2, 1, "a2a")]  # (CP, TP, type)
CASES = {  # name: (kind, make_inputs kwargs, timestep per frame)
    "t2i 48 tokens": ("t2i", dict(frames=3, size=8), False),
    "t2i 27 tokens": ("t2i", dict(frames=3, size=6), False),
    "v2w 27 tokens, a timestep per frame": ("v2w", dict(frames=3, size=6), True),
}
NEGATIVE_CASE = "v2w 27 tokens, a timestep per frame"


def _run(kind: str, full_sd: dict, inp: dict, cp_comm_type: str = "p2p"):
    """Forward + JVP + backward of sum(v * w); returns (v, t_v, full gradients summed over CP ranks)."""

    from megatron_rcm.models.cosmos import CosmosModel, cosmos_config

    model = CosmosModel(cosmos_config(f"cosmos-tiny-{kind}", cp_comm_type=cp_comm_type))
    load_full_state_dict(model, full_sd)
    v, t_v = model.forward_jvp(
        inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"], padding_mask=inp["padding"]
    )
    (v * inp["w"]).sum().backward()
    return v.detach(), t_v, reduced_full_grads(model)


def _local_rope(rope_cos_sin):
    """The bug a sharded sequence invites: each CP rank's RoPE at positions 0 .. s - 1 of its own shard."""
    from megatron_rcm.parallel.context import token_shard

    def rope(*args, **kwargs):
        cos, sin = rope_cos_sin(*args, **kwargs)
        local = torch.arange(cos.shape[0]) % token_shard(cos.shape[0]).local_len
        return cos[local], sin[local]

    return rope


def _local_frame_of_token(grid_fhw, shard, device):
    """The other bug: the frame of this rank's i-th token taken as the frame of global token i."""
    f, h, w = grid_fhw
    return torch.arange(shard.local_len, device=device).clamp_max(f * h * w - 1) // (h * w)


def _negatives(full_sd, inputs):
    from megatron_rcm.models.cosmos import model as cosmos_model

    kind, inp = inputs[NEGATIVE_CASE]
    out = {}
    good_rope = cosmos_model.rope_cos_sin
    good_frame = cosmos_model.CosmosModel.__dict__["_frame_of_token"]  # the staticmethod itself
    cosmos_model.rope_cos_sin = _local_rope(good_rope)
    try:
        out["local rope"] = _run(kind, full_sd, inp)
    finally:
        cosmos_model.rope_cos_sin = good_rope
    cosmos_model.CosmosModel._frame_of_token = staticmethod(_local_frame_of_token)
    try:
        out["local frame_of_token"] = _run(kind, full_sd, inp)
    finally:
        cosmos_model.CosmosModel._frame_of_token = good_frame
    return out


def _worker(rank, world, full_sds, inputs):
    from megatron.core import parallel_state as ps

    out = {}
    for cp, tp, comm in LAYOUTS:
        initialize_parallel(tensor_parallel=tp, context_parallel=cp)
        for name, (kind, inp) in inputs.items():
            out[(cp, tp, comm, name)] = _run(kind, full_sds[kind], inp, comm)
        if (cp, tp, comm) == LAYOUTS[0]:
            out.update(_negatives(full_sds[inputs[NEGATIVE_CASE][0]], inputs))
        ps.destroy_model_parallel()
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results():
    full_sds = {kind: to_ours(make_diffusers(kind).state_dict(), "diffusers") for kind in ("t2i", "v2w")}
    inputs = {}
    for name, (kind, kw, per_frame) in CASES.items():
        inp = make_inputs(kind, **kw)
        B, F_ = inp["x"].shape[0], inp["x"].shape[2]
        inp["w"] = torch.randn(B, 4, *inp["x"].shape[2:])
        if per_frame:
            inp["timestep"] = torch.rand(B, F_)
            inp["timestep"][:, 0] = 0  # the conditioning frame, clean
            inp["t_timestep"] = torch.randn(B, F_)
            inp["t_timestep"][:, 0] = 0
        inputs[name] = (kind, inp)
    initialize_parallel(tensor_parallel=1)
    refs = {name: _run(kind, full_sds[kind], inp) for name, (kind, inp) in inputs.items()}
    destroy_parallel()
    return refs, spawn(_worker, 4, full_sds, inputs)


@pytest.mark.parametrize("cp,tp,comm", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_cp_matches_single_process(results, cp, tp, comm, case):
    refs, got = results
    v1, t_v1, g1 = refs[case]
    v, t_v, g = got[(cp, tp, comm, case)]
    assert rel_err(v, v1) <= TOL
    assert rel_err(t_v, t_v1) <= TOL
    assert g.keys() == g1.keys()
    errs = {k: rel_err(g[k], g1[k]) for k in g1}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, (worst, errs[worst])


@pytest.mark.parametrize("bug", ["local rope", "local frame_of_token"])
def test_local_positions_are_caught(results, bug):
    """RoPE (or the per-frame modulation) at the shard's local positions changes the output: the parity
    above holds because the model uses each token's global position."""
    refs, got = results
    v1, t_v1, _ = refs[NEGATIVE_CASE]
    v, t_v, _ = got[bug]
    assert rel_err(v, v1) > 1e-2
    assert rel_err(t_v, t_v1) > 1e-2


def test_a2a_needs_cp_to_divide_the_heads():
    """Ulysses at a CP size that does not divide the heads is refused by name at construction."""
    from megatron_rcm.models.cosmos import CosmosModel, cosmos_config

    initialize_parallel(tensor_parallel=1)
    try:
        cfg = cosmos_config("cosmos-tiny-t2i", context_parallel_size=8, cp_comm_type="a2a")
        with pytest.raises(ValueError, match=r"4 heads.*not divisible by context_parallel 8"):
            CosmosModel(cfg)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
