"""Model-config fields that Megatron's ``TransformerConfig`` already has, shared by Wan and Cosmos.

* Norm epsilon: ``layernorm_epsilon`` (every LayerNorm / RMSNorm of the model that has no epsilon of its
  own). The name ``norm_eps`` (the converters' architecture records, ``model.overrides``) maps onto it.
* Activation recompute, Megatron's ``recompute_granularity="full"`` with
  - ``recompute_method="uniform"``, ``recompute_num_layers=1``: every transformer block is re-run in the
    backward (primal and, in the JVP pass, its tangent), one block at a time;
  - ``recompute_method="block"``, ``recompute_num_layers=N``: the first N blocks of each pipeline stage are
    re-run, the rest keep their activations (Megatron's block method; N at least the stage's block count
    recomputes all of them, like uniform).
* Selective recompute (Wan only), ``recompute_granularity="selective"`` with the same methods and layer
  counts choosing the blocks: each chosen block re-runs the parts before and after its self-attention core
  (norms, modulation, linears, q/k RMSNorm, RoPE, cross-attention, FFN) in the backward, and keeps the core's
  inputs and outputs (q, k, v, o, lse), so the attention kernel runs once (``WanBlock``). This inverts
  Megatron's default selective set (``recompute_modules=["core_attn"]``: re-run the attention, keep the
  rest), which pays off for unfused attention that materializes softmax(QK^T); with a flash-style kernel the
  attention is the block's most expensive op and its saved tensors are small. Megatron's own check takes no
  layer count with selective; ``megatron_check_view`` hides ours from it.
  The models implement these settings only, and refuse others (uniform with N > 1; Cosmos: ``selective``).
"""

from __future__ import annotations

import contextlib

__all__ = ["FIELD_ALIASES", "RECOMPUTE_GRANULARITIES", "RECOMPUTE_METHODS", "check_recompute", "map_field_aliases",
           "megatron_check_view", "recomputed_block", "recomputed_fraction", "recompute_fields",
           "selective_block"]

RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_GRANULARITIES = ("full", "selective")

FIELD_ALIASES = {"norm_eps": "layernorm_epsilon"}
"""Override names users write -> the ``TransformerConfig`` field they set."""

_REMOVED = {
    "use_te": "use transformer_impl='transformer_engine' (Megatron's field; model.transformer_impl in a training "
    "config), with model.fp8 for FP8",
    "recompute_blocks": "use recompute_granularity='full' (with recompute_method='uniform', "
    "recompute_num_layers=1), or model.recompute in a training config",
}


