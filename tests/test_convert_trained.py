"""Checkpoints written by the trainer itself, exported: the head count (in no tensor shape) and every other
architecture field come out as the trained model's -- never hidden / 128 (a 4-head, 128-wide model was
exported with 1 head) -- and ``--verify`` fails on non-finite weights, which import names."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_rcm.convert.arch import WanArch, from_diffusers_config, from_original_config
from megatron_rcm.convert.dist_ckpt import arch_of
from megatron_rcm.convert.errors import ConversionError, VerificationError
from megatron_rcm.convert.exporter import run_export
from megatron_rcm.convert.importer import run_import
from tests.test_convert_common import write_diffusers
from tests.wan_helpers import make_diffusers

QUIET = dict(progress=False, log=lambda *_: None)


def _model_sets(heads: int) -> list[str]:
    # 128 wide like the model (hidden / 128 = 1 head); other fields off their defaults too
    return [
        "model.preset=wan-tiny-t2v",
        "model.overrides={in_channels: 1, out_channels: 1, text_dim: 16, num_layers: 1, hidden_size: 128,"
        f" ffn_hidden_size: 96, num_attention_heads: {heads}, freq_dim: 32, norm_eps: 1.0e-5,"
        " rope_max_seq_len: 64, text_len: 4}",
    ]


def _train(tmp_path, heads: int):
    """One rCM step of the trainer, checkpointed: (trainer, checkpoint root)."""
    from megatron_rcm.config import load_config
    from megatron_rcm.training import Trainer

    out = tmp_path / f"run{heads}"
    cfg = load_config(
        None,
        [
            *_model_sets(heads),
            "model.params_dtype=fp32",
            "data.source=digits",
            "data.micro_batch_size=2",
            "data.text_len=4",
            "data.text_dim=16",
            "data.latent_shape=[1,1,8,8]",
            "logging.progress_bar=false",
            "logging.log_every=1000",
            "training.max_steps=1",
            f"training.output_dir={out}",
            f"checkpoint.dir={out / 'checkpoints'}",
            "checkpoint.save_every=1",
        ],
    )
    trainer = Trainer(cfg)
    trainer.train()
    trainer.close()
    return trainer, out / "checkpoints"


@pytest.mark.parametrize("heads", [2, 4, 8])
def test_trainer_checkpoint_exports_its_own_architecture(tmp_path, heads):
    trainer, ckpts = _train(tmp_path, heads)
    trained = arch_of(trainer.wan_cfg)
    assert trained.num_attention_heads == heads and trained.hidden_size == 128

    # the trainer records its config in meta.json: export needs nothing else
    rm = run_export(ckpts / "latest", tmp_path / "m", fmt="diffusers", **QUIET)
    assert rm.arch == trained and "meta.json" in rm.arch_from

    # a checkpoint without that record (written before the trainer kept it): refused, not guessed
    step_dir = ckpts / (ckpts / "latest").read_text().strip()
    meta = json.loads((step_dir / "meta.json").read_text())
    (step_dir / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "config"}))
    with pytest.raises(ConversionError, match=r"head count is stored in no tensor shape.*--config RUN\.yaml"):
        run_export(ckpts / "latest", tmp_path / "guess", fmt="diffusers", **QUIET)
    assert not (tmp_path / "guess").exists()

    # the run's config (as given to the trainer: here all as --set) gives every field
    sets = _model_sets(heads)
    rd = run_export(ckpts / "latest", tmp_path / "d", fmt="diffusers", train_set=sets, **QUIET)
    ro = run_export(ckpts, tmp_path / "o", fmt="original", train_set=sets, **QUIET)
    assert rd.arch == ro.arch == trained and "training config" in rd.arch_from
    d_cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    o_cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert d_cfg["num_attention_heads"] == o_cfg["num_heads"] == heads
    assert d_cfg["attention_head_dim"] == 128 // heads
    # every architecture field round-trips through the config.json of a layout that records it
    from_d, from_o = from_diffusers_config(d_cfg), from_original_config(o_cfg)
    not_in = {"diffusers": {"text_len"}, "original": {"rope_max_seq_len", "image_dim"}}
    for f in dataclasses.fields(WanArch):
        carriers = [
            a for fmt, a in (("diffusers", from_d), ("original", from_o)) if f.name not in not_in[fmt]
        ]
        assert carriers, f.name
        for a in carriers:
            assert getattr(a, f.name) == getattr(trained, f.name), f.name
    # and the weights are the trained student's, bit for bit (diffusers names, via diffusers' own loader)
    pytest.importorskip("accelerate", reason="diffusers' from_pretrained of Wan needs accelerate")
    from diffusers import WanTransformer3DModel

    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "d")
    assert loaded.config.num_attention_heads == heads
    got = load_file(tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    student = trainer.student.module
    assert torch.equal(got["proj_out.weight"], student.head.linear.weight.detach())
    assert torch.equal(
        got["blocks.0.attn1.to_q.weight"], student.blocks[0].self_attn.linear_q.weight.detach()
    )


def test_export_config_and_num_heads_must_agree_with_a_record(tmp_path):
    ref = make_diffusers("t2v", seed=31)
    run_import(write_diffusers(tmp_path / "pipe", ref), tmp_path / "ckpt", **QUIET)
    with pytest.raises(ConversionError, match=r"--num-heads 2 contradicts .*wan_config\.json \(4 heads\)"):
        run_export(tmp_path / "ckpt", tmp_path / "out", fmt="diffusers", num_heads=2, **QUIET)
    with pytest.raises(ConversionError, match=r"--config .*nope\.yaml"):
        run_export(
            tmp_path / "ckpt",
            tmp_path / "out",
            fmt="diffusers",
            train_config=str(tmp_path / "nope.yaml"),
            **QUIET,
        )


def test_nonfinite_weights_are_named_and_fail_verify(tmp_path):
    ref = make_diffusers("t2v", seed=32)
    with torch.no_grad():
        ref.blocks[1].attn1.to_k.weight[3, 5] = float("nan")
        ref.proj_out.bias[0] = float("inf")
    src = write_diffusers(tmp_path / "pipe", ref)
    lines = []
    report = run_import(src, tmp_path / "ckpt", progress=False, log=lines.append)
    assert report.nonfinite == ["blocks.1.attn1.to_k.weight (1 of 16384)", "proj_out.bias (1 of 16)"]
    assert any(
        line.startswith("warning: 2 tensor(s)")
        and "blocks.1.attn1.to_k.weight" in line
        and "proj_out.bias" in line
        for line in lines
    ), lines
    assert "warning: 2 source tensor(s) hold NaN/inf" in report.summary()
    with pytest.raises(
        VerificationError, match=r"--verify failed: the ours and the source model's output holds"
    ):
        run_import(src, tmp_path / "verified", verify=True, **QUIET)
    assert not (tmp_path / "verified").exists()
