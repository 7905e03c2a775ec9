"""Wan2.2 A14B two experts: the switch at the boundary (which expert a given t uses), its tangent path,
conversion of a two-expert folder (diffusers and original layouts, bit-exact round trip), a short
distillation run of both experts' students, and switched sampling against each expert on its own range."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_rcm.models.wan import WanModel, wan_config
from megatron_rcm.models.wan.experts import TwoExpertNet, boundary_t
from megatron_rcm.parallel.state import initialize_parallel
from megatron_rcm.rcm import Conditioning, TrigFlowDenoiser
from megatron_rcm.rcm.samplers import student_sample, student_times
from megatron_rcm.rcm.trigflow import preconditioners, rf_to_trig, trig_to_rf
from tests.wan_helpers import randomize_

QUIET = dict(progress=False, log=lambda *_: None)
TINY = dict(params_dtype=torch.float32, num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
            in_channels=4, out_channels=4, text_dim=16, freq_dim=16)


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


def _expert(seed):
    model = WanModel(wan_config("wan2.2-t2v-a14b", **TINY)).eval()
    with torch.no_grad():
        randomize_(model, seed)
    return model


def _pair(ratio=0.875):
    return TwoExpertNet(_expert(1), _expert(2), ratio, 1000.0)


def _inputs(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 2, 4, 4, generator=g), torch.randn(B, 5, 16, generator=g)


def test_boundary_in_trigflow_time():
    """s_b = 0.875 -> t_b = atan(7); 0.9 -> atan(9); and the conversions of rcm_math.md sec. 1 agree."""
    assert boundary_t(0.875) == pytest.approx(math.atan(7.0), abs=1e-15)
    assert boundary_t(0.9) == pytest.approx(math.atan(9.0), abs=1e-15)
    for ratio in (0.875, 0.9):
        t_b = torch.tensor([boundary_t(ratio)], dtype=torch.float64)
        assert float(trig_to_rf(t_b)) == pytest.approx(ratio, abs=1e-14)
        assert float(rf_to_trig(torch.tensor([ratio]))) == pytest.approx(boundary_t(ratio), abs=1e-7)


def test_expert_switch_at_the_boundary():
    """c_noise >= 875 (i.e. t >= atan 7) goes to the high-noise expert, below to the low-noise one; a batch
    straddling the boundary gives each sample exactly its expert's output."""
    net = _pair()
    ts = torch.tensor([875.0, 874.9999, 999.0, 0.0, 875.0001])
    assert net.uses_high(ts).tolist() == [True, False, True, False, True]
    # in TrigFlow time, through the preconditioner's c_noise as the denoiser feeds it (float32)
    t_b = boundary_t(0.875)
    t = torch.tensor([t_b + 1e-6, t_b - 1e-6, 1.5, 0.3], dtype=torch.float64)
    assert net.uses_high(preconditioners(t, 1000.0).c_noise.float()).tolist() == [True, False, True, False]
    x, ctx = _inputs(4)
    ts = torch.tensor([900.0, 100.0, 875.0, 874.0])
    with torch.no_grad():
        v = net(x, ts, ctx)
        for i, expert in enumerate([net.high, net.low, net.high, net.low]):
            ref = expert(x[i:i + 1], ts[i:i + 1], ctx[i:i + 1])
            assert torch.allclose(v[i:i + 1], ref, atol=1e-6, rtol=0)
            other = (net.low if expert is net.high else net.high)(x[i:i + 1], ts[i:i + 1], ctx[i:i + 1])
            assert not torch.allclose(v[i:i + 1], other, atol=1e-3)  # the experts do differ


def test_switched_tangent_is_each_experts_tangent_and_gradients_stay_in_range():
    net = _pair()
    x, ctx = _inputs(3, seed=1)
    ts = torch.tensor([950.0, 300.0, 880.0])
    g = torch.Generator().manual_seed(5)
    t_x, t_ts = torch.randn(x.shape, generator=g), torch.randn(3, generator=g)
    with torch.no_grad():
        v, t_v = net.forward_jvp(x, t_x, ts, t_ts, ctx)
        for i, expert in enumerate([net.high, net.low, net.high]):
            sl = slice(i, i + 1)
            v_i, t_v_i = expert.forward_jvp(x[sl], t_x[sl], ts[sl], t_ts[sl], ctx[sl])
            assert torch.allclose(v[sl], v_i, atol=1e-6) and torch.allclose(t_v[sl], t_v_i, atol=1e-5)
    # a loss on high-noise times only trains the high-noise expert
    net(x, torch.tensor([950.0, 900.0, 880.0]), ctx).square().sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in net.low.parameters())
    assert any(p.grad is not None and p.grad.any() for p in net.high.parameters())


