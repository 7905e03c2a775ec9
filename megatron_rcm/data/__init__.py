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


def check_data_source(data_cfg, guidance: float | None) -> None:
    """Start-up checks of ``data_cfg`` (cheap: reads ``index.json`` and file sizes, no sample data).

    Shards: the folder holds a valid index (``load_index``), and CFG with ``guidance`` other than None/1
    finds a negative-prompt embedding: ``negative.t5.pth`` beside the shards or a ``.neg_t5`` member in
    every sample. Raises ``ShardError`` naming the folder and how to fix it.
    """
    if data_cfg.source != "shards":
        return  # mock and digits data carry their own negative-prompt embedding
    from pathlib import Path

    from megatron_rcm.data.format import NEGATIVE_FILE
    from megatron_rcm.data.index import load_index, samples_without_negative

    root = Path(data_cfg.path)
    samples = load_index(root)
    if guidance is None or guidance == 1.0 or (root / NEGATIVE_FILE).is_file():
        return
    missing = samples_without_negative(samples)
    if missing:
        raise ShardError(
            f"distill.guidance={guidance} (classifier-free guidance) needs a negative-prompt embedding, but "
            f"data directory {root} has no {NEGATIVE_FILE} and {len(missing)} of {len(samples)} samples "
            f"(e.g. '{missing[0]}') have no .neg_t5 member. Write the shards with "
            f"`python tools/make_shards.py ... --negative NEG.t5.pth` (the umT5 embedding [L, D] of the "
            f"negative prompt), or torch.save that tensor as {root / NEGATIVE_FILE}; or train without "
            f"CFG: distill.guidance=1")


__all__ = ["Batch", "ShardError", "ShardWriter", "build_data_source", "check_data_source"]
