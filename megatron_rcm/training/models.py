"""Build the teacher, student and critic Wan DiTs from the config, and load / export their weights.

Weights come from a ``dist_checkpointing`` directory (``model.``-prefixed keys, as ``export_model``
writes them; loads into any TP layout) or a single full state-dict file (``.safetensors``/``.pt``) in this
package's, the original Wan, the diffusers or the rCM / TurboDiffusion student layout (``net.``/``net_ema.``
keys, the EMA read when both are there; mapped by ``megatron_rcm.convert.wan_keys``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from megatron_rcm.config.schema import ConfigError
from megatron_rcm.models.config_fields import recompute_fields
from megatron_rcm.models.te_support import fp8_mode_fields

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXPORT_PREFIX = "model."


def is_cosmos_preset(preset: str) -> bool:
    """The model family switch: preset names are unique across families (``cosmos-*`` vs ``wan*``)."""
    from megatron_rcm.models.cosmos import PRESETS

    return preset in PRESETS


def build_wan_config(model_cfg, data_cfg=None, recompute: bool | None = None, cp_comm_type: str | None = None,
                     hierarchical_cp_sizes=None, cp_a2a_head_groups: int = 1):
    """A ``WanConfig`` (or, for a ``cosmos-*`` preset, a ``CosmosConfig``) from ``model.preset`` +
    ``model.overrides`` + ``model.params_dtype`` + ``model.transformer_impl`` / ``model.fp8`` (+ the
    context-parallel attention ``parallel.cp_comm_type``, ``parallel.cp_a2a_head_groups``); checks that the data
    shapes fit the model (clear errors naming the keys)."""
    from megatron_rcm.models.cosmos import cosmos_config
    from megatron_rcm.models.wan import wan_config

    cosmos = is_cosmos_preset(model_cfg.preset)

    overrides = dict(model_cfg.overrides)
    if cp_comm_type is not None:
        overrides["cp_comm_type"] = cp_comm_type
    if hierarchical_cp_sizes:
        overrides["hierarchical_context_parallel_sizes"] = list(hierarchical_cp_sizes)
    if cp_a2a_head_groups != 1:
        if cosmos:
            raise ConfigError(f"parallel.cp_a2a_head_groups={cp_a2a_head_groups}: the overlapped Ulysses "
                              f"all-to-all is implemented for Wan only, not for model.preset={model_cfg.preset!r}; "
                              "set parallel.cp_a2a_head_groups=1")
        overrides["cp_a2a_head_groups"] = cp_a2a_head_groups
    overrides["params_dtype"] = DTYPES[model_cfg.params_dtype]
    overrides["bf16"] = model_cfg.params_dtype == "bf16"
    overrides["fp16"] = model_cfg.params_dtype == "fp16"
    overrides.update(recompute_fields(model_cfg.recompute if recompute is None else recompute,
                                      model_cfg.recompute_method, model_cfg.recompute_num_layers,
                                      model_cfg.recompute_granularity))
    if not cosmos:
        overrides.setdefault("fused_elementwise", model_cfg.fused_elementwise)
        overrides.setdefault("fused_qkv", model_cfg.fused_qkv)
    elif model_cfg.recompute_granularity == "selective":
        raise ConfigError(f"model.recompute_granularity='selective' is implemented for Wan only, not for "
                          f"model.preset={model_cfg.preset!r}; set model.recompute_granularity=full")
    elif model_cfg.fused_qkv:
        raise ConfigError(f"model.fused_qkv=true is implemented for Wan only, not for model.preset="
                          f"{model_cfg.preset!r}; set model.fused_qkv=false")
    overrides["transformer_impl"] = model_cfg.transformer_impl
    try:
        overrides.update(fp8_mode_fields(model_cfg.fp8))
        cfg = (cosmos_config if cosmos else wan_config)(model_cfg.preset, **overrides)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid 'model' section (preset {model_cfg.preset!r}): {err}") from err
    if data_cfg is not None:
        C = int(data_cfg.latent_shape[0])
        # Video2World: the condition-mask channel (rcm.condition_frames) is counted in in_channels
        C_in = cfg.in_channels - int(cosmos and cfg.model_type == "v2w")
        if cfg.model_type == "i2v":
            check_i2v_data(cfg, data_cfg, model_cfg.preset)
        elif data_cfg.source != "digits" and C != C_in:
            raise ConfigError(f"data.latent_shape has {C} channels but the model (model.preset="
                              f"{model_cfg.preset!r}) takes in_channels={cfg.in_channels}"
                              + (" (latents + the condition mask)" if C_in != cfg.in_channels else ""))
        if data_cfg.text_dim != cfg.text_dim:
            raise ConfigError(f"data.text_dim={data_cfg.text_dim} but the model takes text_dim={cfg.text_dim} "
                              f"(set model.overrides.text_dim or data.text_dim)")
    return cfg


def build_net(wan_cfg, seed: int, preset: str, timestep_scale: float = 1000.0, build=None):
    """``build_model`` for one network, or for a Wan2.2 A14B preset (``WAN22_BOUNDARY``) a ``TwoExpertNet`` of
    two such models (high-noise expert drawn from ``seed``, low-noise from ``seed + 1``) switched at the
    preset's boundary on the c_noise = ``timestep_scale`` * s_rf the networks are fed. ``build`` replaces
    ``build_model`` (the caller's own reference to it)."""
    from megatron_rcm.models.wan.config import WAN22_BOUNDARY
    from megatron_rcm.models.wan.experts import TwoExpertNet
    from megatron_rcm.parallel.pipeline import pp_world_size

    build = build or build_model
    ratio = WAN22_BOUNDARY.get(preset)
    if ratio is None:
        return build(wan_cfg, seed)
    if pp_world_size() > 1:
        raise NotImplementedError(f"model.preset={preset!r} is a two-expert model: its experts have no pipeline "
                                  "stages yet; set parallel.pipeline_parallel=1")
    return TwoExpertNet(build(wan_cfg, seed), build(wan_cfg, seed + 1), ratio, timestep_scale)


def load_expert_weights(model, path: str | Path, preset: str | None, what: str) -> None:
    """Both experts of a ``TwoExpertNet`` from a two-expert folder (``tools/convert.py import`` of a Wan2.2
    A14B pipeline: ``high_noise_model/`` and ``low_noise_model/``, each a checkpoint ``load_weights`` takes)."""
    from megatron_rcm.convert.experts import expert_folders

    folders = expert_folders(path)
    if folders is None:
        raise ConfigError(f"{what}={str(path)!r}: model.preset={preset!r} is a two-expert model; give a folder "
                          "holding both experts (high_noise_model/ and low_noise_model/, as tools/convert.py "
                          "import writes from a Wan2.2 A14B pipeline)")
    load_weights(model.high, folders["high"], preset, f"{what} (high-noise expert)")
    load_weights(model.low, folders["low"], preset, f"{what} (low-noise expert)")


def check_timestep_scale(model_cfg, distill_cfg) -> None:
    """``distill.timestep_scale`` is the teacher's T_scale (rcm_math.md sec. 1): Cosmos-Predict2 is fed
    s_rf itself (T_scale = 1). Wan presets are not checked (the released Wan2.1 uses 1000, the default;
    a teacher pre-trained here may use another scale)."""
    if not is_cosmos_preset(model_cfg.preset):
        return
    want = 1.0
    if float(distill_cfg.timestep_scale) != want:
        raise ConfigError(f"distill.timestep_scale={distill_cfg.timestep_scale} but model.preset="
                          f"{model_cfg.preset!r} is fed c_noise = {want:g} * s_rf; set distill.timestep_scale={want:g}")


def check_condition_frames(model_cfg, distill_cfg, data_cfg=None) -> None:
    """Video2World needs ``distill.condition_frames`` > 0 with ``distill.condition_mask_channel`` (its
    condition-mask input channel); other models take no mask channel; k must leave a frame to generate."""
    from megatron_rcm.models.cosmos import cosmos_config

    k, mask = int(distill_cfg.condition_frames), bool(distill_cfg.condition_mask_channel)
    v2w = is_cosmos_preset(model_cfg.preset) and cosmos_config(model_cfg.preset).model_type == "v2w"
    if v2w and (k == 0 or not mask):
        raise ConfigError(f"model.preset={model_cfg.preset!r} is Video2World: set distill.condition_frames (the "
                          f"given latent frames, e.g. 1) > 0 and distill.condition_mask_channel=true (got "
                          f"{k} and {mask})")
    if mask and not v2w:
        raise ConfigError(f"distill.condition_mask_channel=true but model.preset={model_cfg.preset!r} takes no "
                          "condition-mask channel (Cosmos Video2World does)")
    if data_cfg is not None and k and int(data_cfg.latent_shape[1]) <= k:
        raise ConfigError(f"distill.condition_frames={k} leaves no frame to generate: data.latent_shape "
                          f"{list(data_cfg.latent_shape)} has {data_cfg.latent_shape[1]} latent frames")


def check_i2v_data(cfg, data_cfg, preset: str) -> None:
    """An image-to-video model trains on shards whose every sample carries the first-frame condition
    (``.clip`` CLIP features and ``.y`` condition channels, ``megatron_rcm.data.format``): the latent has the
    model's ``out_channels``; the ``in_channels - out_channels`` others come from ``.y``."""
    if data_cfg.source != "shards":
        raise NotImplementedError(f"model.preset={preset!r} is image-to-video: it trains on shards with the "
                                  f"first-frame condition (megatron-rcm encode --i2v); data.source="
                                  f"{data_cfg.source!r} has none")
    C = int(data_cfg.latent_shape[0])
    if C != cfg.out_channels:
        raise ConfigError(f"data.latent_shape has {C} channels but the I2V model (model.preset={preset!r}) "
                          f"denoises out_channels={cfg.out_channels} (its in_channels={cfg.in_channels} add the "
                          f"{cfg.in_channels - cfg.out_channels} condition channels of the .y members)")
    from megatron_rcm.data.format import CLIP_EXTS, COND_EXTS, ShardError
    from megatron_rcm.data.index import load_index

    samples = load_index(data_cfg.path)
    missing = [s["key"] for _, s in samples
               if not (any(e in s["members"] for e in CLIP_EXTS) and any(e in s["members"] for e in COND_EXTS))]
    if missing:
        raise ShardError(f"model.preset={preset!r} is image-to-video, but {len(missing)} of {len(samples)} samples "
                         f"in data directory {data_cfg.path} (e.g. '{missing[0]}') have no first-frame condition "
                         f"(.clip and .y members); write the shards with `megatron-rcm encode --i2v`")


def build_model(wan_cfg, seed: int):
    """A WanModel (CosmosModel for a ``CosmosConfig``) with weights drawn from ``seed`` (identical on every
    rank, whatever the TP size); under pipeline parallelism this rank's stage of it, and with a virtual pipeline
    size V > 1 (the interleaved schedule) this rank's V model chunks as one ``ModelChunks``."""
    from megatron_rcm.models.cosmos import CosmosConfig, CosmosModel
    from megatron_rcm.models.wan import WanModel
    from megatron_rcm.parallel.pipeline import (
        ModelChunks,
        pipeline_stage,
        pp_world_size,
        stage_state_dict,
        vp_world_size,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (CosmosModel if isinstance(wan_cfg, CosmosConfig) else WanModel)(wan_cfg)
    if pp_world_size() > 1:
        # this pipeline stage (or its chunks), with the whole model's draws (the same weights as at PP=1; the
        # whole model is built once on the CPU: random weights are for tests and throughput runs)
        full_sd, vp = model.state_dict(), vp_world_size()
        chunks = []
        for c in range(vp):
            stage = pipeline_stage(wan_cfg.num_layers, vp=vp, chunk=c)
            chunk = WanModel(wan_cfg, **stage.model_kwargs)
            chunk.load_state_dict(stage_state_dict(full_sd, stage), strict=True)
            chunks.append(chunk)
        model = chunks[0] if vp == 1 else ModelChunks(chunks)
    return model


def strip_prefix(d: dict, prefix: str) -> dict:
    """The entries of ``d`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def _describe(shapes: dict[str, tuple]) -> str:
    """Layer count and widths read off a Wan state dict's shapes (heads leave no trace in the shapes)."""
    layers = {k.split(".")[1] for k in shapes if k.startswith("blocks.")}
    get = lambda key, dim: shapes[key][dim] if key in shapes and len(shapes[key]) > dim else "?"
    return (f"{len(layers)} layers, hidden {get('patch_embedding.weight', 0)}, FFN "
            f"{get('blocks.0.ffn.linear_fc1.weight', 0)}, patch inputs {get('patch_embedding.weight', 1)}, "
            f"outputs {get('head.linear.weight', 0)}, text_dim {get('text_embedding.linear_1.weight', 1)}")


def check_architecture(model, found: dict[str, tuple], path, preset: str | None = None,
                       what: str = "model.teacher_checkpoint") -> None:
    """ConfigError naming the preset, both architectures and the first mismatching tensors when the
    (global, unsharded) shapes ``found`` in a checkpoint do not fit ``model``, before any tensor is read."""
    from megatron_rcm.models.fused_qkv import checkpoint_tensors

    # checkpoint keys (ShardedTensor.key: global layer numbers on a pipeline stage), not state-dict keys; a fused
    # QKV linear's tensors under their unfused q/k/v keys
    expected = {v.key[len(EXPORT_PREFIX):]: tuple(v.global_shape)
                for v in checkpoint_tensors(model.sharded_state_dict(prefix=EXPORT_PREFIX))}
    found = {k: tuple(v) for k, v in found.items()}
    stage = getattr(model, "stage", None)
    if stage is not None:  # a pipeline stage: the checkpoint's other stages' tensors are not expected here
        from megatron_rcm.parallel.pipeline import key_on_stage

        found = {k: v for k, v in found.items() if key_on_stage(k, stage)}
    wrong = [f"{k} {found[k]} (expected {expected[k]})" for k in expected if k in found and found[k] != expected[k]]
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if not (wrong or missing or unexpected):
        return
    lines = [f"{what}={str(path)!r} does not fit model.preset={preset!r} (with model.overrides):",
             f"  checkpoint: {_describe(found)}", f"  model:      {_describe(expected)}"]
    for name, items in (("mismatching shapes", wrong), ("missing", missing), ("unexpected", unexpected)):
        if items:
            more = f" ... ({len(items) - 3} more)" if len(items) > 3 else ""
            lines.append(f"  {len(items)} {name}: {', '.join(items[:3])}{more}")
    lines.append("  choose the preset the checkpoint was trained with, or convert it with tools/convert.py")
    raise ConfigError("\n".join(lines))


def load_weights(model, path: str | Path, preset: str | None = None, what: str = "model.teacher_checkpoint") -> None:
    """Load weights into ``model`` (see module docstring for the accepted formats); a checkpoint of another
    architecture is a ``ConfigError`` naming ``what`` (the config key), ``preset`` and the shapes
    (``check_architecture``). A ``TwoExpertNet`` loads from a two-expert folder (``load_expert_weights``)."""
    from megatron_rcm.models.wan.experts import TwoExpertNet
    from megatron_rcm.parallel.pipeline import ModelChunks

    if isinstance(model, TwoExpertNet):
        load_expert_weights(model, path, preset, what)
        return
    if isinstance(model, ModelChunks):  # the interleaved schedule's chunks: each loads its blocks and ends
        for chunk in model:
            load_weights(chunk, path, preset, what)
        return
    path = Path(path)
    if path.is_dir():
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        if not (path / "metadata.json").is_file():
            raise FileNotFoundError(f"{what}={str(path)!r}: not a dist_checkpointing directory "
                                    f"(no metadata.json)")
        meta = dist_checkpointing.load_tensors_metadata(str(path))
        found = {k[len(EXPORT_PREFIX):]: v.global_shape for k, v in meta.items()
                 if k.startswith(EXPORT_PREFIX) and isinstance(v, ShardedTensor)}
        check_architecture(model, found, path, preset, what)
        loaded = dist_checkpointing.load(model.sharded_state_dict(prefix=EXPORT_PREFIX), str(path))
        model.load_state_dict(strip_prefix(loaded, EXPORT_PREFIX), strict=True)
        return
    if not path.is_file():
        raise FileNotFoundError(f"{what}={str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        full = load_file(str(path))
    else:
        full = torch.load(path, map_location="cpu", weights_only=True)
    from megatron_rcm.convert.wan_keys import to_ours
    from megatron_rcm.models.wan.impl_keys import adapt_state_dict, to_local_name
    from megatron_rcm.parallel.sharding import load_full_state_dict

    names = {to_local_name(n) for n, _ in model.named_parameters()}  # canonical names under either impl
    found = set(full)
    stage = getattr(model, "stage", None)
    if stage is not None:  # a pipeline stage: its tensors under their global names (ours if they fit)
        from megatron_rcm.parallel.pipeline import global_state_dict, key_on_stage

        names = set(global_state_dict(dict.fromkeys(names), stage))
        found = {k for k in found if key_on_stage(k, stage)}
    from megatron_rcm.models.cosmos import CosmosModel

    if isinstance(model, CosmosModel) and not found <= names:
        from megatron_rcm.convert.cosmos_keys import detect_layout_of_keys
        from megatron_rcm.convert.cosmos_keys import to_ours as cosmos_to_ours

        full = cosmos_to_ours(full, detect_layout_of_keys(list(full)))
    elif not found <= names:
        from megatron_rcm.convert.errors import ConversionError
        from megatron_rcm.convert.sources import detect_layout
        from megatron_rcm.convert.wan_keys import RCM_PREFIXES, rcm_prefix

        if isinstance(full.get("state_dict"), dict):  # an rCM trainer checkpoint wraps its networks
            full = full["state_dict"]
        try:
            layout = detect_layout(list(full))  # the converter's detection: diffusers, original or rcm
            if layout == "rcm":  # an rCM / TurboDiffusion student: read the EMA when both copies are there
                prefix = rcm_prefix(full)
                full = {k: v for k, v in full.items() if k.startswith(prefix) or not k.startswith(RCM_PREFIXES)}
            full = to_ours(full, layout)
        except (ConversionError, KeyError) as e:
            raise ConfigError(f"{what}={str(path)!r}: {e.args[0]}; convert it with tools/convert.py to see "
                              "every unknown key") from None
    check_architecture(model, {k: v.shape for k, v in full.items()}, path, preset, what)
    if stage is not None:  # a pipeline stage: its blocks, local numbering
        from megatron_rcm.parallel.pipeline import stage_state_dict

        full = stage_state_dict(full, stage)
    full = adapt_state_dict(full, [n for n, _ in model.named_parameters()])
    load_full_state_dict(model, full, strict=True)


def export_model(model, path: str | Path) -> Path:
    """Write ``model``'s weights as a dist_checkpointing directory (atomically: temp dir, then rename).
    ``model`` may be the list of this rank's model chunks (interleaved pipeline). Collective: every rank calls
    it."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_rcm.atomic import fsync_tree
    from megatron_rcm.parallel.mcore_compat import patch_psutil

    patch_psutil()
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    if isinstance(model, (list, tuple)):
        from megatron_rcm.parallel.pipeline import chunks_sharded_state_dict

        sharded_sd = chunks_sharded_state_dict(model, EXPORT_PREFIX)
    else:
        sharded_sd = model.sharded_state_dict(prefix=EXPORT_PREFIX)
    dist_checkpointing.save(sharded_sd, str(tmp))
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
