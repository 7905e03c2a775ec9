"""Activation recompute of whole blocks, Megatron's methods: ``uniform`` (every block) and ``block`` (the first
N blocks of each stage), for the Wan and Cosmos models, primal and JVP pass.

Recompute must not change a number: in fp32 on CPU the re-run blocks compute the same operations on the same
inputs, so outputs, tangents and every parameter gradient are bit-equal to the run without recompute. That
alone would also hold if nothing were recomputed, so each run also counts the blocks re-run in the backward
(calls of each block's ``forward``; module forward hooks do not fire in the checkpoint's re-run) and the bytes autograd keeps outside the checkpointed
blocks, which must fall as more blocks are recomputed.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.models.config_fields import recompute_fields, recomputed_fraction
from megatron_rcm.parallel.state import initialize_parallel
from tests import cosmos_helpers, wan_helpers

LAYERS = 4
SETTINGS = {
    "none": (recompute_fields(False), 0),
    "uniform": (recompute_fields(True), LAYERS),
    "block1": (recompute_fields(True, "block", 1), 1),
    f"block{LAYERS - 1}": (recompute_fields(True, "block", LAYERS - 1), LAYERS - 1),
}
"""name -> (config fields, blocks re-run in the backward)."""


@pytest.fixture(scope="module", autouse=True)
def _tp1():
    initialize_parallel(tensor_parallel=1)


def _build(family: str, fields: dict):
    helpers = wan_helpers if family == "wan" else cosmos_helpers
    kind = "t2v" if family == "wan" else "t2i"
    model = helpers.make_ours(kind, num_layers=LAYERS, **fields)  # same seed: the same weights
    inp = helpers.make_inputs(kind, frames=1 if family == "cosmos" else 3)
    return model, inp


def _count_calls(blocks) -> list:
    """The local index of each block at each call of its ``forward``."""
    calls = []
    for i, block in enumerate(blocks):
        block.forward = lambda *a, _f=block.forward, _i=i, **kw: calls.append(_i) or _f(*a, **kw)
    return calls


def _run(family: str, setting: str, with_tangent: bool):
    """(v, t_v, parameter grads, blocks re-run in the backward, bytes saved for backward outside checkpoints)."""
    model, inp = _build(family, SETTINGS[setting][0])
    calls = _count_calls(model.blocks)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        args = (inp["x"], inp["t_x"] if with_tangent else None, inp["timestep"],
                inp["t_timestep"] if with_tangent else None, inp["context"])
        v, t_v = model.forward_jvp(*args)
    n_forward = len(calls)
    assert n_forward == LAYERS
    g = torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((v * g).sum(), params, allow_unused=True)
    return v, t_v, grads, len(calls) - n_forward, sum(saved)


@pytest.mark.parametrize("with_tangent", [True, False], ids=["jvp", "forward"])
@pytest.mark.parametrize("family", ["wan", "cosmos"])
def test_recompute_is_bit_exact_and_reruns_the_chosen_blocks(family, with_tangent, one_thread):
    ref_v, ref_t_v, ref_grads, rerun, saved_none = _run(family, "none", with_tangent)
    assert rerun == 0
    assert any(g is not None and g.abs().sum() > 0 for g in ref_grads)
    saved = {"none": saved_none}
    for setting, (_, want_rerun) in SETTINGS.items():
        if setting == "none":
            continue
        v, t_v, grads, rerun, saved[setting] = _run(family, setting, with_tangent)
        assert rerun == want_rerun, (setting, rerun)
        assert torch.equal(v, ref_v), setting
        assert (t_v is None) == (ref_t_v is None) and (t_v is None or torch.equal(t_v, ref_t_v)), setting
        for g, r in zip(grads, ref_grads):
            assert (g is None) == (r is None) and (g is None or torch.equal(g, r)), setting
    # more recomputed blocks keep fewer activations (block N=L-1 keeps one block's more than uniform)
    order = ["none", "block1", f"block{LAYERS - 1}", "uniform"]
    assert all(saved[a] > saved[b] for a, b in zip(order, order[1:])), saved


def test_block_recompute_counts_per_pipeline_stage():
    """Megatron's block method counts from the first block of each stage (``layer_offset``): a stage of the last
    two blocks with N = 1 re-runs its first block; N >= the stage's blocks re-runs all of them."""
    from megatron_rcm.models.wan import WanModel, wan_config

    cfg = wan_config("wan-tiny-t2v", num_layers=LAYERS, **recompute_fields(True, "block", 1))
    stage = WanModel(cfg, layer_offset=2, num_local_layers=2, pre_process=False)
    inp = wan_helpers.make_inputs("t2v")
    B, D = inp["x"].shape[0], cfg.hidden_size
    S = 3 * 4 * 4  # frames 3, 8x8 latent / patch (1, 2, 2)
    stage.set_input_tensor(torch.randn(S, B, D, requires_grad=True))
    calls = _count_calls(stage.blocks)
    h, _ = stage(inp["x"], inp["timestep"], inp["context"])
    h.sum().backward()
    assert calls == [0, 1, 0]
    assert recomputed_fraction(cfg, 2) == 0.5 and recomputed_fraction(cfg, 4) == 0.25
    assert recomputed_fraction(wan_config("wan-tiny-t2v", num_layers=LAYERS, **recompute_fields(True)), 2) == 1.0


