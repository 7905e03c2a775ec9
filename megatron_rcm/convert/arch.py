"""The architecture of a Wan2.1 DiT as a converter sees it: read from either layout's ``config.json`` or
from tensor shapes, matched against the presets, written back as either layout's ``config.json``, and
recorded as JSON beside a Megatron checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_rcm.convert.errors import ConversionError
from megatron_rcm.models.config_fields import FIELD_ALIASES
from megatron_rcm.models.wan import PRESETS, WanConfig, wan_config

ORIGINAL_IMAGE_DIM = 1280  # the original WanModel hard-codes the CLIP width of MLPProj
_BASE_PRESET = {"t2v": "wan2.1-t2v-1.3b", "i2v": "wan2.1-i2v-14b"}


@dataclass(frozen=True)
class WanArch:
    """Everything that decides a Wan2.1 DiT's tensors and numerics. Field names follow ``WanConfig``."""

    model_type: str
    """"t2v" or "i2v"."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    in_channels: int
    out_channels: int
    patch_size: tuple[int, int, int]
    text_dim: int
    freq_dim: int
    image_dim: int
    """CLIP feature width (I2V); recorded for T2V too, where it is unused."""
    norm_eps: float = 1e-6
    rope_max_seq_len: int = 1024
    text_len: int = 512

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.model_type not in ("t2v", "i2v"):
            raise ConversionError(f"unsupported Wan model_type {self.model_type!r} (supported: t2v, i2v)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"patch_size": list(self.patch_size)}

    @classmethod
    def from_json(cls, d: dict) -> WanArch:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConversionError(f"unknown architecture field(s) {unknown} in the recorded config")
        return cls(**d)

    def wan_config(self, **overrides) -> WanConfig:
        """A ``WanConfig`` with exactly this architecture (a preset's other defaults, plus overrides)."""
        fields = self.to_json() | {"patch_size": self.patch_size}
        return wan_config(_BASE_PRESET[self.model_type], **fields, **overrides)


def arch_of_config(cfg: WanConfig) -> WanArch:
    """The architecture fields of a ``WanConfig`` (``norm_eps`` is Megatron's ``layernorm_epsilon``)."""
    return WanArch(**{f.name: getattr(cfg, FIELD_ALIASES.get(f.name, f.name)) for f in dataclasses.fields(WanArch)})


def match_preset(arch: WanArch) -> str | None:
    """The preset whose architecture equals ``arch`` (every field), or None."""
    for name in PRESETS:
        cfg = wan_config(name, tensor_model_parallel_size=1)
        preset = dataclasses.asdict(arch_of_config(cfg))
        preset["patch_size"] = tuple(preset["patch_size"])
        if preset["model_type"] == "t2v":  # the CLIP width does not exist in a T2V model
            preset["image_dim"] = arch.image_dim
        if WanArch(**preset) == arch:
            return name
    return None


SHAPE_FIELDS = (
    "model_type",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "in_channels",
    "out_channels",
    "patch_size",
    "text_dim",
    "freq_dim",
)
"""The fields tensor shapes determine (and ``image_dim``, for I2V); the head count is not one of them."""


def shape_differences(found: WanArch, want: WanArch) -> list[tuple[str, object, object]]:
    """(field, found, want) for each shape-determining field where ``found`` and ``want`` differ."""
    fields = SHAPE_FIELDS + (("image_dim",) if "i2v" in (found.model_type, want.model_type) else ())
    return [(f, getattr(found, f), getattr(want, f)) for f in fields if getattr(found, f) != getattr(want, f)]


def presets_with_shapes(arch: WanArch) -> list[str]:
    """The presets whose tensors have exactly ``arch``'s shapes (whatever their head count)."""
    return [name for name in PRESETS if not shape_differences(arch, preset_arch(name))]


def preset_arch(name: str) -> WanArch:
    cfg = wan_config(name, tensor_model_parallel_size=1)
    return arch_of_config(cfg)


def from_training_config(path: str | None, sets=()) -> WanArch:
    """The architecture a training run built: ``model.preset`` + ``model.overrides`` of its config (the
    YAML file ``path`` with ``key=value`` overrides ``sets``, as given to ``megatron-rcm train``). Only the
    ``model`` section is read and checked: the run's data paths need not exist where the export runs."""
    import yaml

    from megatron_rcm.config.loader import merge_into, parse_override
    from megatron_rcm.config.schema import ModelConfig

    what = f"--config {path}" if path is not None else "the default training config"
    try:
        model = ModelConfig()
        if path is not None:
            try:
                data = yaml.safe_load(Path(path).read_text()) or {}
            except OSError as e:
                raise ConversionError(f"--config {path}: cannot read it ({e.strerror or e})") from None
            except yaml.YAMLError as e:
                raise ConversionError(f"--config {path}: not valid YAML ({e})") from None
            if not isinstance(data, dict) or not isinstance(data.get("model", {}), dict):
                raise ConversionError(f"--config {path}: no 'model' mapping at the top level")
            merge_into(model, data.get("model", {}), prefix="model.", origin=str(path))
        for item in sets:
            key, value = parse_override(item)
            if key == "model" or key.startswith("model."):
                nested: dict = value if key == "model" else {}
                if key != "model":
                    node = nested
                    *parents, leaf = key.split(".")[1:]
                    for part in parents:
                        node = node.setdefault(part, {})
                    node[leaf] = value
                merge_into(model, nested, prefix="model.", origin="--set")
        return _arch_of_model_config(model)
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"{what}{''.join(f' --set {s}' for s in sets)}: {e}") from None


