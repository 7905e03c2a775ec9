"""Cosmos-Predict2 Text2Image / Video2World diffusion transformer on Megatron-Core with a JVP path."""

from megatron_rcm.models.cosmos.config import PRESETS, CosmosConfig, cosmos_config
from megatron_rcm.models.cosmos.model import CosmosModel, unpatchify

__all__ = ["PRESETS", "CosmosConfig", "CosmosModel", "cosmos_config", "unpatchify"]
