"""Load a student or teacher Wan DiT for sampling, from whatever the rest of the package writes or reads.

* a Megatron ``dist_checkpointing`` checkpoint (``megatron_rcm.convert.dist_ckpt.resolve_checkpoint``): a
  training run's checkpoint root, its ``latest`` file or one ``step_*`` folder (student ``student.``, EMA
  ``ema.student.``: the EMA by default when there is one), a converter import or a trainer teacher export
  (``model.``). The architecture comes from ``wan_config.json``, the run's ``meta.json``, ``--config``/``--set``
  or the shapes (``megatron_rcm.convert.exporter.checkpoint_arch``).
* Wan2.2 A14B, both experts switched at the boundary (``TwoExpertNet``): a converted two-expert folder
  (``experts.json``), a source folder with both experts (``transformer/`` + ``transformer_2/`` or
  ``high_noise_model/`` + ``low_noise_model/``), or a training checkpoint of a two-expert run (``<prefix>high.``
  and ``<prefix>low.`` keys; the boundary from the run's ``model.preset``).
* weights in the diffusers or original layout (``megatron_rcm.convert.importer.plan_import``): a
  ``tools/convert.py export`` folder, a diffusers pipeline root (its ``transformer/``), a weight file.

One process (``ensure_single_process_parallel``, TP = 1), or the ranks of a torchrun job whose parallel state
the command initialized: each rank its own full copy for ``encode``/``synthesize`` slices (TP = 1), or one
tensor-parallel model over all ranks for ``sample`` (TP = world size: the full weights are read on every
rank and each keeps its shard, ``load_full_state_dict``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_rcm.convert.errors import ConversionError


def _is_dist_ckpt_path(path: Path) -> bool:
    from megatron_rcm.convert.dist_ckpt import is_dist_checkpoint

    if path.is_dir():
        return is_dist_checkpoint(path) or (path / "latest").is_file()
    return path.name == "latest"


def _ensure_parallel_state() -> int:
    """Initialize the parallel state if nobody did; return the TP size the model is built with."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_rcm.convert.importer import ensure_single_process_parallel

    if not dist.is_initialized():
        ensure_single_process_parallel()
    elif not parallel_state.model_parallel_is_initialized():
        from megatron_rcm.parallel.state import initialize_parallel

        initialize_parallel(tensor_parallel=1)
    return parallel_state.get_tensor_model_parallel_world_size()