def _arch_of_model_config(model) -> WanArch:
    model.validate()
    cfg = wan_config(model.preset, **(dict(model.overrides) | {"tensor_model_parallel_size": 1}))
    return arch_of_config(cfg)


def from_run_meta(ckpt_dir: Path) -> WanArch | None:
    """The architecture recorded by the trainer: the ``model`` section of the run's config, which it stores
    in each checkpoint's ``meta.json``; None for checkpoints written before it did."""
    import json

    from megatron_rcm.config.loader import merge_into
    from megatron_rcm.config.schema import ModelConfig

    meta = Path(ckpt_dir) / "meta.json"
    try:
        section = json.loads(meta.read_text()).get("config", {}).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(section, dict):
        return None
    try:
        model = ModelConfig()
        merge_into(model, section, prefix="model.", origin=str(meta))
        return _arch_of_model_config(model)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{meta}: the run's model config does not build a Wan model: {e}") from None


# ---------------------------------------------------------------------------------------------------
# diffusers WanTransformer3DModel config.json


def from_diffusers_config(cfg: dict) -> WanArch:
    """Defaults are ``WanTransformer3DModel.__init__``'s. Variants this model does not implement (no q/k
    norm, no cross-attention norm, FLF2V position embedding) are refused by name."""
    get = cfg.get
    if get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ConversionError(f"unsupported diffusers config: qk_norm={get('qk_norm')!r}")
    if not get("cross_attn_norm", True):
        raise ConversionError("unsupported diffusers config: cross_attn_norm=false")
    if get("pos_embed_seq_len") is not None:
        raise ConversionError(
            "unsupported diffusers config: pos_embed_seq_len (Wan FLF2V) is not implemented"
        )
    heads, head_dim = int(get("num_attention_heads", 40)), int(get("attention_head_dim", 128))
    image_dim = get("image_dim")
    hidden = heads * head_dim
    if image_dim is not None and get("added_kv_proj_dim") not in (None, hidden):
        raise ConversionError(
            f"unsupported diffusers config: added_kv_proj_dim={get('added_kv_proj_dim')} != inner dim {hidden}"
        )
    in_channels = int(get("in_channels", 16))
    return WanArch(
        model_type="i2v" if image_dim is not None else "t2v",
        num_layers=int(get("num_layers", 40)),
        hidden_size=hidden,
        ffn_hidden_size=int(get("ffn_dim", 13824)),
        num_attention_heads=heads,
        in_channels=in_channels,
        out_channels=int(get("out_channels") or in_channels),
        patch_size=tuple(get("patch_size", (1, 2, 2))),
        text_dim=int(get("text_dim", 4096)),
        freq_dim=int(get("freq_dim", 256)),
        image_dim=int(image_dim) if image_dim is not None else ORIGINAL_IMAGE_DIM,
        norm_eps=float(get("eps", 1e-6)),
        rope_max_seq_len=int(get("rope_max_seq_len", 1024)),
    )


