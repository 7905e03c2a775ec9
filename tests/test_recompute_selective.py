"""Selective recompute of Wan blocks (``recompute_granularity="selective"``): the backward re-runs the segments
before and after each chosen block's self-attention core, never the core itself.

In fp32 on CPU the re-run segments compute the same operations on the same inputs as the forward, so outputs,
tangents and every parameter gradient are bit-equal across no recompute, full and selective recompute (also
under TP=2 + sequence parallelism and CP=2, where each setting is compared with the others on the same layout).
Bit-equality alone would also hold if nothing were recomputed, so each run counts the calls of each block's
three parts (``pre_attention``, the self-attention ``core``, ``post_attention``; instance attributes, looked up
at call time, so the checkpoint's re-run goes through them too) and the bytes autograd keeps outside the
checkpoints: selective keeps more than full (q, k, v, o and the segment inputs) and less than none.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_rcm.models.config_fields import recompute_fields
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests import wan_helpers
from tests.dist_helpers import spawn

LAYERS = 3
SETTINGS = {
    "none": recompute_fields(False),
    "full": recompute_fields(True),
    "selective": recompute_fields(True, granularity="selective"),
    "selective_block1": recompute_fields(True, "block", 1, granularity="selective"),
}
PARTS = ("pre", "core", "post")


def _spy(blocks) -> dict:
    """Per part, the local block index at each call (forward and the backward's re-runs)."""
    calls = {p: [] for p in PARTS}

    def wrap(obj, attr, part, i):
        f = getattr(obj, attr)
        setattr(obj, attr, lambda *a, **kw: calls[part].append(i) or f(*a, **kw))

    for i, block in enumerate(blocks):
        wrap(block, "pre_attention", "pre", i)
        wrap(block.self_attn, "core", "core", i)
        wrap(block, "post_attention", "post", i)
    return calls


def _run(kind: str, setting: str, with_tangent: bool, model=None):
    """(v, t_v, parameter grads, re-runs per part in the backward, bytes saved for backward outside checkpoints)."""
    model = model or wan_helpers.make_ours(kind, num_layers=LAYERS, **SETTINGS[setting])
    inp = wan_helpers.make_inputs(kind)
    calls = _spy(model.blocks)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v, t_v = model.forward_jvp(inp["x"], inp["t_x"] if with_tangent else None, inp["timestep"],
                                   inp["t_timestep"] if with_tangent else None, inp["context"], inp["clip"])
    assert all(calls[p] == list(range(LAYERS)) for p in PARTS), calls
    forward = {p: len(calls[p]) for p in PARTS}
    g = torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((v * g).sum(), params, allow_unused=True)
    rerun = {p: sorted(calls[p][forward[p]:]) for p in PARTS}
    return v, t_v, grads, rerun, sum(saved)


def _assert_equal(a, b, what):
    v, t_v, grads = a[:3]
    rv, rt_v, rgrads = b[:3]
    assert torch.equal(v, rv), what
    assert (t_v is None) == (rt_v is None) and (t_v is None or torch.equal(t_v, rt_v)), what
    assert len(grads) == len(rgrads)
    for g, r in zip(grads, rgrads):
        assert (g is None) == (r is None) and (g is None or torch.equal(g, r)), what


@pytest.mark.parametrize("with_tangent", [True, False], ids=["jvp", "forward"])
@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_selective_is_bit_exact_and_runs_the_attention_core_once(kind, with_tangent, one_thread):
    initialize_parallel(tensor_parallel=1)
    runs = {s: _run(kind, s, with_tangent) for s in SETTINGS}
    assert any(g is not None and g.abs().sum() > 0 for g in runs["none"][2])
    for s in SETTINGS:
        _assert_equal(runs[s], runs["none"], s)
    every, none = list(range(LAYERS)), []
    assert runs["none"][3] == {"pre": none, "core": none, "post": none}
    assert runs["full"][3] == {"pre": every, "core": every, "post": every}  # the attention twice per block
    assert runs["selective"][3] == {"pre": every, "core": none, "post": every}  # the attention once
    assert runs["selective_block1"][3] == {"pre": [0], "core": none, "post": [0]}
    saved = {s: r[4] for s, r in runs.items()}
    assert saved["none"] > saved["selective_block1"] > saved["selective"] > saved["full"], saved


def _forward_core_inside(self, x, t_x, e0, t_e0, context, context_img, rope_cos, rope_sin, shard=None):
    """A broken selective block: the attention core inside the first checkpointed segment."""
    segment = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def pre_and_core(*args):
        return self.self_attn.core(*self.pre_attention(*args), shard)

    o, t_o = segment(pre_and_core, x, t_x, e0, t_e0, rope_cos, rope_sin)
    return segment(self.post_attention, x, t_x, o, t_o, e0, t_e0, context, context_img)


def test_the_counter_sees_a_checkpointed_attention_core(monkeypatch, one_thread):
    """The negative of the counts above: with the core inside a checkpointed segment (still bit-exact) the
    backward re-runs it once per block, which the selective assertion would refuse."""
    from megatron_rcm.models.wan.block import WanBlock

    initialize_parallel(tensor_parallel=1)
    ref = _run("t2v", "none", True)
    monkeypatch.setattr(WanBlock, "forward", _forward_core_inside)
    got = _run("t2v", "selective", True)
    _assert_equal(got, ref, "core inside")
    assert got[3]["core"] == list(range(LAYERS))


def test_no_grad_runs_no_checkpoint(monkeypatch, one_thread):
    """Under ``no_grad`` (rollouts, the teacher) a selective block runs its parts plainly, as full recompute does."""
    initialize_parallel(tensor_parallel=1)
    model = wan_helpers.make_ours("t2v", num_layers=LAYERS, **SETTINGS["selective"])
    inp = wan_helpers.make_inputs("t2v")
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        model(inp["x"], inp["timestep"], inp["context"])
    assert calls == []
    model(inp["x"], inp["timestep"], inp["context"])
    assert len(calls) == 2 * LAYERS  # two segments per block


# -- TP=2 + sequence parallelism and CP=2 (Ulysses) over gloo ---------------------------------------------------
DIST_LAYOUTS = [(1, 2, None), (2, 1, "a2a")]
"""(CP, TP, cp_comm_type) on two processes."""
DIST_SETTINGS = ("none", "full", "selective")


def _dist_run(kind: str, setting: str, cp_comm_type, full_sd: dict, inp: dict):
    from megatron_rcm.models.wan import WanModel, wan_config
    from megatron_rcm.parallel.sharding import load_full_state_dict
    from tests.dist_helpers import reduced_full_grads

    extra = {"cp_comm_type": cp_comm_type} if cp_comm_type else {}
    model = WanModel(wan_config(f"wan-tiny-{kind}", num_layers=LAYERS, **SETTINGS[setting], **extra))
    load_full_state_dict(model, full_sd)
    calls = _spy(model.blocks)
    v, t_v = model.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"],
                               inp["clip"])
    (v * inp["w"]).sum().backward()
    return v.detach(), t_v, reduced_full_grads(model), {p: len(c) for p, c in calls.items()}


