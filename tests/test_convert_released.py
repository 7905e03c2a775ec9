"""The students the rCM release and TurboDiffusion publish: a ``torch.save`` dict of the original WanModel
names under ``net.`` (or ``net_ema.``), the patch embedding a Linear ``[D, C*pt*ph*pw]``.

The rCM-layout files are written here by hand from a tiny diffusers model with every parameter random:
original names from ``tests.test_convert_common.original_keys`` with tensors mapped by diffusers' own
converter, the patch embedding flattened as the release's network consumes it. The flattening order is
proven against the Conv3d of the original checkpoint, independently of our patchify
(``test_release_linear_patch_embedding_equals_the_conv3d``).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.config.schema import ConfigError
from megatron_rcm.convert import importer
from megatron_rcm.convert.errors import ConversionError, KeyMismatchError, UnknownLayoutError
from megatron_rcm.convert.exporter import RCM_FILE, run_export
from megatron_rcm.convert.importer import run_import
from megatron_rcm.parallel.state import initialize_parallel
from tests.test_convert_common import original_state_dict, read_weights, write_diffusers
from tests.test_convert_export import _assert_bit_exact
from tests.test_convert_import import _forward, _load_ours
from tests.wan_helpers import make_diffusers, make_inputs, rel_err, run_diffusers

QUIET = dict(progress=False, log=lambda *_: None)
TOL = 1e-5  # float32 round-off between two implementations of the same math (measured ~3e-7)


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


def release_patch_tokens(x_BCTHW, patch):
    """The release's patchify, ``rearrange(x, "b c (t kt) (h kh) (w kw) -> b (t h w) (c kt kh kw)")``
    (rcm/networks/wan2pt1.py), written out with torch ops."""
    B, C, T, H, W = x_BCTHW.shape
    kt, kh, kw = patch
    x = x_BCTHW.reshape(B, C, T // kt, kt, H // kh, kh, W // kw, kw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # b t h w c kt kh kw
    return x.reshape(B, (T // kt) * (H // kh) * (W // kw), C * kt * kh * kw)


def rcm_state_dict(diffusers_model, i2v: bool, prefix: str = "net.") -> dict:
    """The model as the release stores a student: original names under ``prefix``; the Conv3d patch weight
    [D, C, kt, kh, kw] flattened row-major to the release's Linear [D, C*kt*kh*kw]."""
    out = {}
    for key, value in original_state_dict(diffusers_model, i2v).items():
        if key == "patch_embedding.weight":
            value = value.reshape(value.shape[0], -1).clone()
        out[prefix + key] = value
    return out


