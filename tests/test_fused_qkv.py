"""Fused QKV projection (``model.fused_qkv``, ``models/fused_qkv.py``) against the three unfused linears.

Same weights (every parameter random), fp32 on CPU: outputs, JVP tangents and every parameter gradient of the
fused model equal the unfused one's within 1e-6 (relative to the largest entry) at TP=1 and TP=2 with sequence
parallelism (gloo); the forward is bit-identical. Gradients: the backward of the fused GEMM sums the input
gradients of q, k and v in one reduction over 3 D_tp rows instead of three GEMMs and two adds (fp32 round-off),
within 1e-6 for every parameter except the cross-attention key biases (k, k_img): their gradient is a residual of
cancelling terms (a bias shared by all keys shifts every logit of a query alike, which softmax ignores; it acts
only through the key RMSNorm), so the same absolute round-off is up to 2.6e-6 of it; checked within 1e-5.
Checkpoints (dist_checkpointing) and full state dicts keep the unfused q/k/v keys:
fused <-> unfused round trips at TP=1 and TP=2 and across TP sizes, bit-exact. The negative: the global
[W_q; W_k; W_v] split over ranks (instead of each rank's [q_r; k_r; v_r]) gives other outputs at TP=2.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.models import fused_qkv
from megatron_rcm.parallel.sharding import gather_full_state_dict, load_full_state_dict
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.dist_helpers import reduced_full_grads, spawn
from tests.wan_helpers import make_inputs, randomize_, rel_err

TOL = 1e-6  # outputs and tangents: the same products, possibly summed in another order by the fused GEMM
CANCELLING = ("cross_attn.linear_k.bias", "cross_attn.linear_k_img.bias")
CANCELLING_TOL = 1e-5  # their gradients are residuals of cancelling terms (module docstring)
PREFIX = "student."


def _full_state_dict(kind: str, seed: int = 0) -> dict:
    """A TP=1 unfused model's full state dict, every parameter random (unfused q/k/v names)."""
    from megatron_rcm.models.wan import WanModel, wan_config

    initialize_parallel(tensor_parallel=1)
    model = WanModel(wan_config(f"wan-tiny-{kind}"))
    randomize_(model, seed)
    return gather_full_state_dict(model)


def _inputs(kind: str) -> dict:
    inp = make_inputs(kind, frames=3, size=8)  # 48 tokens, divisible by TP=2
    inp["w"] = torch.randn(inp["x"].shape[0], 4, *inp["x"].shape[2:], generator=torch.Generator().manual_seed(3))
    return inp


def _run(kind: str, fused: bool, full_sd: dict, inp: dict, qkv_weight_of=None):
    """(v, t_v, full reduced grads) of forward + JVP + backward of sum(v * w). ``qkv_weight_of(full_sd, name)``
    overrides how the fused weight/bias is laid out over ranks (the negative test)."""
    from megatron_rcm.models.wan import WanModel, wan_config

    model = WanModel(wan_config(f"wan-tiny-{kind}", fused_qkv=fused))
    load_full_state_dict(model, full_sd)
    if qkv_weight_of is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".linear_qkv." in name:
                    p.copy_(qkv_weight_of(full_sd, name))
    v, t_v = model.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"],
                               inp["clip"])
    (v * inp["w"]).sum().backward()
    return v.detach(), t_v, reduced_full_grads(model)


def _errors(a, b) -> dict:
    (v, t_v, g), (v1, t_v1, g1) = a, b
    assert g.keys() == g1.keys()
    errs = {"v": rel_err(v, v1), "t_v": rel_err(t_v, t_v1)}
    errs.update({f"grad {k}": rel_err(g[k], g1[k]) for k in g1})
    return errs


def _parity_worker(rank, world, kind, full_sd, inp):
    initialize_parallel(tensor_parallel=world)
    try:
        return _errors(_run(kind, True, full_sd, inp), _run(kind, False, full_sd, inp))
    finally:
        destroy_parallel()