def to_diffusers_config(arch: WanArch, diffusers_version: str = "0.35.0") -> dict:
    i2v = arch.model_type == "i2v"
    return {
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": diffusers_version,
        "added_kv_proj_dim": arch.hidden_size if i2v else None,
        "attention_head_dim": arch.head_dim,
        "cross_attn_norm": True,
        "eps": arch.norm_eps,
        "ffn_dim": arch.ffn_hidden_size,
        "freq_dim": arch.freq_dim,
        "image_dim": arch.image_dim if i2v else None,
        "in_channels": arch.in_channels,
        "num_attention_heads": arch.num_attention_heads,
        "num_layers": arch.num_layers,
        "out_channels": arch.out_channels,
        "patch_size": list(arch.patch_size),
        "pos_embed_seq_len": None,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": arch.rope_max_seq_len,
        "text_dim": arch.text_dim,
    }


# ---------------------------------------------------------------------------------------------------
# original WanModel config.json (the Wan2.1 release: dim, ffn_dim, in_dim, num_heads, ...)


def from_original_config(cfg: dict) -> WanArch:
    """Defaults are the original ``WanModel.__init__``'s."""
    get = cfg.get
    model_type = get("model_type", "t2v")
    if model_type not in ("t2v", "i2v"):
        raise ConversionError(f"unsupported original config: model_type={model_type!r} (supported: t2v, i2v)")
    if not get("qk_norm", True) or not get("cross_attn_norm", True):
        raise ConversionError("unsupported original config: qk_norm and cross_attn_norm must be true")
    if tuple(get("window_size", (-1, -1))) != (-1, -1):
        raise ConversionError(
            f"unsupported original config: window_size={get('window_size')} (local attention)"
        )
    return WanArch(
        model_type=model_type,
        num_layers=int(get("num_layers", 32)),
        hidden_size=int(get("dim", 2048)),
        ffn_hidden_size=int(get("ffn_dim", 8192)),
        num_attention_heads=int(get("num_heads", 16)),
        in_channels=int(get("in_dim", 16)),
        out_channels=int(get("out_dim", 16)),
        patch_size=tuple(get("patch_size", (1, 2, 2))),
        text_dim=int(get("text_dim", 4096)),
        freq_dim=int(get("freq_dim", 256)),
        image_dim=ORIGINAL_IMAGE_DIM,
        norm_eps=float(get("eps", 1e-6)),
        text_len=int(get("text_len", 512)),
    )


def to_original_config(arch: WanArch) -> dict:
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "cross_attn_norm": True,
        "dim": arch.hidden_size,
        "eps": arch.norm_eps,
        "ffn_dim": arch.ffn_hidden_size,
        "freq_dim": arch.freq_dim,
        "in_dim": arch.in_channels,
        "model_type": arch.model_type,
        "num_heads": arch.num_attention_heads,
        "num_layers": arch.num_layers,
        "out_dim": arch.out_channels,
        "patch_size": list(arch.patch_size),
        "qk_norm": True,
        "text_dim": arch.text_dim,
        "text_len": arch.text_len,
    }


