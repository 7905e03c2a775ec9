"""Experiment configuration: typed dataclasses, YAML files and command-line overrides."""

from megatron_rcm.config.loader import dump_yaml, load_config, parse_override, to_dict
from megatron_rcm.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "TrainingConfig",
    "dump_yaml",
    "load_config",
    "parse_override",
    "to_dict",
]
