"""Export back to diffusers and to the original layout: bit-exact round trips (key set, dtype, every bit),
``WanTransformer3DModel.from_pretrained`` on the output, and training checkpoints (TP=2-written chunks,
raw student vs EMA)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_rcm.convert.errors import ConversionError, KeyMismatchError
from megatron_rcm.convert.exporter import run_export
from megatron_rcm.convert.importer import run_import
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.dist_helpers import spawn
from tests.test_convert_common import (
    original_config,
    original_state_dict,
    read_weights,
    write_diffusers,
    write_original,
)
from tests.wan_helpers import make_diffusers

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


def _assert_bit_exact(got: dict, want: dict):
    assert set(got) == set(want), (sorted(set(want) - set(got)), sorted(set(got) - set(want)))
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(torch.uint8), want[k].contiguous().view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diffusers_round_trip_is_bit_exact_and_from_pretrained_loads(tmp_path, dtype):
    ref = make_diffusers("i2v", seed=1)
    if dtype == torch.bfloat16:  # a bf16 release: every tensor (fp32-kept modules too) stored as bf16
        ref = ref.to(dtype)
    src = write_diffusers(tmp_path / "pipe", ref, max_shard_size="100KB")
    run_import(src, tmp_path / "ckpt", **QUIET)
    report = run_export(
        tmp_path / "ckpt", tmp_path / "out", fmt="diffusers", max_shard_bytes=300_000, **QUIET
    )
    assert len(report.files) > 3 and "diffusion_pytorch_model.safetensors.index.json" in report.files
    _assert_bit_exact(read_weights(tmp_path / "out"), read_weights(tmp_path / "pipe" / "transformer"))
    theirs = json.loads((tmp_path / "pipe" / "transformer" / "config.json").read_text())
    ours = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: v for k, v in ours.items() if k != "_diffusers_version"} == {
        k: v for k, v in theirs.items() if k != "_diffusers_version"
    }
    pytest.importorskip("accelerate", reason="diffusers' from_pretrained of Wan needs accelerate")
    from diffusers import WanTransformer3DModel

    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "out", torch_dtype=dtype)
    # from_pretrained keeps its _keep_in_fp32_modules in float32 (bf16 -> fp32 is exact): compare values
    want = ref.state_dict()
    _assert_bit_exact({k: v.to(want[k].dtype) for k, v in loaded.state_dict().items()}, want)


def test_original_round_trip_is_bit_exact(tmp_path):
    ref = make_diffusers("i2v", seed=4)
    sd = original_state_dict(ref, i2v=True)
    src = write_original(tmp_path / "orig", sd, "safetensors", shards=3, config=original_config(ref, True))
    run_import(src, tmp_path / "ckpt", **QUIET)
    run_export(tmp_path / "ckpt", tmp_path / "out", fmt="original", **QUIET)
    _assert_bit_exact(read_weights(tmp_path / "out"), sd)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["_class_name"] == "WanModel" and cfg["model_type"] == "i2v" and cfg["dim"] == 128
    # and across layouts: original in, diffusers out == the diffusers model itself
    run_export(tmp_path / "ckpt", tmp_path / "out_d", fmt="diffusers", **QUIET)
    _assert_bit_exact(read_weights(tmp_path / "out_d"), ref.state_dict())


def test_export_dtype_cast(tmp_path):
    ref = make_diffusers("t2v", seed=6)
    run_import(write_diffusers(tmp_path / "pipe", ref), tmp_path / "ckpt", **QUIET)
    run_export(tmp_path / "ckpt", tmp_path / "out", fmt="original", dtype="bf16", **QUIET)
    got = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    want = {k: v.bfloat16() for k, v in original_state_dict(ref, i2v=False).items()}
    _assert_bit_exact(got, want)


def test_converted_checkpoint_is_a_teacher_checkpoint(tmp_path):
    """The trainer's teacher loader (``model.``-prefixed dist_checkpointing) reads the converter's output."""
    models = pytest.importorskip("megatron_rcm.training.models")
    from megatron_rcm.models.wan import WanModel
    from megatron_rcm.parallel.sharding import gather_full_state_dict
    from tests.test_convert_import import _load_ours

    ref = make_diffusers("t2v", seed=8)
    run_import(write_diffusers(tmp_path / "pipe", ref), tmp_path / "ckpt", **QUIET)
    ours = _load_ours(tmp_path / "ckpt")
    teacher = WanModel(ours.config)
    models.load_weights(teacher, tmp_path / "ckpt")
    _assert_bit_exact(gather_full_state_dict(teacher), gather_full_state_dict(ours))


# ---------------------------------------------------------------------------------------------------
# training checkpoints: student., ema.student., critic., optimizer.* -- written at TP=2


def _train_ckpt_worker(rank, world, ckpt, root):
    """Write a checkpoint laid out like ``Trainer.sharded_state_dict`` (a training run's step folder)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    from megatron_rcm.convert.dist_ckpt import read_wan_config
    from megatron_rcm.models.wan import WanModel
    from tests.test_convert_import import _load_ours

    initialize_parallel(tensor_parallel=world)
    student = _load_ours(ckpt)
    cfg = read_wan_config(ckpt)["arch"].wan_config(params_dtype=torch.float32)
    critic = WanModel(cfg)
    s_sd = student.sharded_state_dict(prefix="student.")
    ema = {n: p.detach() * 0.5 + 1 for n, p in student.named_parameters()}  # distinct values
    sd = {
        "student": s_sd,
        "ema": {n: make_sharded_optimizer_tensor(s_sd[f"student.{n}"], t, "ema") for n, t in ema.items()},
        "critic": critic.sharded_state_dict(prefix="critic."),
        "optimizer_student": {
            n: make_sharded_optimizer_tensor(
                s_sd[f"student.{n}"], torch.zeros_like(p), "optimizer.student.exp_avg"
            )
            for n, p in student.named_parameters()
        },
        "step": 10,
    }
    step_dir = root / "step_00000010"
    if rank == 0:
        step_dir.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sd, str(step_dir))
    torch.distributed.barrier()
    if rank == 0:
        (step_dir / "meta.json").write_text(json.dumps({"step": 10}))
        (root / "latest").write_text("step_00000010\n")
    destroy_parallel()