def _dist_worker(rank, world, cases):
    from megatron.core import parallel_state as ps

    out = {}
    for cp, tp, comm in DIST_LAYOUTS:
        initialize_parallel(tensor_parallel=tp, context_parallel=cp)
        for kind, (full_sd, inp) in cases.items():
            if cp > 1 and kind == "i2v":
                continue  # CP attention is the same op for both kinds; t2v covers it
            for setting in DIST_SETTINGS:
                out[(cp, tp, kind, setting)] = _dist_run(kind, setting, comm, full_sd, inp)
        ps.destroy_model_parallel()
    destroy_parallel()
    return out


def test_selective_matches_full_and_none_under_tp_sp_and_cp():
    from megatron_rcm.parallel.sharding import gather_full_state_dict

    initialize_parallel(tensor_parallel=1)
    cases = {}
    for kind in ("t2v", "i2v"):
        inp = wan_helpers.make_inputs(kind, frames=3, size=8)  # 48 tokens: divisible by TP and CP = 2
        inp["w"] = torch.randn(inp["x"].shape[0], 4, *inp["x"].shape[2:], generator=torch.Generator().manual_seed(5))
        full_sd = gather_full_state_dict(wan_helpers.make_ours(kind, num_layers=LAYERS))
        cases[kind] = (full_sd, inp)
    out = spawn(_dist_worker, 2, cases)
    assert len(out) == 3 * len(DIST_SETTINGS)
    want = {"none": (1, 1), "full": (2, 2), "selective": (2, 1)}  # (pre and post, core) calls per block
    for (cp, tp, kind, setting), (v, t_v, grads, calls) in out.items():
        ref_v, ref_t_v, ref_grads, _ = out[(cp, tp, kind, "none")]
        what = (cp, tp, kind, setting)
        assert torch.equal(v, ref_v) and torch.equal(t_v, ref_t_v), what
        assert grads.keys() == ref_grads.keys()
        assert all(torch.equal(grads[k], ref_grads[k]) for k in grads), what
        pp, core = want[setting]
        assert calls == {"pre": pp * LAYERS, "core": core * LAYERS, "post": pp * LAYERS}, (what, calls)


