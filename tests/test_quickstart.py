"""The quickstart end to end at toy sizes (the full run is measured by hand: docs/quickstart.md), and
examples/configs/quickstart.yaml staying equal to the config the quickstart builds in code."""

import json
from pathlib import Path

from megatron_rcm.config import load_config
from megatron_rcm.config.loader import to_dict
from megatron_rcm.quickstart import QUICKSTART_OVERRIDES, QuickstartOptions, run_quickstart

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_matches_the_embedded_config():
    assert to_dict(load_config(ROOT / "examples/configs/quickstart.yaml")) == to_dict(
        load_config(None, QUICKSTART_OVERRIDES))


def test_quickstart_pipeline_at_toy_size(tmp_path):
    small = ["model.overrides.num_layers=1", "model.overrides.hidden_size=48", "model.overrides.ffn_hidden_size=96",
             "data.micro_batch_size=8", "distill.tangent_warmup=2"]
    opts = QuickstartOptions(output_dir=str(tmp_path), teacher_steps=6, teacher_batch=16, distill_steps=4,
                             methods=("rcm", "dmd"), teacher_sample_steps=3, overrides=small, progress=False)
    result = run_quickstart(opts)
    rows = result["metrics"]
    expected = {"real digits (held-out)", "teacher 3-step (CFG 2)"} | {
        f"{m} student {n}-step" for m in ("rcm", "dmd") for n in (1, 2, 4)}
    assert set(rows) == expected
    for name, m in rows.items():
        assert set(m) == {"class_acc", "precision", "recall", "diversity", "fd", "fd_teacher", "mse_teacher"}, name
        assert 0.0 <= m["class_acc"] <= 1.0 and m["fd"] >= 0.0 and m["fd_teacher"] >= -1e-6
    assert rows["real digits (held-out)"]["class_acc"] > 0.9  # the classifier is trained on real data
    assert rows["real digits (held-out)"]["mse_teacher"] is None  # real digits do not share the noise
    assert abs(rows["teacher 3-step (CFG 2)"]["fd_teacher"]) < 1e-6
    assert rows["teacher 3-step (CFG 2)"]["mse_teacher"] == 0.0
    for m in ("rcm", "dmd"):
        for n in (1, 2, 4):
            assert rows[f"{m} student {n}-step"]["mse_teacher"] > 0.0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == rows
    for name in ("grid_rcm.png", "grid_dmd.png", "grid_all.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert (tmp_path / "teacher" / "metadata.json").is_file()