def test_training_checkpoint_exports_student_and_ema(tmp_path):
    ref = make_diffusers("t2v", seed=9)
    run_import(write_diffusers(tmp_path / "pipe", ref), tmp_path / "ckpt", **QUIET)
    (tmp_path / "run").mkdir()
    spawn(_train_ckpt_worker, 2, tmp_path / "ckpt", tmp_path / "run")
    # no wan_config.json in a training run: the architecture is given (here by its head count)
    with pytest.raises(ConversionError, match="several|--prefix|cannot tell"):
        run_export(tmp_path / "run", tmp_path / "x", fmt="diffusers", num_heads=4, prefix="nope.", **QUIET)
    run_export(tmp_path / "run", tmp_path / "raw", fmt="diffusers", num_heads=4, **QUIET)
    _assert_bit_exact(read_weights(tmp_path / "raw"), ref.state_dict())
    report = run_export(tmp_path / "run", tmp_path / "ema", fmt="diffusers", num_heads=4, ema=True, **QUIET)
    assert report.prefix == "ema.student."
    want = {k: v * 0.5 + 1 for k, v in ref.state_dict().items()}
    _assert_bit_exact(read_weights(tmp_path / "ema"), want)


def test_export_errors_name_the_problem(tmp_path):
    with pytest.raises(ConversionError, match="not a Megatron dist_checkpointing checkpoint"):
        run_export(tmp_path, tmp_path / "out", fmt="diffusers", **QUIET)
    ref = make_diffusers("t2v", seed=10)
    run_import(write_diffusers(tmp_path / "pipe", ref), tmp_path / "ckpt", **QUIET)
    with pytest.raises(ConversionError, match="EMA"):
        run_export(tmp_path / "ckpt", tmp_path / "out", fmt="diffusers", ema=True, **QUIET)
    # a recorded architecture that does not fit the tensors: one layer more than stored
    record = json.loads((tmp_path / "ckpt" / "wan_config.json").read_text())
    record["arch"]["num_layers"] = 3
    (tmp_path / "ckpt" / "wan_config.json").write_text(json.dumps(record))
    with pytest.raises(KeyMismatchError, match=r"missing: model\.blocks\.2\."):
        run_export(tmp_path / "ckpt", tmp_path / "out", fmt="diffusers", **QUIET)
    assert not (tmp_path / "out").exists()