# -- configuration --------------------------------------------------------------------------------------------
def test_wan_config_takes_selective_with_both_methods():
    cfg = wan_helpers.wan_config("wan-tiny-t2v", **recompute_fields(True, "block", 2, granularity="selective"))
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("selective", "block", 2)
    cfg = wan_helpers.wan_config("wan-tiny-t2v", **SETTINGS["selective"])
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("selective", "uniform", 1)
    with pytest.raises(ValueError, match=r"recompute_method='block' needs recompute_num_layers in 1..num_layers "
                                         r"\(=2\), got 3"):
        wan_helpers.wan_config("wan-tiny-t2v", **recompute_fields(True, "block", 3, granularity="selective"))
    with pytest.raises(NotImplementedError, match=r"recompute_granularity='selective', recompute_method=None"):
        wan_helpers.wan_config("wan-tiny-t2v", recompute_granularity="selective")
    with pytest.raises(NotImplementedError, match=r"recompute_granularity='partial'.*\(either with 'selective' "
                                                  r"for 'full'\)"):
        wan_helpers.wan_config("wan-tiny-t2v", **recompute_fields(True, granularity="partial"))


def test_cosmos_refuses_selective():
    from tests import cosmos_helpers

    with pytest.raises(NotImplementedError, match="CosmosConfig: recompute_granularity='selective' .* implemented "
                                                  "for Wan only; use recompute_granularity='full'"):
        cosmos_helpers.cosmos_config("cosmos-tiny-t2i", **SETTINGS["selective"])


@pytest.mark.parametrize("sets, match", [
    (["model.recompute=true", "model.recompute_granularity=partial"],
     r"'model.recompute_granularity': 'partial' \(expected one of full, selective\)"),
    (["model.recompute_granularity=selective"], "model.recompute_granularity='selective' needs model.recompute=true"),
])
def test_training_config_errors_name_the_keys(sets, match):
    from megatron_rcm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.source=mock", *sets])


def test_training_config_builds_selective_and_cosmos_refuses_it():
    from megatron_rcm.config import ConfigError, load_config
    from megatron_rcm.training.models import build_wan_config

    sets = ["data.source=mock", "model.recompute=true", "model.recompute_granularity=selective"]
    wcfg = build_wan_config(load_config(None, [*sets, "model.recompute_method=block",
                                               "model.recompute_num_layers=1"]).model)
    assert (wcfg.recompute_granularity, wcfg.recompute_method, wcfg.recompute_num_layers) == ("selective", "block", 1)
    assert build_wan_config(load_config(None, sets).model, recompute=False).recompute_granularity is None
    cfg = load_config(None, [*sets, "model.preset=cosmos-tiny-t2i"])
    with pytest.raises(ConfigError, match="model.recompute_granularity='selective' is implemented for Wan only, "
                                          "not for model.preset='cosmos-tiny-t2i'"):
        build_wan_config(cfg.model)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