def load_dit(path: str | Path, *, ema: bool | None = None, prefix: str | None = None,
             train_config: str | None = None, train_set=(), num_heads: int | None = None,
             device=None, dtype: torch.dtype = torch.float32):
    """(WanModel, or ``TwoExpertNet`` of two, in eval mode without gradients, a one-line description of what
    was loaded)."""
    from megatron_rcm.convert.experts import boundary_ratio_of, expert_folders, find_source_experts
    from megatron_rcm.models.wan import WanModel
    from megatron_rcm.parallel.sharding import load_full_state_dict

    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory (expected a checkpoint, an export or a weight file)")
    kw = dict(ema=ema, train_config=train_config, train_set=train_set, num_heads=num_heads, device=device,
              dtype=dtype)
    folders = expert_folders(path) or find_source_experts(path)
    if folders is not None:
        (high, what_h), (low, what_l) = (load_dit(folders[w], **kw) for w in ("high", "low"))
        ratio = boundary_ratio_of(path, high.config, None)
        return _switched(high, low, ratio), f"two experts (boundary ratio {ratio}): high {what_h}; low {what_l}"
    tp = _ensure_parallel_state()
    if _is_dist_ckpt_path(path):
        from megatron_rcm.convert.dist_ckpt import load_full_tensors, resolve_checkpoint, tensor_metadata
        from megatron_rcm.convert.exporter import checkpoint_arch, model_prefixes, select_prefix

        ckpt = resolve_checkpoint(path)
        stored = tensor_metadata(ckpt)
        if prefix is None and ema is None:
            ema = any("ema" in p.lower() and not p.startswith("optimizer") for p in model_prefixes(stored))
        pairs = _expert_pair_prefixes(model_prefixes(stored))
        if pairs and (prefix is None or prefix in pairs):  # a two-expert run: both experts of one network
            base = prefix or select_prefix([b + "patch_embedding.weight" for b in pairs], bool(ema), None)
            kw.pop("ema")
            (high, what_h), (low, what_l) = (load_dit(ckpt, prefix=f"{base}{w}.", **kw) for w in ("high", "low"))
            ratio = _run_boundary_ratio(ckpt)
            return _switched(high, low, ratio), f"two experts (boundary ratio {ratio}): high {what_h}; low {what_l}"
        pfx = select_prefix(stored, bool(ema), prefix)
        shapes = {k[len(pfx):]: shape for k, (shape, _) in stored.items() if k.startswith(pfx)}
        use_config = train_config is not None or bool(train_set)
        arch, arch_from = checkpoint_arch(ckpt, shapes, num_heads,
                                          (train_config, tuple(train_set)) if use_config else None)
        model = WanModel(arch.wan_config(tensor_model_parallel_size=tp))
        names = [n for n, _ in model.named_parameters()]
        missing = [pfx + n for n in names if n not in shapes]
        if missing:
            raise ConversionError(f"{ckpt} (prefix {pfx!r}): {len(missing)} tensors missing, e.g. {missing[:3]}")
        full = load_full_tensors(ckpt, {pfx + n: (shapes[n], stored[pfx + n][1]) for n in names})
        load_full_state_dict(model, {n: full[pfx + n] for n in names}, strict=True)
        what = f"{ckpt} (prefix {pfx!r}, architecture from {arch_from})"
    else:
        from megatron_rcm.convert.importer import plan_import
        from megatron_rcm.convert.wan_keys import patch_weight_to_ours

        plan = plan_import(path, num_heads=num_heads)
        try:
            model = WanModel(plan.arch.wan_config(tensor_model_parallel_size=tp))
            full = {ours: patch_weight_to_ours(plan.source.read(key), ours) for key, ours in plan.ours_of.items()}
        finally:
            plan.source.close()
        load_full_state_dict(model, full, strict=True)
        what = f"{path} ({plan.layout} layout, architecture from {plan.arch_from})"
    model = model.to(device=device or "cpu", dtype=dtype).eval().requires_grad_(False)
    return model, what


def _switched(high, low, ratio: float):
    from megatron_rcm.models.wan.experts import TwoExpertNet
    from megatron_rcm.rcm.trigflow import WAN_TIMESTEP_SCALE

    return TwoExpertNet(high, low, ratio, WAN_TIMESTEP_SCALE).eval().requires_grad_(False)


def _expert_pair_prefixes(prefixes) -> list[str]:
    """Bases B with both B + "high." and B + "low." holding a model (a two-expert training run's networks)."""
    found = set(prefixes)
    return sorted(p[: -len("high.")] for p in found if p.endswith("high.") and p[: -len("high.")] + "low." in found)


def _run_boundary_ratio(ckpt: Path) -> float:
    """The boundary of the two-expert preset the run was trained with (its ``meta.json`` config)."""
    import json

    from megatron_rcm.models.wan.config import WAN22_BOUNDARY

    try:
        preset = json.loads((Path(ckpt) / "meta.json").read_text())["config"]["model"]["preset"]
    except (OSError, ValueError, KeyError, TypeError):
        preset = None
    if preset not in WAN22_BOUNDARY:
        raise ConversionError(f"{ckpt}: two-expert networks, but the run's model.preset ({preset}) in meta.json is "
                              f"none of {sorted(WAN22_BOUNDARY)}: the boundary between the experts is unknown")
    return WAN22_BOUNDARY[preset]
