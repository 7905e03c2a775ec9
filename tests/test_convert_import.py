"""Import from every input layout, load the checkpoint at TP=1 and TP=2, and match diffusers' forward.

Each case builds a tiny diffusers model with every parameter random, writes it in one layout, converts
it, loads the checkpoint into our WanModel, and compares outputs on the same input with the diffusers
model (float32; rel err <= 1e-5, round-off: measured ~3e-7, as in tests/test_wan_parity.py).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.convert.dist_ckpt import load_model, read_wan_config
from megatron_rcm.convert.importer import run_import
from megatron_rcm.models.wan import WanModel
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.dist_helpers import spawn
from tests.test_convert_common import (
    original_config,
    original_state_dict,
    write_diffusers,
    write_original,
)
from tests.wan_helpers import diffusers_config, make_diffusers, make_inputs, rel_err, run_diffusers

TOL = 1e-5  # float32 round-off between two implementations of the same math (measured ~3e-7)


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


def _write(layout_case: str, tmp_path, kind: str, model):
    """Write ``model`` in one input layout; returns (SRC, import kwargs)."""
    i2v = kind == "i2v"
    if layout_case == "diffusers-pipeline-sharded":
        return write_diffusers(tmp_path / "pipe", model, pipeline=True, max_shard_size="100KB"), {}
    if layout_case == "diffusers-transformer-dir":
        return write_diffusers(tmp_path / "transformer", model, pipeline=False), {}
    sd = original_state_dict(model, i2v)
    cfg = original_config(model, i2v)
    if layout_case == "original-safetensors":
        return write_original(tmp_path / "orig", sd, "safetensors", config=cfg), {}
    if layout_case == "original-safetensors-sharded-index":
        folder = write_original(tmp_path / "orig", sd, "safetensors", shards=3, config=cfg)
        return folder / "diffusion_pytorch_model.safetensors.index.json", {}
    if layout_case == "original-pth-no-config":  # architecture from the shapes; heads given
        return write_original(tmp_path / "orig", sd, "pth") / "diffusion_pytorch_model.pth", {"num_heads": 4}
    if layout_case == "original-pth-sharded-index":
        return write_original(tmp_path / "orig", sd, "pth", shards=2, config=cfg), {}
    raise ValueError(layout_case)


CASES = [
    ("diffusers-pipeline-sharded", "t2v"),
    ("diffusers-transformer-dir", "i2v"),
    ("original-safetensors", "t2v"),
    ("original-safetensors-sharded-index", "i2v"),
    ("original-pth-no-config", "t2v"),
    ("original-pth-sharded-index", "i2v"),
]


def _load_ours(ckpt, **overrides) -> WanModel:
    record = read_wan_config(ckpt)
    model = WanModel(record["arch"].wan_config(params_dtype=torch.float32, **overrides)).eval()
    load_model(model, ckpt)
    return model


def _forward(model, inp):
    with torch.no_grad():
        return model(inp["x"], inp["timestep"], inp["context"], inp["clip"])


@pytest.mark.parametrize("layout_case,kind", CASES)
def test_import_every_layout_matches_diffusers(tmp_path, layout_case, kind):
    ref = make_diffusers(kind, seed=7)
    src, kwargs = _write(layout_case, tmp_path, kind, ref)
    report = run_import(src, tmp_path / "ckpt", progress=False, log=lambda *_: None, **kwargs)
    assert report.plan.layout == layout_case.split("-")[0]
    assert report.plan.preset == f"wan-tiny-{kind}"
    assert report.tensors == len(ref.state_dict())
    inp = make_inputs(kind)
    assert rel_err(_forward(_load_ours(tmp_path / "ckpt"), inp), run_diffusers(ref, inp)) <= TOL


def test_model_matching_no_preset_takes_config_json(tmp_path):
    from diffusers import WanTransformer3DModel

    from tests.wan_helpers import randomize_

    ref = WanTransformer3DModel(**(diffusers_config("t2v") | {"num_layers": 3, "ffn_dim": 192})).eval()
    randomize_(ref, seed=3)
    src = write_diffusers(tmp_path / "pipe", ref)
    report = run_import(src, tmp_path / "ckpt", progress=False, log=lambda *_: None)
    assert report.plan.preset is None and "config.json" in report.plan.arch_from
    assert report.plan.arch.num_layers == 3 and report.plan.arch.ffn_hidden_size == 192
    inp = make_inputs("t2v")
    assert rel_err(_forward(_load_ours(tmp_path / "ckpt"), inp), run_diffusers(ref, inp)) <= TOL


def test_dtype_choice_and_verify(tmp_path):
    """--dtype bf16 stores bf16 (round-to-nearest of the source); --verify compares with the source rounded
    the same way, so both report a float32 round-off-sized difference."""
    ref = make_diffusers("t2v", seed=2)
    src = write_diffusers(tmp_path / "pipe", ref)
    r32 = run_import(src, tmp_path / "fp32", verify=True, progress=False, log=lambda *_: None)
    assert r32.dtype == "fp32" and r32.verify["rel"] <= TOL
    r16 = run_import(src, tmp_path / "bf16", dtype="bf16", verify=True, progress=False, log=lambda *_: None)
    assert r16.dtype == "bf16" and r16.verify["rel"] <= TOL
    from megatron_rcm.convert.dist_ckpt import load_full_tensors, tensor_metadata

    meta = tensor_metadata(tmp_path / "bf16")
    assert {dtype for _, dtype in meta.values()} == {torch.bfloat16}
    key = "model.blocks.0.self_attn.linear_q.weight"
    q = load_full_tensors(tmp_path / "bf16", {key: meta[key]})[key]
    assert torch.equal(q, ref.blocks[0].attn1.to_q.weight.detach().bfloat16())


def test_pipeline_stage_loads_its_global_layers(tmp_path):
    """A stage holding layers 1.. of the model (layer_offset=1) reads blocks.1, not blocks.0."""
    ref = make_diffusers("t2v", seed=5)
    run_import(
        write_diffusers(tmp_path / "pipe", ref), tmp_path / "ckpt", progress=False, log=lambda *_: None
    )
    full = _load_ours(tmp_path / "ckpt")
    record = read_wan_config(tmp_path / "ckpt")
    stage = WanModel(
        record["arch"].wan_config(params_dtype=torch.float32), layer_offset=1, num_local_layers=1
    )
    load_model(stage, tmp_path / "ckpt")
    for (name, p), q in zip(stage.blocks[0].named_parameters(), full.blocks[1].parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(stage.blocks[0].modulation, full.blocks[0].modulation)


# ---------------------------------------------------------------------------------------------------
# TP=2 (gloo): the TP=1-written checkpoint is resharded on load


def _tp_worker(rank, world, cases):
    initialize_parallel(tensor_parallel=world)
    outs = []
    for ckpt, inp in cases:
        model = _load_ours(ckpt)
        outs.append(_forward(model, inp))
    destroy_parallel()
    return outs


def test_checkpoint_loads_at_tp2_and_matches_diffusers(tmp_path):
    cases, refs = [], []
    for kind, layout_case in (
        ("t2v", "original-safetensors-sharded-index"),
        ("i2v", "diffusers-pipeline-sharded"),
    ):
        ref = make_diffusers(kind, seed=11)
        src, kwargs = _write(layout_case, tmp_path / kind, kind, ref)
        run_import(src, tmp_path / kind / "ckpt", tp=2, progress=False, log=lambda *_: None, **kwargs)
        inp = make_inputs(kind, frames=3, size=8)  # 3*4*4 = 48 tokens: divisible by the SP size 2
        cases.append((str(tmp_path / kind / "ckpt"), inp))
        refs.append(run_diffusers(ref, inp))
    outs = spawn(_tp_worker, 2, cases)
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) <= TOL


def test_checkpoint_files_are_bounded_and_load(tmp_path, monkeypatch):
    """DCP keeps a file's tensors referenced until the file is closed: the writer starts a new file every
    ``max_file_bytes`` (1 GiB by default; 64 KB here) so memory stays bounded, and the result loads."""
    from megatron_rcm.convert import dist_ckpt

    monkeypatch.setattr(dist_ckpt.StreamingTorchDistSave.__init__, "__defaults__", (64_000,))
    ref = make_diffusers("t2v", seed=14)
    run_import(
        write_diffusers(tmp_path / "pipe", ref), tmp_path / "ckpt", progress=False, log=lambda *_: None
    )
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.distcp"))
    largest = 768 * 128 * 4  # time_projection.weight: a tensor past the limit still gets written whole
    assert len(files) > 5 and all(
        (tmp_path / "ckpt" / f).stat().st_size < 64_000 + largest + 4096 for f in files
    )
    inp = make_inputs("t2v")
    assert rel_err(_forward(_load_ours(tmp_path / "ckpt"), inp), run_diffusers(ref, inp)) <= TOL
