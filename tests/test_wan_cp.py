"""Context-parallel Wan equals the single-process model: outputs, tangents and every parameter gradient.

One gloo group of 4 CPU processes runs every layout in turn (process start-up dominates the test time):
CP=4 (p2p, a2a), CP=2 x TP=2 (p2p, a2a), CP=2 x DP=2 (p2p, a2a, a2a with 2 overlapped head groups), each at 48 tokens and at 27 tokens
(not divisible by CP: the last shard is padded), and at 27 tokens with a timestep per token (Wan2.2 TI2V's
per-token modulation sharded like the tokens, padding included). The reference is CP=1 in the test process. Float32: the
sharded run sums the same products in a different order, so the tolerance is round-off (1e-5 relative).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.convert.wan_keys import to_ours
from megatron_rcm.parallel.sharding import load_full_state_dict
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.dist_helpers import reduced_full_grads, spawn
from tests.wan_helpers import make_diffusers, make_inputs, rel_err

TOL = 1e-5
# (CP, TP, type); "a2a:2": Ulysses with its all-to-all in 2 head groups (parallel.cp_a2a_head_groups)
LAYOUTS = [(4, 1, "p2p"), (4, 1, "a2a"), (2, 2, "p2p"), (2, 2, "a2a"), (2, 1, "p2p"), (2, 1, "a2a"), (2, 1, "a2a:2")]
SIZES = {"48 tokens": dict(frames=3, size=8), "27 tokens": dict(frames=3, size=6)}
PER_TOKEN = "27 tokens, a timestep per token"  # Wan2.2 TI2V: first frame (9 tokens) at t = 0, tangent 0 there


def _run(full_sd: dict, inp: dict, cp_comm_type: str = "p2p"):
    """Forward + JVP + backward of sum(v * w); returns (v, t_v, full gradients summed over CP ranks)."""

    from megatron_rcm.models.wan import WanModel, wan_config

    comm, _, groups = cp_comm_type.partition(":")
    model = WanModel(wan_config("wan-tiny-t2v", cp_comm_type=comm, cp_a2a_head_groups=int(groups or 1)))
    load_full_state_dict(model, full_sd)
    v, t_v = model.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"])
    (v * inp["w"]).sum().backward()
    return v.detach(), t_v, reduced_full_grads(model)


def _worker(rank, world, full_sd, inputs):
    from megatron.core import parallel_state as ps

    out = {}
    for cp, tp, comm in LAYOUTS:
        initialize_parallel(tensor_parallel=tp, context_parallel=cp)
        for name, inp in inputs.items():
            out[(cp, tp, comm, name)] = _run(full_sd, inp, comm)
        ps.destroy_model_parallel()
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results():
    ref = make_diffusers("t2v")
    full_sd = to_ours(ref.state_dict(), "diffusers")
    inputs = {}
    for name, kw in SIZES.items():
        inp = make_inputs("t2v", **kw)
        inp["w"] = torch.randn(inp["x"].shape[0], 4, *inp["x"].shape[2:])
        inputs[name] = inp
    noisy = torch.ones(2, 27)
    noisy[:, :9] = 0
    per_token = dict(inputs["27 tokens"])
    per_token["timestep"] = per_token["timestep"][:, None] * noisy
    per_token["t_timestep"] = per_token["t_timestep"][:, None] * noisy
    inputs[PER_TOKEN] = per_token
    initialize_parallel(tensor_parallel=1)
    refs = {name: _run(full_sd, inp) for name, inp in inputs.items()}
    destroy_parallel()
    return refs, spawn(_worker, 4, full_sd, inputs)


@pytest.mark.parametrize("cp,tp,comm", LAYOUTS)
@pytest.mark.parametrize("size", [*SIZES, PER_TOKEN])
def test_cp_matches_single_process(results, cp, tp, comm, size):
    refs, got = results
    v1, t_v1, g1 = refs[size]
    v, t_v, g = got[(cp, tp, comm, size)]
    assert rel_err(v, v1) <= TOL
    assert rel_err(t_v, t_v1) <= TOL
    assert g.keys() == g1.keys()
    errs = {k: rel_err(g[k], g1[k]) for k in g1}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, (worst, errs[worst])
