"""What a checkpoint needs to stay layout-agnostic: the data-parallel size that wrote it and the data position
at another DP size (resume), and one local copy per shard (save: the interleaved schedule's chunks each hold a
copy of the conditioning embeddings)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["data_position_at", "one_copy_per_shard", "saved_dp_size"]


def saved_dp_size(path: Path) -> int | None:
    """The data-parallel size of the run that wrote ``path``: its world size over TP x CP x PP of its stored
    config; None when ``meta.json`` lacks either (written by an older version)."""
    meta = json.loads((path / "meta.json").read_text())
    par = (meta.get("config") or {}).get("parallel")
    if "world_size" not in meta or par is None:
        return None
    model_parallel = par.get("tensor_parallel", 1) * par.get("context_parallel", 1) * par.get("pipeline_parallel", 1)
    return int(meta["world_size"]) // model_parallel


def data_position_at(state: dict, dp_size: int, dp_rank: int) -> dict:
    """An ``EpochOrder`` state (data position) taken at another data-parallel size, as DP rank ``dp_rank`` of
    ``dp_size`` continues it. The saved ranks read positions ``r, r + W, ...`` of the epoch's permutation with
    one cursor c for all (each reads a micro-batch per step), so together they consumed its first W c
    positions; at W' ranks the cursor is W c / W'. ValueError naming the numbers when W' does not divide W c."""
    saved_dp, cursor = int(state["dp_size"]), int(state["cursor"])
    if saved_dp * cursor % dp_size:
        raise ValueError(f"the checkpoint's data position (cursor {cursor} on each of {saved_dp} data-parallel "
                         f"ranks: {saved_dp * cursor} samples of epoch {state['epoch']}) does not split over "
                         f"{dp_size} data-parallel ranks")
    return {**state, "cursor": saved_dp * cursor // dp_size, "dp_size": dp_size, "dp_rank": dp_rank}


def one_copy_per_shard(sharded_state_dict: dict) -> dict:
    """``sharded_state_dict`` without the second and later local copies of a ``ShardedTensor`` (same checkpoint
    key, global offset and flattened range), keeping a main replica (replica id all zeros) where one is among
    them. Megatron's fully parallel save (``FullyParallelSaveStrategyWrapper``) picks the writing rank per shard
    id and sets every local tensor of that id to main replica 0 there, so two local copies of one shard would
    both become main replicas (``CheckpointingException: Invalid access pattern``). Under the interleaved
    pipeline schedule each model chunk holds a copy of the conditioning embeddings (identical by construction:
    ``parallel/pipeline.py``), so with a data-parallel x CP group > 1 the rank holds their shards V times.
    Raises ValueError naming the key when two copies differ in shape or dtype. Only the save needs this: a load
    fills every copy."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    def shard_id(sh):
        rng = sh.flattened_range
        return sh.key, tuple(sh.global_offset), None if rng is None else (rng.start, rng.stop)

    def is_main(sh):
        return all(r == 0 for r in (sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)))

    chosen: dict = {}

    def pick(x):
        if isinstance(x, dict):
            for v in x.values():
                pick(v)
        elif isinstance(x, list):
            for v in x:
                pick(v)
        elif isinstance(x, ShardedTensor):
            kept = chosen.setdefault(shard_id(x), x)
            if (kept.local_shape, kept.dtype) != (x.local_shape, x.dtype):
                raise ValueError(f"two local copies of checkpoint tensor {x.key!r} differ: shape "
                                 f"{tuple(kept.local_shape)} {kept.dtype} vs {tuple(x.local_shape)} {x.dtype}")
            if is_main(x) and not is_main(kept):
                chosen[shard_id(x)] = x

    def keep(x):
        return not isinstance(x, ShardedTensor) or chosen[shard_id(x)] is x

    def rebuild(x):
        if isinstance(x, dict):
            return {k: rebuild(v) for k, v in x.items() if keep(v)}
        if isinstance(x, list):
            return [rebuild(v) for v in x if keep(v)]
        return x

    pick(sharded_state_dict)
    return rebuild(sharded_state_dict)