@pytest.mark.parametrize("kind,tp", [("t2v", 1), ("i2v", 1), ("t2v", 2)])
def test_fused_matches_unfused(kind, tp):
    """Outputs, tangents and every parameter gradient (q/k/v gradients by their unfused names)."""
    full_sd, inp = _full_state_dict(kind), _inputs(kind)
    errs = _parity_worker(0, 1, kind, full_sd, inp) if tp == 1 else spawn(_parity_worker, tp, kind, full_sd, inp)
    cancelling = {k: e for k, e in errs.items() if k.endswith(CANCELLING)}
    rest = {k: e for k, e in errs.items() if k not in cancelling}
    worst, worst_c = max(rest, key=rest.get), max(cancelling, key=cancelling.get)
    print(f"fused vs unfused TP={tp} {kind}: v {errs['v']:.2e}, t_v {errs['t_v']:.2e}, worst {worst} "
          f"{rest[worst]:.2e}, worst key bias {worst_c} {cancelling[worst_c]:.2e}")
    assert rest[worst] <= TOL, (worst, rest[worst])
    assert cancelling[worst_c] <= CANCELLING_TOL, (worst_c, cancelling[worst_c])
    assert any(k.endswith("self_attn.linear_q.weight") for k in errs)


def _global_split(full_sd, name):
    """The wrong layout: the global [W_q; W_k; W_v] chunked over ranks (rank 0 gets W_q and half of W_k)."""
    from megatron.core import parallel_state as ps

    head, tail = name.split(".linear_qkv.")
    fused = torch.cat([full_sd[f"{head}.{u}.{tail}"] for u in fused_qkv.UNFUSED], dim=0)
    return fused.chunk(ps.get_tensor_model_parallel_world_size(), dim=0)[ps.get_tensor_model_parallel_rank()]


def _wrong_order_worker(rank, world, full_sd, inp):
    initialize_parallel(tensor_parallel=world)
    try:
        return _errors(_run("t2v", True, full_sd, inp, _global_split), _run("t2v", False, full_sd, inp))
    finally:
        destroy_parallel()


def test_global_row_order_is_wrong_at_tp2():
    """Each rank's rows must be [q_r; k_r; v_r]: the global [W_q; W_k; W_v] split over 2 ranks is caught by the
    parity comparison above (it equals the right layout at TP=1 only)."""
    full_sd, inp = _full_state_dict("t2v"), _inputs("t2v")
    errs = spawn(_wrong_order_worker, 2, full_sd, inp)
    print(f"global-split QKV at TP=2: v {errs['v']:.2e}, t_v {errs['t_v']:.2e}")
    assert errs["v"] > 1e-2 and errs["t_v"] > 1e-2


def test_full_layout_helpers_are_inverse_and_per_rank():
    q, k, v = (torch.arange(8.0).reshape(4, 2) + 100 * i for i in range(3))
    fused = fused_qkv.fuse_full([q, k, v], tp=2)
    assert torch.equal(fused.chunk(2)[1], torch.cat([q[2:], k[2:], v[2:]]))  # rank 1's rows: [q_1; k_1; v_1]
    assert all(torch.equal(a, b) for a, b in zip(fused_qkv.unfuse_full(fused, 2), (q, k, v)))


# -- state dicts and checkpoints -----------------------------------------------------------------------------

def test_state_dict_keys_and_load_across_layouts():
    """Plain state dicts: the same q/k/v keys and shapes; each layout's loads (strictly) into the other."""
    from megatron_rcm.models.wan import WanModel, wan_config

    full_sd = _full_state_dict("t2v")
    unfused = WanModel(wan_config("wan-tiny-t2v"))
    fused = WanModel(wan_config("wan-tiny-t2v", fused_qkv=True))
    load_full_state_dict(unfused, full_sd)
    params = lambda sd: {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("_extra_state")}  # noqa: E731
    assert params(fused.state_dict()) == params(unfused.state_dict())
    fused.load_state_dict(unfused.state_dict(), strict=True)
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in unfused.state_dict().items() if v is not None)
    back = WanModel(wan_config("wan-tiny-t2v"))
    back.load_state_dict(fused.state_dict(), strict=True)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in unfused.state_dict().items() if v is not None)


def test_partial_qkv_state_dict_is_a_clear_error():
    from megatron_rcm.models.wan import WanModel, wan_config

    initialize_parallel(tensor_parallel=1)
    fused = WanModel(wan_config("wan-tiny-t2v", fused_qkv=True))
    sd = fused.state_dict()
    del sd["blocks.0.self_attn.linear_k.weight"]
    with pytest.raises(KeyError, match=r"blocks\.0\.self_attn\.linear_k\.weight.*missing"):
        fused.load_state_dict(sd)


