"""The layout planner: divisibility rules, memory model, calibration round trip, CLI (megatron_rcm/planner)."""

import json

import pytest

from megatron_rcm.cli import main
from megatron_rcm.models.wan import WanModel, wan_config
from megatron_rcm.parallel.state import initialize_parallel
from megatron_rcm.planner.layouts import Layout, Problem, enumerate_layouts, latent_grid, video_tokens
from megatron_rcm.planner.measured import DEFAULT_CALIBRATION, load_measured
from megatron_rcm.planner.memory import SELECTIVE_KEPT, MemoryModel, param_counts, stepped_in_run
from megatron_rcm.planner.timing import EFF_RING, IB_GBPS, NVLINK_GBPS, TimingModel, _collective_s
from megatron_rcm.training.flops import model_flops, recompute_shares, step_flops

PLAN = ["plan", "--preset", "wan2.1-t2v-14b", "--frames", "81", "--size", "1280x720", "--gpus", "128",
        "--gpu-memory", "80"]


@pytest.fixture(scope="module")
def calibrated():
    cal = load_measured(DEFAULT_CALIBRATION)
    mem = MemoryModel.calibrate(cal.problem, cal.layout, {k: v["peak_memory_gib"] for k, v in cal.kinds.items()},
                                stepped_in_run(cal.kinds))
    return cal, mem, TimingModel.calibrate(cal.problem, cal.layout, cal.kinds)


@pytest.fixture(scope="module")
def problem_14b():
    cfg = wan_config("wan2.1-t2v-14b", tensor_model_parallel_size=1)
    F, H, W = latent_grid(81, 720, 1280)
    return Problem(cfg, (16, F, H, W))


def test_video_tokens_of_wan_vae_and_patch():
    assert latent_grid(81, 720, 1280) == (21, 90, 160)
    assert video_tokens(latent_grid(81, 720, 1280)) == 21 * 45 * 80 == 75_600
    assert video_tokens(latent_grid(77, 480, 832)) == 20 * 30 * 52 == 31_200
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        latent_grid(80, 720, 1280)


def test_param_counts_match_the_model_and_the_checkpoint():
    """Against the built tiny models' numel, and the 1.3B count against the measured checkpoint size
    (student + critic bf16, two optimizers' fp32 master + 2 moments, fp32 EMA = 32 bytes per parameter)."""
    initialize_parallel(tensor_parallel=1)
    for preset in ("wan-tiny-t2v", "wan-tiny-i2v"):
        model = WanModel(wan_config(preset))
        assert sum(param_counts(model.config)) == sum(p.numel() for p in model.parameters()), preset
    ckpt_bytes = json.loads(DEFAULT_CALIBRATION.read_text())["checkpoint"]["bytes"]
    P = sum(param_counts(wan_config("wan2.1-t2v-1.3b", tensor_model_parallel_size=1)))
    assert abs(32 * P / ckpt_bytes - 1) < 1e-3  # the rest: checkpoint metadata