def test_switched_sampling_equals_each_expert_on_its_own_range():
    """student_sample with the switch == the same steps, each run by the expert owning its time."""
    net = _pair()
    noise, ctx = _inputs(2, seed=3)
    cond = Conditioning(context=ctx)
    times = student_times(4, 80.0, (1.5, 1.4, 1.0))
    t_b = boundary_t(0.875)
    assert sum(t >= t_b for t in times[:-1]) == 2  # atan(80), 1.5 high; 1.4, 1.0 low: both experts run
    with torch.no_grad():
        switched = student_sample(TrigFlowDenoiser(net, 1000.0), noise, cond, 4,
                                  generator=torch.Generator().manual_seed(9))
        gen = torch.Generator().manual_seed(9)
        x = noise
        for t_cur, t_next in zip(times[:-1], times[1:]):
            expert = net.high if t_cur >= t_b else net.low
            x0 = TrigFlowDenoiser(expert, 1000.0)(x, torch.full((2,), t_cur, dtype=torch.float64), cond).x0
            if t_next == 0.0:
                break
            eps = torch.randn(x.shape, generator=gen)
            x = math.cos(t_next) * x0 + math.sin(t_next) * eps
        high_only = student_sample(TrigFlowDenoiser(net.high, 1000.0), noise, cond, 4,
                                   generator=torch.Generator().manual_seed(9))
    assert torch.allclose(switched, x0, atol=1e-5)
    assert not torch.allclose(switched, high_only, atol=1e-3)


# -- conversion --------------------------------------------------------------------------------------------


def _diffusers_expert(seed):
    from diffusers import WanTransformer3DModel

    from tests.test_wan22 import A14B

    model = WanTransformer3DModel(**(A14B | dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64,
                                                 num_layers=1, text_dim=16, freq_dim=16, in_channels=4,
                                                 out_channels=4))).eval()
    randomize_(model, seed)
    return model


def _write_two_experts(root, layout):
    from safetensors.torch import save_file

    from tests.test_convert_common import original_state_dict

    experts = (_diffusers_expert(11), _diffusers_expert(12))
    if layout == "diffusers":
        for name, model in zip(("transformer", "transformer_2"), experts):
            model.save_pretrained(root / name)
        (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875}))
    else:
        for name, model in zip(("high_noise_model", "low_noise_model"), experts):
            (root / name).mkdir(parents=True)
            save_file(original_state_dict(model, i2v=False), root / name / "diffusion_pytorch_model.safetensors")
    return experts


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_two_expert_folder_round_trip_is_bit_exact(tmp_path, layout):
    from megatron_rcm.convert.experts import expert_folders, read_boundary_ratio
    from megatron_rcm.convert.exporter import run_export
    from megatron_rcm.convert.importer import run_import
    from tests.test_convert_common import read_weights

    high, low = _write_two_experts(tmp_path / "src", layout)
    extra = {} if layout == "diffusers" else dict(num_heads=2, boundary_ratio=0.9)
    report = run_import(tmp_path / "src", tmp_path / "ckpt", **extra, **QUIET)
    assert report.tensors == 2 * len(high.state_dict())
    assert read_boundary_ratio(tmp_path / "ckpt") == (0.875 if layout == "diffusers" else 0.9)
    assert set(expert_folders(tmp_path / "ckpt")) == {"high", "low"}
    run_export(tmp_path / "ckpt", tmp_path / "out", fmt="diffusers", **QUIET)
    for name, ref in (("transformer", high), ("transformer_2", low)):
        got = read_weights(tmp_path / "out" / name)
        want = ref.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    # the experts are not swapped: the high-noise one differs from the low-noise source
    got_high = read_weights(tmp_path / "out" / "transformer")
    assert not all(torch.equal(got_high[k], low.state_dict()[k]) for k in got_high)


def test_two_expert_import_refuses_a_bad_boundary_before_reading(tmp_path):
    from megatron_rcm.convert.errors import UnknownLayoutError
    from megatron_rcm.convert.importer import run_import

    _write_two_experts(tmp_path / "src", "original")
    with pytest.raises(UnknownLayoutError, match=r"--boundary-ratio 1\.5: must lie in \(0, 1\)"):
        run_import(tmp_path / "src", tmp_path / "ckpt", num_heads=2, boundary_ratio=1.5, **QUIET)
    with pytest.raises(UnknownLayoutError, match=r"gives no boundary_ratio; pass --preset or --boundary-ratio"):
        run_import(tmp_path / "src", tmp_path / "ckpt", num_heads=2, **QUIET)
    assert not (tmp_path / "ckpt").exists()


# -- distillation ---------------------------------------------------------------------------------------------