def _save(model, path):
    from megatron.core import dist_checkpointing

    path.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(prefix=PREFIX), str(path))


def _roundtrip_worker(rank, world, full_sd, path, save_fused):
    """Save at TP=``world`` in one layout, load into the other layout at the same TP; full weights back."""
    from megatron_rcm.convert.dist_ckpt import load_model
    from megatron_rcm.models.wan import WanModel, wan_config

    initialize_parallel(tensor_parallel=world)
    try:
        src = WanModel(wan_config("wan-tiny-t2v", fused_qkv=save_fused))
        load_full_state_dict(src, full_sd)
        _save(src, path)
        dst = WanModel(wan_config("wan-tiny-t2v", fused_qkv=not save_fused))
        load_model(dst, path, prefix=PREFIX)
        return gather_full_state_dict(dst)
    finally:
        destroy_parallel()


def _checkpoint_keys(path) -> dict:
    from megatron.core import dist_checkpointing

    return {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(str(path)).items()}


@pytest.mark.parametrize("tp,save_fused", [(1, True), (1, False), (2, True), (2, False)])
def test_checkpoint_roundtrip_across_layouts(tmp_path, tp, save_fused):
    full_sd = _full_state_dict("t2v")
    path = tmp_path / "ckpt"
    got = spawn(_roundtrip_worker, tp, full_sd, path, save_fused)
    assert got.keys() == full_sd.keys()
    assert all(torch.equal(got[k], full_sd[k]) for k in full_sd), [k for k in full_sd if not torch.equal(got[k], full_sd[k])]
    keys = _checkpoint_keys(path)
    assert keys[f"{PREFIX}blocks.0.self_attn.linear_q.weight"] == (128, 128)
    assert not any("linear_qkv" in k for k in keys)


def test_fused_tp2_checkpoint_loads_unfused_tp1_and_matches_unfused_keys(tmp_path):
    """Saved fused at TP=2, loaded unfused at TP=1; its checkpoint keys and shapes are the unfused model's."""
    from megatron_rcm.convert.dist_ckpt import load_model
    from megatron_rcm.models.wan import WanModel, wan_config

    full_sd = _full_state_dict("t2v")
    fused_dir, unfused_dir = tmp_path / "fused", tmp_path / "unfused"
    spawn(_roundtrip_worker, 2, full_sd, fused_dir, True)
    initialize_parallel(tensor_parallel=1)
    ref = WanModel(wan_config("wan-tiny-t2v"))
    load_full_state_dict(ref, full_sd)
    _save(ref, unfused_dir)
    assert _checkpoint_keys(fused_dir) == _checkpoint_keys(unfused_dir)
    model = WanModel(wan_config("wan-tiny-t2v"))
    load_model(model, fused_dir, prefix=PREFIX)
    got = gather_full_state_dict(model)
    assert all(torch.equal(got[k], full_sd[k]) for k in full_sd)


def test_optimizer_state_follows_the_factory():
    """CpuAdamW's sharded state: the fused parameter's moments are saved under the unfused q/k/v keys."""
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

    from megatron_rcm.models.wan import WanModel, wan_config

    initialize_parallel(tensor_parallel=1)
    model = WanModel(wan_config("wan-tiny-t2v", fused_qkv=True))
    params = list(model.parameters())
    id_map = get_param_id_to_sharded_param_map(model.sharded_state_dict(prefix=PREFIX), params)
    assert len(id_map) == len(params)  # every parameter, the fused one included, has its checkpoint tensors
    i = next(i for i, (n, _) in enumerate(model.named_parameters()) if n == "blocks.0.self_attn.linear_qkv.weight")
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    sh = make_sharded_optimizer_tensor(id_map[i], torch.zeros_like(params[i]), "optimizer.student.exp_avg")
    keys = [t.key for t in fused_qkv.checkpoint_tensors({"x": sh})]
    assert keys == [f"optimizer.student.exp_avg.{PREFIX}blocks.0.self_attn.linear_{u}.weight" for u in "qkv"]


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
