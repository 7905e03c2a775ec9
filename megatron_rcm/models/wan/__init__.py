"""Wan2.1 T2V/I2V diffusion transformer on Megatron-Core with a JVP path."""

from megatron_rcm.models.wan.config import PRESETS, WanConfig, wan_config
from megatron_rcm.models.wan.model import WanModel, patchify, unpatchify

__all__ = ["PRESETS", "WanConfig", "WanModel", "patchify", "unpatchify", "wan_config"]
