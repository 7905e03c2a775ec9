"""Build the teacher, student and critic Wan DiTs from the config, and load / export their weights.

Weights come from a ``dist_checkpointing`` directory (``model.``-prefixed keys, as ``export_model``
writes them; loads into any TP layout) or a single full state-dict file (``.safetensors``/``.pt``) in this
package's, the original Wan or the diffusers layout (mapped by ``megatron_rcm.convert.wan_keys``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from megatron_rcm.config.schema import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXPORT_PREFIX = "model."


def build_wan_config(model_cfg, data_cfg=None, recompute: bool | None = None, cp_comm_type: str | None = None):
    """A ``WanConfig`` from ``model.preset`` + ``model.overrides`` + ``model.params_dtype`` (+ the
    context-parallel attention ``parallel.cp_comm_type``); checks that the data shapes fit the model (clear
    errors naming the keys)."""
    from megatron_rcm.models.wan import wan_config

    overrides = dict(model_cfg.overrides)
    if cp_comm_type is not None:
        overrides["cp_comm_type"] = cp_comm_type
    overrides["params_dtype"] = DTYPES[model_cfg.params_dtype]
    overrides["bf16"] = model_cfg.params_dtype == "bf16"
    overrides["fp16"] = model_cfg.params_dtype == "fp16"
    overrides["recompute_blocks"] = model_cfg.recompute if recompute is None else recompute
    try:
        cfg = wan_config(model_cfg.preset, **overrides)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid 'model' section (preset {model_cfg.preset!r}): {err}") from err
    if data_cfg is not None:
        if cfg.model_type != "t2v":
            raise NotImplementedError("the trainer feeds text-to-video batches; I2V data (CLIP features, "
                                      "condition latents) is not wired into the data sources yet")
        C = int(data_cfg.latent_shape[0])
        if data_cfg.source != "digits" and C != cfg.in_channels:
            raise ConfigError(f"data.latent_shape has {C} channels but the model (model.preset="
                              f"{model_cfg.preset!r}) takes in_channels={cfg.in_channels}")
        if data_cfg.text_dim != cfg.text_dim:
            raise ConfigError(f"data.text_dim={data_cfg.text_dim} but the model takes text_dim={cfg.text_dim} "
                              f"(set model.overrides.text_dim or data.text_dim)")
    return cfg


def build_model(wan_cfg, seed: int):
    """A WanModel with weights drawn from ``seed`` (identical on every rank, whatever the TP size)."""
    from megatron_rcm.models.wan import WanModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanModel(wan_cfg)
    return model


def _strip(d: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def load_weights(model, path: str | Path) -> None:
    """Load teacher weights into ``model`` (see module docstring for the accepted formats)."""
    path = Path(path)
    if path.is_dir():
        from megatron.core import dist_checkpointing

        if not (path / "metadata.json").is_file():
            raise FileNotFoundError(f"model.teacher_checkpoint={str(path)!r}: not a dist_checkpointing directory "
                                    f"(no metadata.json)")
        loaded = dist_checkpointing.load(model.sharded_state_dict(prefix=EXPORT_PREFIX), str(path))
        model.load_state_dict(_strip(loaded, EXPORT_PREFIX), strict=True)
        return
    if not path.is_file():
        raise FileNotFoundError(f"model.teacher_checkpoint={str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        full = load_file(str(path))
    else:
        full = torch.load(path, map_location="cpu", weights_only=True)
    from megatron_rcm.convert.wan_keys import to_ours
    from megatron_rcm.parallel.sharding import load_full_state_dict

    names = {n for n, _ in model.named_parameters()}
    if not set(full) <= names:
        layout = "diffusers" if any(k.startswith("condition_embedder") for k in full) else "original"
        full = to_ours(full, layout)
    load_full_state_dict(model, full, strict=True)


def export_model(model, path: str | Path) -> Path:
    """Write ``model``'s weights as a dist_checkpointing directory (atomically: temp dir, then rename).
    Collective: every rank calls it."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_rcm.training.checkpoint import _patch_megatron_psutil, fsync_tree

    _patch_megatron_psutil()
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(prefix=EXPORT_PREFIX), str(tmp))
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    return path
