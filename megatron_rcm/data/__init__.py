"""Training data: tar shards of precomputed latents + text embeddings, mock data, the quickstart digits,
the procedural moving-shape clips."""

from __future__ import annotations

from megatron_rcm.data.batch import Batch
from megatron_rcm.data.format import ShardError
from megatron_rcm.data.writer import ShardWriter


def build_data_source(data_cfg, seed: int, dp_rank: int = 0, dp_size: int = 1):
    """The data source named by ``data_cfg.source`` (a ``megatron_rcm.config.DataConfig``) for one DP rank.

    Every source has ``next_batch() -> Batch``, ``state_dict()``, ``load_state_dict()`` and ``close()``.
    """
    if data_cfg.source == "shards":
        from megatron_rcm.data.shards import ShardSource

        return ShardSource(data_cfg.path, data_cfg.micro_batch_size, data_cfg.latent_shape, data_cfg.text_len,
                           data_cfg.text_dim, seed, dp_rank, dp_size, data_cfg.shuffle)
    if data_cfg.source == "mock":
        from megatron_rcm.data.mock import MockSource

        return MockSource(data_cfg.micro_batch_size, data_cfg.latent_shape, data_cfg.text_len, data_cfg.text_dim,
                          seed, dp_rank, dp_size)
    if data_cfg.source == "digits":
        from megatron_rcm.data.digits import DigitsSource

        return DigitsSource(data_cfg.micro_batch_size, data_cfg.text_len, data_cfg.text_dim, seed, dp_rank,
                            dp_size, data_cfg.shuffle, split="train")
    if data_cfg.source == "shapes":
        from megatron_rcm.data.shapes import ShapesSource

        return ShapesSource(data_cfg.micro_batch_size, data_cfg.latent_shape, data_cfg.text_len, data_cfg.text_dim,
                            seed, dp_rank, dp_size)
    raise ValueError(f"unknown data.source {data_cfg.source!r}")


__all__ = ["Batch", "ShardError", "ShardWriter", "build_data_source"]