@pytest.mark.parametrize("build", [lambda **kw: wan_helpers.wan_config("wan-tiny-t2v", **kw),
                                   lambda **kw: cosmos_helpers.cosmos_config("cosmos-tiny-t2i", **kw)])
def test_model_config_errors_name_the_fields(build):
    cfg = build(**recompute_fields(True, "block", 2))
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("full", "block", 2)
    for bad in (0, 3, None, 1.5, True):
        with pytest.raises(ValueError, match=rf"recompute_method='block' needs recompute_num_layers in "
                                             rf"1..num_layers \(=2\), got {bad!r}"):
            build(**recompute_fields(True, "block", bad))
    with pytest.raises(NotImplementedError, match="recompute_method='uniform', recompute_num_layers=2 is not "
                                                  "implemented; recompute is .*'full', 'block', N"):
        build(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)
    with pytest.raises(ValueError, match="recompute_method='block', recompute_num_layers=1 given with "
                                         "recompute_granularity=None"):
        build(recompute_method="block", recompute_num_layers=1)


@pytest.mark.parametrize("sets, match", [
    (["model.recompute_method=blocks"], r"'model.recompute_method': 'blocks' \(expected one of uniform, block\)"),
    (["model.recompute_method=block", "model.recompute_num_layers=2"],
     "model.recompute_method='block' needs model.recompute=true"),
    (["model.recompute=true", "model.recompute_method=block"], r"'model.recompute_num_layers': None \(expected "
                                                                 "a positive integer"),
    (["model.recompute=true", "model.recompute_num_layers=2"], r"'model.recompute_num_layers': 2 \(expected null "
                                                                 "or 1 with recompute_method=uniform"),
])
def test_training_config_errors_name_the_keys(sets, match):
    from megatron_rcm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.source=mock", *sets])


def test_training_config_builds_block_recompute_and_refuses_too_many_layers():
    from megatron_rcm.config import ConfigError, load_config
    from megatron_rcm.training.models import build_wan_config

    sets = ["data.source=mock", "model.recompute=true", "model.recompute_method=block"]
    cfg = load_config(None, [*sets, "model.recompute_num_layers=1"])
    wcfg = build_wan_config(cfg.model)
    assert (wcfg.recompute_granularity, wcfg.recompute_method, wcfg.recompute_num_layers) == ("full", "block", 1)
    assert build_wan_config(cfg.model, recompute=False).recompute_granularity is None  # the teacher
    cfg = load_config(None, [*sets, "model.recompute_num_layers=3"])
    with pytest.raises(ConfigError, match=r"invalid 'model' section .*recompute_num_layers in 1..num_layers "
                                          r"\(=2\), got 3"):
        build_wan_config(cfg.model)


def test_recompute_reenters_the_fp8_region_the_forward_ran_in(monkeypatch):
    """With FP8 on, a recomputed block re-runs in the backward, outside the trainer's FP8 autocast: it must
    re-enter the same recipe, or TE's layers recompute in BF16 and save other tensors than the forward (seen on
    an H200: "A different number of tensors was saved during the original forward and recomputation", 105 vs
    75). Here the FP8 region is a recording stand-in; TE's own run is tests/test_te_gpu.py."""
    from megatron_rcm.models import te_support

    region = {"open": False, "recompute_calls": 0}

    class FakeAutocast:
        def __enter__(self):
            region["open"] = True

        def __exit__(self, *exc):
            region["open"] = False

    model, inp = _build("wan", SETTINGS["uniform"][0])
    model.config.fp8 = "e4m3"  # the recipe fields are read only through the stand-ins below
    monkeypatch.setattr(te_support, "fp8_active", lambda: region["open"])
    monkeypatch.setattr(te_support, "fp8_autocast", lambda cfg: FakeAutocast())
    seen = []
    for block in model.blocks:
        block.forward = lambda *a, _f=block.forward, **kw: seen.append(region["open"]) or _f(*a, **kw)
    with FakeAutocast():  # the trainer's region around one network call
        v, _ = model.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"])
    v.sum().backward()  # outside the region, as in the trainer
    assert seen == [True] * (2 * LAYERS), seen  # forward in FP8, and every recompute back in FP8
    # without FP8 in the forward the recompute stays out of it
    seen.clear()
    model.zero_grad()
    v, _ = model.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"])
    v.sum().backward()
    assert seen == [False] * (2 * LAYERS), seen
