"""The shapes video benchmark: the procedural clips, the evaluator, the metrics against independent
references, the temporal half of the Wan DiT being exercised, and the whole pipeline at toy size (the
full run is measured by hand: docs/quickstart.md)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_rcm.config import load_config
from megatron_rcm.config.loader import to_dict
from megatron_rcm.config.schema import ConfigError
from megatron_rcm.data.shapes import (
    DIRECTION_XY,
    NUM_CONDITIONS,
    ShapesSource,
    condition_attributes,
    condition_index,
    prompt_embeddings,
    random_motion,
    render_clips,
    sample_clips,
)
from megatron_rcm.eval.frechet import frechet_distance
from megatron_rcm.eval.metrics import paired_mse
from megatron_rcm.eval.video_evaluator import evaluate_clips, train_evaluator
from megatron_rcm.eval.video_metrics import mean_and_spread, video_metrics
from megatron_rcm.shapes_bench import SHAPES_OVERRIDES, ShapesBenchOptions, run_shapes_bench

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_matches_the_embedded_config():
    assert to_dict(load_config(ROOT / "examples/configs/shapes.yaml")) == to_dict(load_config(None, SHAPES_OVERRIDES))


def test_condition_ids_round_trip_and_prompt_tokens_name_attributes():
    cond = torch.arange(NUM_CONDITIONS)
    assert torch.equal(condition_index(*condition_attributes(cond)), cond)
    emb, neg = prompt_embeddings(text_dim=8, text_len=4)
    assert emb.shape == (NUM_CONDITIONS, 4, 8) and neg.shape == (1, 4, 8)
    s, c, d = condition_attributes(cond)
    # token 0 depends only on the shape, token 1 on the colour, token 2 on the direction; token 3 is padding
    for tok, attr in ((0, s), (1, c), (2, d)):
        for a in attr.unique():
            rows = emb[attr == a, tok]
            assert torch.equal(rows, rows[:1].expand_as(rows))
        assert len({tuple(r.tolist()) for r in emb[:, tok]}) == len(attr.unique())
    assert torch.count_nonzero(emb[:, 3]) == 0
    with pytest.raises(ValueError, match="text_len=2"):
        prompt_embeddings(8, 2)


def test_render_moves_the_shape_by_speed_times_direction():
    # one red square moving right at 1 px/frame, from centre (5.5, 8.0): the colour's centre of mass
    # (an independent reading of the pixels) moves +1 px in x per frame and not in y
    x = render_clips(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]),
                     torch.tensor([[5.5, 8.0]]), frames=4, height=16, width=16)
    assert x.shape == (1, 3, 4, 16, 16) and x.min() >= -1 and x.max() <= 1
    cov = (x[0, 0] + 1) / 2  # red channel coverage [F, H, W]
    assert torch.count_nonzero(x[0, 1] + 1) == 0  # nothing green
    ys, xs = torch.meshgrid(torch.arange(16) + 0.5, torch.arange(16) + 0.5, indexing="ij")
    cx = (cov * xs).sum((1, 2)) / cov.sum((1, 2))
    cy = (cov * ys).sum((1, 2)) / cov.sum((1, 2))
    torch.testing.assert_close(cx, torch.tensor([5.5, 6.5, 7.5, 8.5]), atol=1e-4, rtol=0)
    torch.testing.assert_close(cy, torch.full((4,), 8.0), atol=1e-4, rtol=0)


def test_random_clips_stay_inside_the_frame_and_the_source_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    d = torch.arange(4).repeat(50)
    speed, start = random_motion(d, 8, 16, 16, g)
    centres = start[:, None] + torch.arange(8.0)[None, :, None] * speed[:, None, None] * DIRECTION_XY[d][:, None]
    r = 2.5  # the shape's radius at 16 x 16: the whole shape stays inside on every frame
    assert centres.min() >= r - 1e-5 and centres.max() <= 16 - r + 1e-5
    assert speed.min() >= 0.8 and speed.max() <= 1.4 and speed.std() > 0.1 and start.std(0).min() > 1.0
    src = ShapesSource(4, [3, 8, 16, 16], 3, 8, seed=1)
    src.next_batch()
    state = src.state_dict()
    b1 = src.next_batch()
    src2 = ShapesSource(4, [3, 8, 16, 16], 3, 8, seed=1)
    src2.load_state_dict(state)
    b2 = src2.next_batch()
    assert torch.equal(b1.latent_BCFHW, b2.latent_BCFHW) and torch.equal(b1.labels_B, b2.labels_B)
    with pytest.raises(ValueError, match=r"data.latent_shape=\[4, 8, 16, 16\]"):
        ShapesSource(4, [4, 8, 16, 16], 3, 8, seed=1)


def test_source_batch_is_the_clips_rendered_one_by_one():
    # the batched render must not change the data stream: clip i is sample_clips of its own generator
    src = ShapesSource(6, [3, 8, 16, 16], 3, 8, seed=3)
    src.next_batch()
    batch = src.next_batch()
    for j, i in enumerate(range(6, 12)):
        g = torch.Generator().manual_seed(3 * 1_000_003 + i)
        cond = torch.randint(36, (1,), generator=g)
        assert int(batch.labels_B[j]) == int(cond)
        assert torch.equal(batch.latent_BCFHW[j], sample_clips(cond, 8, 16, 16, g)[0])
        assert torch.equal(batch.context_BLD[j], src.emb_KLD[cond[0]])


def test_same_noise_mse_and_spread_against_numpy():
    a, b = torch.randn(5, 3, 2, 8, 8), torch.randn(5, 3, 2, 8, 8)
    assert paired_mse(a, b) == pytest.approx(float(np.mean((a.numpy() - b.numpy()) ** 2)), rel=1e-6)
    rows = [{"r": {"m": 1.0, "x": None}}, {"r": {"m": 2.0, "x": None}}, {"r": {"m": 4.0, "x": None}}]
    s = mean_and_spread(rows)
    assert s["r"]["m"]["mean"] == pytest.approx(7 / 3)
    assert s["r"]["m"]["std"] == pytest.approx(float(np.std([1.0, 2.0, 4.0], ddof=1)))
    assert s["r"]["x"] == {"mean": None, "std": None, "n": 0}


def test_video_metrics_against_hand_counts():
    # 4 clips of conditions with directions right, left, down, up; 3 frame pairs each
    cond = condition_index(torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 2, 3]))
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 5, generator=g)
    real = {"features": torch.randn(12, 5, generator=g)}
    pred = {"shape": torch.tensor([0, 1, 0, 0]), "colour": torch.tensor([0, 1, 2, 1]),
            "direction": torch.tensor([0, 0, 0, 0]), "features": feats,
            "pair_direction": torch.tensor([[0, 0, 0], [1, 1, 0], [2, 3, 3], [3, 3, 3]])}
    teacher = torch.randn(4, 5, generator=g)
    m = video_metrics(pred, cond, real, torch.arange(12) % 4, teacher, mse_teacher=0.5)
    assert m["shape"] == 0.75 and m["colour"] == 1.0 and m["direction"] == 0.25
    assert m["motion"] == pytest.approx(9 / 12)  # 3 + 2 + 1 + 3 pairs move the conditioned way
    assert m["fd_real"] == pytest.approx(frechet_distance(feats, real["features"]))
    assert m["fd_teacher"] == pytest.approx(frechet_distance(feats, teacher))
    assert m["mse_teacher"] == 0.5
    bad = dict(pred, features=feats.clone().index_fill_(0, torch.tensor([1]), float("nan")))
    with pytest.raises(ValueError, match="1 of 4 clips have non-finite"):
        video_metrics(bad, cond, real, torch.arange(12) % 4)


def test_evaluator_beats_chance_on_real_clips():
    ev = train_evaluator(4, 8, 8, steps=40, seed=0)
    cond = torch.arange(NUM_CONDITIONS).repeat(4)
    x = sample_clips(cond, 4, 8, 8, torch.Generator().manual_seed(5))
    pred = evaluate_clips(ev, x)
    assert pred["features"].shape == (len(cond), 64) and pred["pair_direction"].shape == (len(cond), 3)
    assert float((pred["colour"] == condition_attributes(cond)[1]).double().mean()) > 0.6  # chance 1/3
    with pytest.raises(ValueError, match="do not match the evaluator"):
        evaluate_clips(ev, torch.zeros(2, 3, 5, 8, 8))


def test_the_wan_dit_attends_across_frames_with_temporal_rope():
    """The benchmark's model config exercises the temporal half: output frame 0 depends on input frame 7,
    and the frame RoPE makes the model not equivariant to permuting frames."""
    from megatron_rcm.parallel.state import initialize_parallel
    from megatron_rcm.training.models import build_model, build_wan_config
    initialize_parallel(1, seed=0)
    cfg = load_config(None, SHAPES_OVERRIDES)
    model = build_model(build_wan_config(cfg.model, cfg.data, recompute=False), seed=0).eval()
    C, F, H, W = cfg.data.latent_shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, F, H, W, generator=g)
    ts, ctx = torch.tensor([300.0, 700.0]), torch.randn(2, 3, 32, generator=g)
    with torch.no_grad():
        y = model(x, ts, ctx)
        x2 = x.clone()
        x2[:, :, F - 1] += 1.0
        y2 = model(x2, ts, ctx)
        perm = torch.roll(torch.arange(F), 1)
        y_perm = model(x[:, :, perm], ts, ctx)
    assert (y2[:, :, 0] - y[:, :, 0]).abs().max() > 1e-4
    assert (y_perm - y[:, :, perm]).abs().max() > 1e-4


def test_shapes_bench_at_toy_size(tmp_path):
    small = ["model.overrides.num_layers=1", "model.overrides.hidden_size=32", "model.overrides.ffn_hidden_size=64",
             "data.micro_batch_size=4", "distill.tangent_warmup=2", "data.latent_shape=[3,4,8,8]"]
    opts = ShapesBenchOptions(output_dir=str(tmp_path), seeds=(0, 1), teacher_steps=3, teacher_batch=8,
                              distill_steps=3, methods=("rcm", "scm"), teacher_sample_steps=2,
                              samples_per_condition=2, evaluator_steps=40, overrides=small, progress=False)
    result = run_shapes_bench(opts)
    rows = result["metrics"]
    expected = {"real clips (held-out)", "teacher 2-step (CFG 2)"} | {
        f"{m} student {n}-step" for m in ("rcm", "scm") for n in (1, 2, 4)}
    assert set(rows) == expected
    for name, m in rows.items():
        for col, v in m.items():
            if v["mean"] is not None:
                assert np.isfinite(v["mean"]) and np.isfinite(v["std"]) and v["n"] == 2, (name, col)
        assert 0.0 <= m["shape"]["mean"] <= 1.0 and m["fd_real"]["mean"] >= 0.0
    assert rows["rcm student 1-step"]["mse_teacher"]["mean"] is not None
    assert rows["teacher 2-step (CFG 2)"]["mse_teacher"]["mean"] is None
    assert result["evaluator_accuracy"]["colour"] > 0.5  # chance 1/3, trained on real clips
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == rows and set(saved["per_seed"]) == {"0", "1"}
    assert saved["options"]["teacher_time_mean"] == 0.5  # the teacher's RF times lean to high noise
    for seed in (0, 1):
        gap = saved["teacher_diagnostics"][f"seed_{seed}"]["oracle_gap"]
        assert set(gap) == {"s=0.5", "s=0.7", "s=0.85", "s=0.95"}
        assert all(np.isfinite(v) and v >= 0 for row in gap.values() for v in row.values())
        assert gap["s=0.5"]["oracle_vs_clean"] < gap["s=0.95"]["oracle_vs_clean"]
    for seed in (0, 1):
        d = tmp_path / f"seed_{seed}"
        sheet = Image.open(d / "contact_sheet.png")
        # rows: real, teacher, 2 methods x 3 step counts; 4 samples of 4 frames (scale 3, pad 1, gap 8)
        assert sheet.size == (150 + 4 * (4 * 25 + 8), 8 * 25 + 1)
        for name in ("anim_rcm.gif", "anim_scm.gif", "anim_real_teacher.gif"):
            gif = Image.open(d / name)
            assert gif.n_frames == 4
        assert Image.open(d / "anim_rcm.gif").size == (4 * 34 + 2, 4 * 34 + 2)  # teacher + 3 step counts
        assert (d / "teacher" / "metadata.json").is_file()


def test_bad_options_fail_before_work(tmp_path):
    with pytest.raises(ConfigError, match="distinct seeds"):
        run_shapes_bench(ShapesBenchOptions(output_dir=str(tmp_path), seeds=(1, 1)))
    with pytest.raises(ConfigError, match="samples_per_condition=1"):
        run_shapes_bench(ShapesBenchOptions(output_dir=str(tmp_path), samples_per_condition=1))
    assert not any(tmp_path.iterdir())


def test_cli_rejects_bad_seeds_before_work(tmp_path, capsys):
    from megatron_rcm.cli import main

    assert main(["quickstart", "--seeds", "0", "--output-dir", str(tmp_path)]) == 2
    assert "--seeds is only supported with --data shapes" in capsys.readouterr().err
    assert main(["quickstart", "--teacher-batch", "64", "--output-dir", str(tmp_path)]) == 2
    assert "--teacher-batch is only supported with --data shapes" in capsys.readouterr().err
    assert main(["quickstart", "--data", "shapes", "--seeds", "0,x", "--output-dir", str(tmp_path)]) == 2
    assert "'0,x': expected comma-separated integers" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_teacher_time_sampler_is_logit_normal_with_the_given_mean():
    """pretrain_teacher draws RF times s = sigmoid(time_mean + N(0, 1)); the shapes teacher shifts them toward
    high noise. Checked against the logit-normal's quantiles (independent: the stdlib's normal quantiles)."""
    from statistics import NormalDist

    from megatron_rcm.data.batch import Batch
    from megatron_rcm.training.teacher_pretrain import pretrain_teacher

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.s = []

        def forward(self, x, timestep_B, ctx):
            self.s.append(timestep_B / 1000.0)
            return x * self.w

    class Zeros:
        def next_batch(self):
            return Batch(torch.zeros(256, 1, 1, 1, 1), torch.zeros(256, 1, 1), None, [], None)

    for mean in (0.0, 1.0):
        model = Recorder()
        pretrain_teacher(model, Zeros(), 8, time_mean=mean, warmup_steps=1)
        s = torch.cat(model.s).double()
        for q in (0.1, 0.5, 0.9):
            expected = 1 / (1 + np.exp(-(mean + NormalDist().inv_cdf(q))))
            assert float(torch.quantile(s, q)) == pytest.approx(expected, abs=0.02), (mean, q)
