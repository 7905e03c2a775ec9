"""Config: example files carry the reference hyperparameters, CLI > file > defaults, clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rcm.config import ConfigError, ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"


def test_reference_hyperparameters_in_example_files():
    c13 = load_config(CONFIGS / "wan2.1_t2v_1.3b.yaml", ["data.path=/shards"])
    c14 = load_config(CONFIGS / "wan2.1_t2v_14b.yaml", ["data.path=/shards"])
    for c in (c13, c14):  # rcm_math.md sections 2, 3, 4, 7
        assert c.optimizer.beta1 == 0.0 and c.optimizer.beta2 == 0.999 and c.optimizer.weight_decay == 0.01
        assert c.optimizer.warmup_steps == 100 and c.model.params_dtype == "bf16"
        assert c.distill.guidance == 5.0 and c.distill.scm_loss_scale == 100.0 and c.distill.dmd_loss_scale == 1.0
        assert c.distill.critic_time.kind == "uniform_shift" and c.distill.critic_time.shift == 5.0
        assert c.distill.timestep_scale == 1000.0 and c.distill.N_max == 4
    assert (c13.optimizer.lr, c13.optimizer.critic_lr) == (2e-6, 4e-7)
    assert (c14.optimizer.lr, c14.optimizer.critic_lr) == (1e-6, 1e-7)
    assert (c13.distill.student_time.P_mean, c14.distill.student_time.P_mean) == (0.7, 1.5)
    assert (c13.distill.student_update_freq, c14.distill.student_update_freq) == (5, 10)
    assert (c13.distill.sigma_max, c14.distill.sigma_max) == (80.0, 200.0)
    assert c13.data.latent_shape == [16, 20, 60, 104] and c14.data.latent_shape == [16, 21, 60, 104]
    quick = load_config(CONFIGS / "quickstart.yaml")
    assert quick.data.source == "digits"


def test_precedence_cli_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optimizer: {lr: 3.0e-5, critic_lr: 1.0e-5}\ndata: {source: mock}\n")
    cfg = load_config(f, ["optimizer.lr=7e-6", "distill.student_time.P_mean=1.1", "distill.mid_t=[1.2]"])
    assert cfg.optimizer.lr == 7e-6  # CLI
    assert cfg.optimizer.critic_lr == 1e-5  # file
    assert cfg.optimizer.warmup_steps == ExperimentConfig().optimizer.warmup_steps  # default
    assert cfg.distill.student_time.P_mean == 1.1 and cfg.distill.mid_t == (1.2,)
    # dict fields merge key by key (a file's overrides survive a single CLI override)
    f.write_text("data: {source: mock}\nmodel: {overrides: {num_layers: 2, hidden_size: 64}}\n")
    cfg = load_config(f, ["model.overrides.num_layers=1"])
    assert cfg.model.overrides == {"num_layers": 1, "hidden_size": 64}


@pytest.mark.parametrize(
    "override, match",
    [
        ("optimizer.lrr=1", r"unknown config key 'optimizer.lrr'.*did you mean 'optimizer.lr'"),
        ("optimizer.lr=fast", r"'optimizer.lr'.*'fast' is not of type float"),
        ("optimizer.lr=-1", r"'optimizer.lr'.*-1.0.*> 0"),
        ("data.micro_batch_size=1.5", r"'data.micro_batch_size'.*1.5"),
        ("data.latent_shape=[1,2]", r"'data.latent_shape'"),
        ("checkpoint.keep_last=0", r"'checkpoint.keep_last'"),
        ("distill.algorithm=magic", r"'distill'.*algorithm must be one of"),
        ("distill.student_time.kind=gauss", r"'distill.student_time'.*kind"),
        ("optimizer=3", r"'optimizer'.*is a section"),
        ("logging.wandb_mode=cloud", r"'logging.wandb_mode'"),
        ("nonsense", r"must look like key.sub=value"),
        ("optimizer.lr=.inf", r"'optimizer.lr': inf \(expected a finite number\)"),
        ("optimizer.lr=inf", r"'optimizer.lr': inf \(expected a finite number\)"),
        ("optimizer.critic_lr=.nan", r"'optimizer.critic_lr': nan \(expected a finite number\)"),
        ("optimizer.clip_grad=.inf", r"'optimizer.clip_grad': inf"),
        ("distill.guidance=.inf", r"'distill.guidance': inf"),
        ("distill.student_time.P_mean=-.inf", r"'distill.student_time.P_mean': -inf"),
        ("distill.mid_t=[1.0, .nan]", r"'distill.mid_t\[1\]': nan"),
        ("model.overrides.norm_eps=.inf", r"'model.overrides.norm_eps': inf"),
        ("distill.guidance=-2", r"'distill.guidance': -2.0 \(expected >= 0"),
        ("model.overrides={a: 1, a: 2}", r"duplicate key 'a' on lines 1 and 1"),
    ],
)
def test_errors_name_the_bad_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.source=mock", override])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: {lr: 1e-5}\ntraining: {max_stepz: 3}\n")
    with pytest.raises(ConfigError, match=rf"'training.max_stepz' \(from {bad}\)"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)


def test_guidance_zero_and_null_are_valid():
    assert load_config(None, ["data.source=mock", "distill.guidance=0"]).distill.guidance == 0.0
    assert load_config(None, ["data.source=mock", "distill.guidance=null"]).distill.guidance is None


def test_duplicate_yaml_keys_name_the_key_and_both_lines(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("optimizer:\n  lr: 1.0e-5\ndata: {source: mock}\noptimizer:\n  critic_lr: 1.0e-6\n")
    with pytest.raises(ConfigError, match=rf"{f}.*duplicate key 'optimizer' on lines 1 and 4"):
        load_config(f)
    f.write_text("data:\n  source: mock\n  micro_batch_size: 2\n  source: digits\n")  # nested
    with pytest.raises(ConfigError, match=r"duplicate key 'source' on lines 2 and 4"):
        load_config(f)
    # merge keys stay legal, and an explicit key overrides a merged one
    f.write_text("data: {source: mock}\noptimizer:\n  <<: {lr: 1.0e-5, critic_lr: 1.0e-6}\n  lr: 3.0e-5\n")
    cfg = load_config(f)
    assert (cfg.optimizer.lr, cfg.optimizer.critic_lr) == (3e-5, 1e-6)


def test_non_finite_number_from_a_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: {source: mock}\noptimizer: {lr: .inf}\n")
    with pytest.raises(ConfigError, match=r"'optimizer.lr': inf \(expected a finite number\)"):
        load_config(f)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_rcm.cli", "train", "--config",
                           str(CONFIGS / "wan2.1_t2v_1.3b.yaml"), "--print-config"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "data.path" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "megatron_rcm.cli", "train", "--config",
                           str(CONFIGS / "wan2.1_t2v_1.3b.yaml"), "--print-config", "--set", "data.path=/d",
                           "optimizer.lr=5e-7"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "lr: 5.0e-07" in proc.stdout and "path: /d" in proc.stdout