def recompute_fields(on: bool, method: str = "uniform", num_layers: int | None = None,
                     granularity: str = "full") -> dict:
    """The ``TransformerConfig`` recompute fields: off, every block (``uniform``), or the first
    ``num_layers`` blocks of each pipeline stage (``block``), each block whole (``full``) or all but its
    self-attention core (``selective``)."""
    if not on:
        return dict(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    if method == "uniform":
        return dict(recompute_granularity=granularity, recompute_method="uniform", recompute_num_layers=1)
    return dict(recompute_granularity=granularity, recompute_method=method, recompute_num_layers=num_layers)


def map_field_aliases(overrides: dict, config_name: str) -> dict:
    """``overrides`` with alias names mapped to Megatron's fields; a clear error for removed names or an
    alias given together with its field."""
    out = dict(overrides)
    for old, hint in _REMOVED.items():
        if old in out:
            raise ValueError(f"{config_name}: field {old!r} was removed; {hint}")
    for alias, name in FIELD_ALIASES.items():
        if alias in out:
            if name in out:
                raise ValueError(f"{config_name}: give {alias!r} or {name!r}, not both (the same field)")
            out[name] = out.pop(alias)
    return out


def check_recompute(cfg, selective: bool = False) -> None:
    """Refuse recompute settings the models do not implement (they recompute blocks, one at a time: all of
    them, or the first N of each stage; whole, or with ``selective`` (a model that implements it) all but the
    self-attention core)."""
    name = type(cfg).__name__
    got = (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers)
    if cfg.recompute_granularity is None:
        if got[1:] != (None, None):
            raise ValueError(f"{name}: recompute_method={got[1]!r}, recompute_num_layers={got[2]!r} given with "
                             "recompute_granularity=None (no recompute); set recompute_granularity='full'")
        return
    if got[0] == "selective" and not selective:
        raise NotImplementedError(
            f"{name}: recompute_granularity='selective' (recompute all but the self-attention core) is "
            "implemented for Wan only; use recompute_granularity='full'"
        )
    supported = ("('full', 'uniform', 1) for every block, ('full', 'block', N) with 1 <= N <= num_layers "
                 f"(={cfg.num_layers}) for the first N blocks of each pipeline stage"
                 + (" (either with 'selective' for 'full')" if selective else "")
                 + ", or recompute_granularity=None for none")
    if (got[0] not in RECOMPUTE_GRANULARITIES or got[1] not in RECOMPUTE_METHODS
            or (got[1] == "uniform" and got[2] != 1)):
        raise NotImplementedError(
            f"{name}: recompute_granularity={got[0]!r}, recompute_method={got[1]!r}, "
            f"recompute_num_layers={got[2]!r} is not implemented; recompute is {supported}"
        )
    n = got[2]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cfg.num_layers:
        raise ValueError(f"{name}: recompute_method='block' needs recompute_num_layers in 1..num_layers "
                         f"(={cfg.num_layers}), got {n!r}; recompute is {supported}")


def recomputed_block(cfg, local_index: int) -> bool:
    """Whether the block at ``local_index`` of this stage's blocks is re-run in the backward (whole or, with
    ``selective``, all but its self-attention core): all of them under ``uniform``, the first
    ``recompute_num_layers`` under ``block`` (Megatron's methods)."""
    if cfg.recompute_granularity not in RECOMPUTE_GRANULARITIES:
        return False
    return cfg.recompute_method == "uniform" or local_index < cfg.recompute_num_layers


def selective_block(cfg, local_index: int) -> bool:
    """Whether the block at ``local_index`` recomputes all but its self-attention core (selective)."""
    return cfg.recompute_granularity == "selective" and recomputed_block(cfg, local_index)


@contextlib.contextmanager
def megatron_check_view(cfg):
    """``cfg`` as Megatron's ``TransformerConfig.__post_init__`` expects it: selective without a layer count
    (Megatron's selective re-runs listed submodules of every layer; ours picks blocks like ``full`` and keeps
    the count) and with no ``recompute_modules`` (the models read none; Megatron's default ``["core_attn"]`` is
    the part ours keeps, and warns), both restored after."""
    if cfg.recompute_granularity != "selective":
        yield
        return
    n, modules = cfg.recompute_num_layers, cfg.recompute_modules
    cfg.recompute_num_layers, cfg.recompute_modules = None, []
    try:
        yield
    finally:
        cfg.recompute_num_layers, cfg.recompute_modules = n, modules


def recomputed_fraction(cfg, layers_per_stage: int) -> float:
    """Share of a stage's ``layers_per_stage`` blocks that are re-run in the backward (0 .. 1)."""
    if layers_per_stage <= 0:
        raise ValueError(f"layers_per_stage must be positive, got {layers_per_stage}")
    return sum(recomputed_block(cfg, i) for i in range(layers_per_stage)) / layers_per_stage


def _parallel_size(overrides: dict, field: str, getter: str) -> int:
    """``field`` from the overrides, else from Megatron's parallel state (1 before it is initialized)."""
    value = overrides.pop(field, None)
    if value is not None:
        return value
    from megatron.core import parallel_state

    return getattr(parallel_state, getter)() if parallel_state.model_parallel_is_initialized() else 1


def config_from_preset(cls, presets: dict, preset: str, overrides: dict, context_parallel: bool = False, **fixed):
    """``cls(**presets[preset], **fixed, **overrides)`` for a DiT config: aliases mapped, TP (and CP where
    ``context_parallel``: the model implements it) from the overrides or the parallel state, sequence parallelism on whenever TP > 1, fp32
    params and CPU initialization unless overridden, unknown fields refused by name."""
    import dataclasses

    import torch

    name = cls.__name__
    overrides = map_field_aliases(overrides, name)
    if preset not in presets:
        raise ValueError(f"unknown {name.removesuffix('Config')} preset {preset!r}; known presets: "
                         f"{', '.join(presets)}")
    kwargs = dict(presets[preset])
    tp = _parallel_size(overrides, "tensor_model_parallel_size", "get_tensor_model_parallel_world_size")
    kwargs.update(tensor_model_parallel_size=tp, sequence_parallel=tp > 1, use_cpu_initialization=True,
                  params_dtype=torch.float32, **fixed)
    if context_parallel:
        kwargs["context_parallel_size"] = _parallel_size(overrides, "context_parallel_size",
                                                         "get_context_parallel_world_size")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {name} field(s) {unknown} for preset {preset!r}")
    kwargs.update(overrides)
    return cls(**kwargs)