def test_divisibility_rules_and_pp_x_cp_layouts_listed():
    enum = enumerate_layouts(128, heads=40, layers=40, micro_batches=(1,))
    assert enum.layouts
    for lay in enum.layouts:
        assert lay.gpus == 128
        assert 40 % lay.tp == 0
        assert 40 % lay.pp == 0
        if lay.cp_comm == "a2a":
            assert (40 // lay.tp) % lay.cp == 0
        assert lay.status == "ok" and lay.implemented  # PP x CP runs in the trainer too
    assert any(lay.pp > 1 and lay.cp > 1 for lay in enum.layouts)
    assert {lay.tp for lay in enum.layouts} == {1, 2, 4, 8}
    assert {lay.pp for lay in enum.layouts} == {1, 2, 4, 8}
    reasons = " | ".join(r.reason for r in enum.rejected)
    assert "TP=16 does not divide the 40 attention heads" in reasons
    assert "a2a CP=16 does not divide the 10 heads per TP rank (TP=4)" in reasons
    small = enumerate_layouts(24, heads=12, layers=30)
    assert {lay.tp for lay in small.layouts} == {1, 2, 3, 4, 6, 12}
    assert "PP=4 does not divide the 30 layers" in " | ".join(r.reason for r in small.rejected)


def test_memory_falls_with_tp_cp_and_recompute(calibrated, problem_14b):
    _, mem, _ = calibrated
    gib = lambda **kw: mem.per_gpu_gib(problem_14b, Layout(**{"tp": 1, "cp": 1, "pp": 1, "dp": 1, **kw}))  # noqa: E731
    tps = [gib(tp=t, dp=8 // t) for t in (1, 2, 4, 8)]
    assert tps == sorted(tps, reverse=True) and tps[0] > tps[-1] * 3
    cps = [gib(tp=4, cp=c, dp=8 // c) for c in (1, 2, 4, 8)]
    assert cps == sorted(cps, reverse=True) and cps[0] > cps[-1]
    assert gib(tp=8, pp=2) < gib(tp=8)
    assert gib(tp=8, recompute=True) < gib(tp=8, recompute=False)
    # distributed optimizer: more DP shards only the optimizer state
    assert gib(tp=8, dp=16) < gib(tp=8, dp=1)


def test_block_recompute_interpolates_memory_and_time(calibrated, problem_14b):
    """Block recompute of N of a stage's blocks: the blocks not recomputed keep their activations (memory
    linear in N between recompute off and on) and skip their recompute forward (time likewise); N at least
    the stage's blocks is full recompute."""
    _, mem, tm = calibrated
    lay = lambda **kw: Layout(**{"tp": 8, "cp": 1, "pp": 2, "dp": 1, **kw})  # noqa: E731  20 blocks per stage
    gib = lambda layout: mem.peak_gib(problem_14b, layout, "student")  # noqa: E731
    sec = lambda layout: tm.step(problem_14b, layout, "student").total  # noqa: E731
    on, off = lay(), lay(recompute=False)
    for n, f in ((5, 0.25), (10, 0.5), (15, 0.75)):
        part = lay(recompute_layers=n)
        assert part.recompute_fraction(40) == f and part.name().startswith("TP8 CP1 PP2 DP1 rc" + str(n))
        assert gib(part) == pytest.approx(gib(off) + f * (gib(on) - gib(off)), rel=1e-12)
        assert sec(part) == pytest.approx(sec(off) + f * (sec(on) - sec(off)), rel=1e-12)
    assert gib(on) < gib(lay(recompute_layers=10)) < gib(off) and sec(on) > sec(lay(recompute_layers=10)) > sec(off)
    assert gib(lay(recompute_layers=20)) == gib(on) == gib(lay(recompute_layers=40))
    assert lay(recompute=False, recompute_layers=5).recompute_fraction(40) == 0.0
    # calibrating on a block-recompute run recovers alpha (the kept blocks' estimate is subtracted first)
    part = lay(recompute_layers=10)
    again = type(mem).calibrate(problem_14b, part, {"student": gib(part)})
    assert again.alpha["student"] == pytest.approx(mem.alpha["student"], rel=1e-9)


def test_calibration_reproduces_the_measurement(calibrated):
    cal, mem, tm = calibrated
    assert set(cal.kinds) == {"warmup", "student", "critic"}
    for kind, m in cal.kinds.items():
        t = tm.step(cal.problem, cal.layout, kind, m["rollout_mean"]).total
        assert abs(t / m["step_time_s"] - 1) < 0.01, kind
        got = mem.peak_gib(cal.problem, cal.layout, kind, stepped_in_run(cal.kinds)[kind])
        assert abs(got / m["peak_memory_gib"] - 1) < 0.02, kind
        # the planner's FLOPs are bench_step's FLOP model (tests/test_flops.py checks it against FlopCounterMode),
        # averaged over the file's rollout lengths (the file's own flops_per_step predate the JVP-recompute term)
        rollouts = json.loads(DEFAULT_CALIBRATION.read_text())["kinds"][kind]["rollout_steps"]
        cfg, shape = cal.problem.wan_cfg, cal.problem.latent_CFHW
        fwd, jvp = model_flops(cfg, shape, cal.problem.text_len)
        shares = recompute_shares(cfg, fwd, jvp, shape, 1.0, cal.problem.text_len, granularity="full")
        want = sum(step_flops(kind, fwd, jvp, 1, n, shares[0], True, shares[1]) for n in rollouts) / len(rollouts)
        assert tm.flops_per_gpu(cal.problem, cal.layout, kind, m["rollout_mean"]) == pytest.approx(want, rel=1e-9)


def test_timing_parts(calibrated, problem_14b):
    _, _, tm = calibrated
    # a ring all-gather of 1 GB over 8 GPUs of one node, and over 16 GPUs (two nodes: InfiniBand)
    assert _collective_s(1e9, 8, 8, EFF_RING) == pytest.approx(7 / 8 / (NVLINK_GBPS * EFF_RING))
    assert _collective_s(1e9, 16, 16, EFF_RING) == pytest.approx(15 / 16 / (IB_GBPS * EFF_RING))
    one = tm.step(problem_14b, Layout(8, 1, 1, 1), "critic")
    pp = tm.step(problem_14b, Layout(8, 1, 4, 1, num_micro_batches=4), "critic")
    # 4 samples over 4 stages: 4x the FLOPs over 4x the GPUs, times the bubble (m + p - 1) / m = 7 / 4
    assert pp.compute == pytest.approx(one.compute * 7 / 4)
    assert one.tp > 0 and one.dp == 0 and one.cp == 0
    a2a = tm.step(problem_14b, Layout(4, 2, 1, 1, cp_comm="a2a"), "student")
    assert a2a.cp > 0
    # ring CP: hidden behind a chunk's attention at 75,600 tokens, exposed when the chunks are tiny (S = 16)
    assert tm.step(problem_14b, Layout(4, 2, 1, 1, cp_comm="p2p"), "student").cp == 0
    tiny = Problem(problem_14b.wan_cfg, (16, 1, 8, 8))
    assert tm.step(tiny, Layout(4, 2, 1, 1, cp_comm="p2p"), "student").cp > 0


def test_cli_plan_prints_a_ranked_table_and_json(tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    assert main([*PLAN, "--all", "--top", "5", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "75,600 tokens" in text and "Feasible layouts, ranked" in text
    assert "not implemented" not in text
    assert "TP=16 does not divide the 40 attention heads" in text  # --all: the broken rules, listed
    assert "memory: needs" in text
    assert "step_1p3b_fused_2026-11-30.json" in text and "+0.0%" in text
    plan = json.loads(out_json.read_text())
    tok = [r["tokens_per_s_per_gpu"] for r in plan["layouts"]]
    assert tok == sorted(tok, reverse=True)
    assert all(r["memory_gib"] <= 80 for r in plan["layouts"])
    assert all(r["memory_gib"] > 80 for r in plan["too_big"])
    assert all(40 % r["tp"] == 0 for r in plan["layouts"] + plan["too_big"])


def test_cli_checks_measured_multi_gpu_runs(tmp_path, capsys):
    """A (synthetic) 2-GPU TP=2 bench_step file is predicted at its own layout and its error printed."""
    data = json.loads(DEFAULT_CALIBRATION.read_text())
    data["world_size"] = 2
    data["overrides"] = [*data["overrides"], "parallel.tensor_parallel=2"]
    for k in data["kinds"].values():
        k["step_time_s"] *= 0.6
    two = tmp_path / "step_2gpu_tp2.json"
    two.write_text(json.dumps(data))
    assert main([*PLAN, "--measured", str(two), "--json", str(tmp_path / "p.json")]) == 0
    rows = [c for c in json.loads((tmp_path / "p.json").read_text())["check"] if c["file"] == str(two)]
    assert {r["kind"] for r in rows} == {"warmup", "student", "critic"}
    assert all(r["layout"].startswith("TP2 CP1 PP1 DP1") for r in rows)
    assert all(r["predicted_gib"] < r["measured_gib"] for r in rows)  # TP=2 halves weights: predicted lower
    assert "step_2gpu_tp2.json" in capsys.readouterr().out


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": "x"}))
    assert main([*PLAN, "--measured", str(bad)]) == 2
    assert "bad.json: missing key 'overrides'" in capsys.readouterr().err
    assert main([*PLAN[:6], "1280x721", *PLAN[7:]]) == 2
    assert "multiples of 8" in capsys.readouterr().err


def test_optimizer_moments_predict_a_run_in_another_order(calibrated):
    """AdamW allocates its moments at a network's first step. The calibration run measured warm-up, student,
    critic in that order (no critic moments in the first two); a later run on the same shapes measured critic
    then student (no student moments in the critic step, both in the student step). The model calibrated on the
    first predicts the second's peaks within 2 % (10.6 GiB of moments apart from the first run's peaks of the same
    kinds); without the moments term the calibration itself fails (the warm-up peak lies below the static
    estimate; checked)."""
    from megatron_rcm.planner.memory import stepped_in_training

    _, mem, _ = calibrated
    other = load_measured(DEFAULT_CALIBRATION.parent / "step_1p3b_sdpa_flash_2026-11-30.json")
    assert list(other.kinds) == ["critic", "student"]
    stepped = stepped_in_run(other.kinds)
    assert stepped == {"critic": ("critic",), "student": ("critic", "student")}
    for kind, m in other.kinds.items():
        got = mem.peak_gib(other.problem, other.layout, kind, stepped[kind])
        assert abs(got / m["peak_memory_gib"] - 1) < 0.02, (kind, got, m["peak_memory_gib"])
    assert stepped_in_training("warmup") == ("student",) and stepped_in_training("critic") == ("student", "critic")


def test_selective_recompute_layouts_predict_the_measured_selective_run():
    """Calibrated on the full-recompute run of 2026-12-01, the planner predicts the selective run measured right
    after it on the same H200 (docs/benchmarks.md): peaks within 3 % (the kept q, k, v, o of ``SELECTIVE_KEPT``),
    and selective faster than full. Files without a granularity record ran full, whatever the config says now."""
    bench = DEFAULT_CALIBRATION.parent
    full = load_measured(bench / "step_1p3b_full_2026-12-01.json")
    sel = load_measured(bench / "step_1p3b_selective_2026-12-01.json")
    assert full.layout.recompute_granularity == "full" and sel.layout.recompute_granularity == "selective"
    assert load_measured(DEFAULT_CALIBRATION).layout.recompute_granularity == "full"
    assert sel.layout.name() == "TP1 CP1 PP1 DP1 rc-sel mb1"
    mem = MemoryModel.calibrate(full.problem, full.layout, {k: v["peak_memory_gib"] for k, v in full.kinds.items()},
                                stepped_in_run(full.kinds))
    tm = TimingModel.calibrate(full.problem, full.layout, full.kinds)
    stepped = stepped_in_run(sel.kinds)
    for kind, k in sel.kinds.items():
        got = mem.peak_gib(sel.problem, sel.layout, kind, stepped[kind])
        assert abs(got / k["peak_memory_gib"] - 1) < 0.03, (kind, got, k["peak_memory_gib"])
        extra = got - mem.peak_gib(full.problem, full.layout, kind, stepped[kind])
        units = 31200 * 1536 * 30 / 2**30
        assert extra == pytest.approx(SELECTIVE_KEPT[kind] * units, rel=1e-9)
        t_sel = tm.step(sel.problem, sel.layout, kind, k["rollout_mean"]).total
        assert t_sel < tm.step(full.problem, full.layout, kind, k["rollout_mean"]).total
    enum = enumerate_layouts(8, 40, 40)
    grans = {(lay.recompute, lay.recompute_granularity) for lay in enum.layouts}
    assert grans == {(True, "full"), (True, "selective"), (False, "full")}