def write_rcm(path, sd: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


# ---------------------------------------------------------------------------------------------------
# the layout itself


def test_release_linear_patch_embedding_equals_the_conv3d():
    """Linear(release tokens) with the Conv3d weight flattened row-major == the original Conv3d: the
    release's Linear [D, 64] is ``conv.weight.reshape(D, -1)``, the flattening our import keeps as is."""
    ref = make_diffusers("t2v", seed=3)
    conv = ref.patch_embedding
    x = torch.randn(2, conv.in_channels, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    want = conv(x).flatten(2).transpose(1, 2)  # b (t h w) D
    w = conv.weight.reshape(conv.weight.shape[0], -1)
    got = release_patch_tokens(x, conv.kernel_size) @ w.T + conv.bias
    assert rel_err(got, want) <= TOL
    # and any other flattening (channels last) is wrong
    w_bad = conv.weight.permute(0, 2, 3, 4, 1).reshape(w.shape)
    assert rel_err(release_patch_tokens(x, conv.kernel_size) @ w_bad.T + conv.bias, want) > 1e-2


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_import_rcm_student_matches_the_original_model(tmp_path, kind):
    ref = make_diffusers(kind, seed=5)
    src = write_rcm(tmp_path / "student.pt", rcm_state_dict(ref, kind == "i2v"))
    report = run_import(src, tmp_path / "ckpt", verify=True, **QUIET)
    assert report.plan.layout == "rcm" and report.plan.rcm_prefix == "net."
    assert report.plan.preset == f"wan-tiny-{kind}" and report.tensors == len(ref.state_dict())
    assert report.verify["rel"] <= 1e-5
    inp = make_inputs(kind)
    assert rel_err(_forward(_load_ours(tmp_path / "ckpt"), inp), run_diffusers(ref, inp)) <= TOL


def test_import_reads_the_ema_when_both_copies_are_present(tmp_path):
    raw, ema = make_diffusers("t2v", seed=1), make_diffusers("t2v", seed=2)
    sd = rcm_state_dict(raw, False, "net.") | rcm_state_dict(ema, False, "net_ema.")
    src = write_rcm(tmp_path / "ckpt.pth", {"state_dict": sd})  # the trainer wraps it in "state_dict"
    report = run_import(src, tmp_path / "ckpt", **QUIET)
    assert report.plan.rcm_prefix == "net_ema." and len(report.plan.skipped) == len(raw.state_dict())
    assert "not read" in report.plan.describe()
    inp = make_inputs("t2v")
    assert rel_err(_forward(_load_ours(tmp_path / "ckpt"), inp), run_diffusers(ema, inp)) <= TOL


def test_turbodiffusion_unprefixed_file_with_linear_patch_embedding_imports(tmp_path):
    """TurboDiffusion's ``modify_model.py`` drops ``net.`` and keeps the Linear patch embedding."""
    ref = make_diffusers("t2v", seed=6)
    sd = {k.removeprefix("net."): v for k, v in rcm_state_dict(ref, False).items()}
    report = run_import(write_rcm(tmp_path / "turbo.pth", sd), tmp_path / "ckpt", **QUIET)
    assert report.plan.layout == "original"
    inp = make_inputs("t2v")
    assert rel_err(_forward(_load_ours(tmp_path / "ckpt"), inp), run_diffusers(ref, inp)) <= TOL


# ---------------------------------------------------------------------------------------------------
# round trips


def test_round_trips_through_the_rcm_layout_are_bit_exact(tmp_path):
    ref = make_diffusers("i2v", seed=8)
    want_rcm = rcm_state_dict(ref, True)
    # diffusers -> checkpoint -> rcm == the hand-written release dict
    run_import(write_diffusers(tmp_path / "pipe", ref), tmp_path / "ck_d", **QUIET)
    report = run_export(tmp_path / "ck_d", tmp_path / "rcm", fmt="rcm", **QUIET)
    assert report.files == [RCM_FILE, "config.json"]
    got = torch.load(tmp_path / "rcm" / RCM_FILE, weights_only=True)
    _assert_bit_exact(got, want_rcm)
    # rcm -> checkpoint -> original == the original release dict, -> diffusers == the diffusers model
    run_import(tmp_path / "rcm", tmp_path / "ck_r", **QUIET)  # the folder: model.pt + config.json
    run_export(tmp_path / "ck_r", tmp_path / "orig", fmt="original", **QUIET)
    _assert_bit_exact(read_weights(tmp_path / "orig"), original_state_dict(ref, True))
    run_export(tmp_path / "ck_r", tmp_path / "diff", fmt="diffusers", **QUIET)
    _assert_bit_exact(read_weights(tmp_path / "diff"), ref.state_dict())
    # rcm -> checkpoint -> rcm
    run_export(tmp_path / "ck_r", tmp_path / "rcm2", fmt="rcm", **QUIET)
    _assert_bit_exact(torch.load(tmp_path / "rcm2" / RCM_FILE, weights_only=True), want_rcm)


def test_broken_patch_flattening_fails_parity_and_verify(tmp_path, monkeypatch):
    """A mapping that reads the Linear [D, 64] as channels-last (kt kh kw c) keeps every shape: only the
    numbers see it."""
    from megatron_rcm.convert.errors import VerificationError

    def channels_last(value, key):
        if key == "patch_embedding.weight" and value.ndim == 2:
            D = value.shape[0]
            return value.reshape(D, 1, 2, 2, -1).permute(0, 4, 1, 2, 3).reshape(D, -1)
        return value

    monkeypatch.setattr(importer, "patch_weight_to_ours", channels_last)
    ref = make_diffusers("t2v", seed=9)
    src = write_rcm(tmp_path / "student.pt", rcm_state_dict(ref, False))
    with pytest.raises(VerificationError, match="relative difference"):
        run_import(src, tmp_path / "ckpt", verify=True, **QUIET)
    run_import(src, tmp_path / "ckpt", **QUIET)
    inp = make_inputs("t2v")
    assert rel_err(_forward(_load_ours(tmp_path / "ckpt"), inp), run_diffusers(ref, inp)) > 1e-2


# ---------------------------------------------------------------------------------------------------
# errors


def test_rcm_dict_of_another_architecture_names_the_preset_mismatch(tmp_path):
    src = write_rcm(tmp_path / "student.pt", rcm_state_dict(make_diffusers("t2v"), False))
    with pytest.raises(ConversionError) as err:
        run_import(src, tmp_path / "ckpt", preset="wan2.1-t2v-1.3b", **QUIET)
    msg = str(err.value)
    assert "--preset wan2.1-t2v-1.3b does not describe" in msg and str(src) in msg
    assert "num_layers" in msg and "hidden_size" in msg and "1536" in msg
    assert not (tmp_path / "ckpt").exists()


def test_rcm_dict_with_foreign_or_missing_keys_lists_them(tmp_path):
    sd = rcm_state_dict(make_diffusers("t2v"), False)
    sd["net.blocks.0.self_attn.alpha"] = torch.zeros(1)
    del sd["net.head.modulation"]
    with pytest.raises(KeyMismatchError) as err:
        run_import(write_rcm(tmp_path / "s.pt", sd), tmp_path / "ckpt", **QUIET)
    assert "net.blocks.0.self_attn.alpha" in str(err.value) and "net.head.modulation" in str(err.value)
    # a dict of something else entirely names the layouts it looked for
    with pytest.raises(UnknownLayoutError, match="net.blocks.0.self_attn.q.weight"):
        run_import(write_rcm(tmp_path / "o.pt", {"net.encoder.w": torch.zeros(2)}), tmp_path / "c2", **QUIET)


def test_student_checkpoint_of_another_architecture_names_the_preset(tmp_path):
    from megatron_rcm.models.wan import WanModel, wan_config
    from megatron_rcm.training.models import load_weights

    src = write_rcm(tmp_path / "student.pt", rcm_state_dict(make_diffusers("t2v"), False))
    wider = WanModel(wan_config("wan-tiny-t2v", params_dtype=torch.float32, hidden_size=192))
    with pytest.raises(ConfigError) as err:
        load_weights(wider, src, preset="wan-tiny-t2v", what="model.student_checkpoint")
    msg = str(err.value)
    assert "model.student_checkpoint=" in msg and "model.preset='wan-tiny-t2v'" in msg
    assert "hidden 128" in msg and "hidden 192" in msg


# ---------------------------------------------------------------------------------------------------
# continuing distillation from a released student


def test_trainer_starts_student_and_ema_from_model_student_checkpoint(tmp_path):
    """``model.student_checkpoint`` = an rCM-layout ``.pt``: the student and its EMA start from it, the
    teacher and the critic from the teacher; a step trains from there."""
    from megatron_rcm.config import load_config
    from megatron_rcm.convert.wan_keys import from_ours
    from megatron_rcm.parallel.sharding import gather_full_state_dict
    from megatron_rcm.training import Trainer
    from megatron_rcm.training.models import build_model, build_wan_config
    from tests.test_ckpt_resume import TINY

    args = [*TINY, "training.max_steps=1", f"training.output_dir={tmp_path / 'run'}"]
    cfg = load_config(None, args)
    released = build_model(build_wan_config(cfg.model, cfg.data), seed=11)
    full = gather_full_state_dict(released)
    write_rcm(tmp_path / "student.pt", {from_ours(k, "rcm"): v.contiguous() for k, v in full.items()})

    trainer = Trainer(load_config(None, [*args, f"model.student_checkpoint={tmp_path / 'student.pt'}"]))
    teacher = dict(trainer.teacher.named_parameters())
    for name, p in trainer.student.module.named_parameters():
        assert torch.equal(p, full[name]), name
        assert torch.equal(trainer.ema.shadow[name], full[name].float()), name
    assert any(not torch.equal(full[n], teacher[n]) for n in full)  # the student is not the teacher
    for name, p in trainer.critic.module.named_parameters():
        assert torch.equal(p, teacher[name]), name
    history = trainer.train()
    assert len(history) == 1 and all(torch.isfinite(p).all() for p in trainer.student.module.parameters())

    # without the key the student is the teacher's copy (the rCM default)
    plain = Trainer(load_config(None, args))
    plain_teacher = dict(plain.teacher.named_parameters())
    assert all(torch.equal(p, plain_teacher[n]) for n, p in plain.student.module.named_parameters())