RUN = [
    "model.preset=wan2.2-t2v-a14b",
    "model.params_dtype=fp32",
    "model.overrides={num_layers: 1, hidden_size: 32, ffn_hidden_size: 64, num_attention_heads: 2, in_channels: 4,"
    " out_channels: 4, text_dim: 16, freq_dim: 16}",
    "data.source=mock",
    "data.micro_batch_size=4",
    "data.latent_shape=[4,2,4,4]",
    "data.text_len=5",
    "data.text_dim=16",
    "distill.algorithm=rcm",
    "distill.tangent_warmup=2",
    "distill.student_update_freq=2",
    "optimizer.warmup_steps=1",
    "optimizer.lr=1e-3",
    "logging.progress_bar=false",
    "logging.log_every=1000",
    "training.seed=0",
]


def test_short_two_expert_distillation_trains_both_students(tmp_path):
    """rCM on a two-expert teacher (converted folder): each expert has its own student (and critic), the
    teacher expert chosen by time; both students move, both stay finite; the checkpoint holds both."""
    from megatron_rcm.config import load_config
    from megatron_rcm.training import Trainer

    _write_two_experts(tmp_path / "src", "diffusers")
    from megatron_rcm.convert.importer import run_import

    run_import(tmp_path / "src", tmp_path / "teacher", **QUIET)
    cfg = load_config(None, [*RUN, f"model.teacher_checkpoint={tmp_path / 'teacher'}", "training.max_steps=5",
                             f"training.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    student = trainer.student.module
    assert isinstance(student, TwoExpertNet) and isinstance(trainer.teacher, TwoExpertNet)
    assert trainer.critic is not None and isinstance(trainer.critic.module, TwoExpertNet)
    # the teacher's experts are the converted ones, in their places
    ref_high = _diffusers_expert(11).state_dict()
    assert torch.equal(trainer.teacher.high.state_dict()["patch_embedding.weight"].flatten(),
                       ref_high["patch_embedding.weight"].flatten())
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    history = trainer.train()
    assert len(history) == 5 and all(math.isfinite(h.get("loss/student", h.get("loss/critic", 0.0))) for h in history)
    after = dict(student.named_parameters())
    for which in ("high", "low"):
        moved = [k for k in before if k.startswith(which) and not torch.equal(before[k], after[k])]
        assert moved, f"the {which}-noise student did not move"
    samples = trainer.sample(2)
    assert samples.shape == (4, 4, 2, 4, 4) and torch.isfinite(samples).all()
    sd = trainer.sharded_state_dict()
    assert any(k.startswith("student.high.") for k in sd["student"]) and \
        any(k.startswith("student.low.") for k in sd["student"])


def test_two_expert_teacher_needs_a_two_expert_folder(tmp_path):
    from megatron_rcm.config import load_config
    from megatron_rcm.config.schema import ConfigError
    from megatron_rcm.convert.importer import run_import
    from megatron_rcm.training import Trainer

    _write_two_experts(tmp_path / "src", "diffusers")
    run_import(tmp_path / "src" / "transformer", tmp_path / "one", **QUIET)
    cfg = load_config(None, [*RUN, f"model.teacher_checkpoint={tmp_path / 'one'}",
                             f"training.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"two-expert model; give a folder holding both experts"):
        Trainer(cfg)


def test_sampling_loads_both_experts_with_the_switch(tmp_path):
    """``load_dit`` (the ``sample`` command's loader) of a converted two-expert folder and of a two-expert
    training checkpoint gives the switched pair: the experts in their places, the run's boundary."""
    from megatron_rcm.config import load_config
    from megatron_rcm.convert.importer import run_import
    from megatron_rcm.pipeline.dit import load_dit
    from megatron_rcm.training import Trainer

    _write_two_experts(tmp_path / "src", "diffusers")
    run_import(tmp_path / "src", tmp_path / "teacher", **QUIET)
    net, what = load_dit(tmp_path / "teacher")
    assert isinstance(net, TwoExpertNet) and net.boundary_ratio == 0.875 and "two experts" in what
    ref_high = _diffusers_expert(11).state_dict()["patch_embedding.weight"].flatten()
    assert torch.equal(net.high.state_dict()["patch_embedding.weight"].flatten(), ref_high)

    cfg = load_config(None, [*RUN, f"model.teacher_checkpoint={tmp_path / 'teacher'}", "training.max_steps=1",
                             "distill.algorithm=scm", f"checkpoint.dir={tmp_path / 'ckpt'}",
                             f"training.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    trainer.train()
    trainer.save_checkpoint()
    student, _ = load_dit(tmp_path / "ckpt", ema=False)
    assert isinstance(student, TwoExpertNet) and student.boundary_ratio == 0.875
    for which in ("high", "low"):
        ours = dict(getattr(trainer.student.module, which).named_parameters())
        for k, v in getattr(student, which).named_parameters():
            assert torch.equal(v, ours[k]), (which, k)
