"""The distillation training loop: Megatron DDP + optimizers, checkpoints, logging, sample grids."""

from megatron_rcm.training.checkpoint import CheckpointManager
from megatron_rcm.training.trainer import Trainer

__all__ = ["CheckpointManager", "Trainer"]