def from_config_json(cfg: dict, layout: str) -> WanArch:
    cls = cfg.get("_class_name")
    expected = {"diffusers": "WanTransformer3DModel", "original": "WanModel"}[layout]
    if cls is not None and cls != expected:
        raise ConversionError(
            f"config.json names class {cls!r}, but the tensors are in the {layout} layout ({expected})"
        )
    return from_diffusers_config(cfg) if layout == "diffusers" else from_original_config(cfg)


# ---------------------------------------------------------------------------------------------------
# tensor shapes (our key names)


def from_shapes(
    shapes: dict[str, tuple],
    num_heads: int | None = None,
    patch_size: tuple[int, int, int] | None = None,
    heads_hint: str = "give it with --num-heads",
) -> WanArch:
    """Infer the architecture from tensor shapes under our key names. The patch size comes from a 5-D
    Conv3d patch weight, else ``patch_size`` (default (1, 2, 2)). The head count is in no shape:
    ``num_heads``, else the head count of the one preset with exactly these shapes, else an error ending
    with ``heads_hint``. The other fields no shape holds (``norm_eps``, ``rope_max_seq_len``,
    ``text_len``) take Wan2.1's values."""
    need = [
        "patch_embedding.weight",
        "text_embedding.linear_1.weight",
        "time_embedding.linear_1.weight",
        "head.linear.weight",
        "blocks.0.ffn.linear_fc1.weight",
    ]
    absent = [k for k in need if k not in shapes]
    if absent:
        raise ConversionError(f"cannot infer the architecture from shapes: no tensor for {absent}")
    pe = tuple(shapes["patch_embedding.weight"])
    hidden = pe[0]
    if len(pe) == 5:
        patch = tuple(pe[2:])
        in_channels = pe[1]
    else:
        patch = tuple(patch_size or (1, 2, 2))
        if pe[1] % math.prod(patch):
            raise ConversionError(f"patch_embedding.weight {pe} does not divide by patch {patch}")
        in_channels = pe[1] // math.prod(patch)
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    i2v = "img_emb.norm1.weight" in shapes
    arch = WanArch(
        model_type="i2v" if i2v else "t2v",
        num_layers=max(layers) + 1 if layers else 0,
        hidden_size=hidden,
        ffn_hidden_size=shapes["blocks.0.ffn.linear_fc1.weight"][0],
        num_attention_heads=num_heads or 1,
        in_channels=in_channels,
        out_channels=shapes["head.linear.weight"][0] // math.prod(patch),
        patch_size=patch,
        text_dim=shapes["text_embedding.linear_1.weight"][1],
        freq_dim=shapes["time_embedding.linear_1.weight"][1],
        image_dim=shapes["img_emb.norm1.weight"][0] if i2v else ORIGINAL_IMAGE_DIM,
    )
    if num_heads is not None:
        if num_heads < 1 or hidden % num_heads:
            raise ConversionError(f"--num-heads {num_heads} does not divide the hidden size {hidden}")
        return arch
    # The head count is in no shape. Guessing hidden / 128 silently gave a 4-head 128-wide model 1 head:
    # take it from the one preset with these exact shapes (every Wan2.1 release is one), else ask.
    matches = presets_with_shapes(arch)
    heads = {preset_arch(m).num_attention_heads for m in matches}
    if len(heads) == 1:  # one preset, or several of one shape (Wan2.1-T2V-14B and a Wan2.2-T2V-A14B expert)
        return dataclasses.replace(arch, num_attention_heads=heads.pop())
    a = arch
    raise ConversionError(
        f"the attention head count is stored in no tensor shape, and these shapes ({a.model_type}, "
        f"{a.num_layers} layers, hidden {a.hidden_size}, ffn {a.ffn_hidden_size}, in/out channels "
        f"{a.in_channels}/{a.out_channels}) match {'no preset' if not matches else 'several presets ' + str(matches)}"
        f": {heads_hint}"
    )
