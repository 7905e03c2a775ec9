"""Cosmos-Predict2 DiT configuration: a Megatron ``TransformerConfig`` plus the Cosmos fields, and presets.

Where each preset number comes from (diffusers ``scripts/convert_cosmos_to_diffusers.py``,
``TRANSFORMER_CONFIGS["Cosmos-2.0-Diffusion-{2B,14B}-{Text2Image,Video2World}"]``, the configs the
``nvidia/Cosmos-Predict2-*`` diffusers folders were written with):

    preset                   layers heads x 128  D     FFN (4 D)  in  rope_scale      fps
    cosmos-predict2-2b-t2i   28     16           2048  8192       16  (1, 4, 4)       none (image)
    cosmos-predict2-14b-t2i  36     40           5120  20480      16  (1, 4, 4)       none (image)
    cosmos-predict2-2b-v2w   28     16           2048  8192       17  (1, 3, 3)       16
    cosmos-predict2-14b-v2w  36     40           5120  20480      17  (20/24, 2, 2)   16

All four: text_dim 1024 (T5-11B encoder width), adaln_lora_dim 256, patch (1, 2, 2), max_size
(128, 240, 240), concat_padding_mask True, no learnable position embedding (``extra_pos_embed_type:
None``). Video2World's 17th input channel is the condition mask (1 on conditioning frames); the padding
mask channel is appended inside the model on top of ``in_channels``. ``rope_fps`` 16 is the default
``fps`` of diffusers' ``Cosmos2VideoToWorldPipeline`` (temporal RoPE positions are ``frame * 24 / fps``);
Text2Image passes no fps (positions are frame indices). The q/k RMSNorm epsilon is 1e-6 as in the
original Cosmos-Predict2 code; diffusers builds those norms with its ``Attention`` default 1e-5
(``qk_norm_eps`` lets a test match either).

The ``cosmos-tiny-*`` presets are debug sizes that exercise every code path (learnable position
embedding, anisotropic ``rope_scale``, the condition-mask channel) in seconds on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.core.transformer import TransformerConfig

from megatron_rcm.models.config_fields import check_recompute, config_from_preset
from megatron_rcm.ops.attention import check_attention_backend


@dataclass
class CosmosConfig(TransformerConfig):
    """Cosmos-Predict2 hyper-parameters. ``hidden_size`` = heads x head dim, ``ffn_hidden_size`` = 4 D."""

    model_type: str = "t2i"
    """"t2i" (Text2Image) or "v2w" (Video2World: the condition-mask channel is part of ``in_channels``)."""
    in_channels: int = 16
    """Channels of the network input x (latents, plus the condition mask for Video2World)."""
    out_channels: int = 16
    """Velocity channels out of the head."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(frames, rows, cols) patch."""
    text_dim: int = 1024
    """Width of the T5 text embeddings the cross-attention keys/values are projected from."""
    adaln_lora_dim: int = 256
    """Rank of the AdaLN-LoRA modulation (D -> lora -> 3 D per sub-layer)."""
    max_size: tuple[int, int, int] = (128, 240, 240)
    """Largest latent (frames, rows, cols); the learnable position tables have max_size / patch rows."""
    rope_scale: tuple[float, float, float] = (1.0, 4.0, 4.0)
    """Per-axis NTK RoPE scale: theta_axis = 10000 * scale^(d_axis / (d_axis - 2))."""
    rope_fps: float | None = None
    """Video fps for the temporal RoPE positions (frame * base_fps / fps); None: frame index (images)."""
    base_fps: float = 24.0
    """The fps the temporal RoPE positions are expressed in (Cosmos: 24)."""
    concat_padding_mask: bool = True
    """Append the padding-mask channel (zeros unless given) to the input before the patch embedding."""
    pos_embedding: str = "none"
    """"none" or "learnable" (per-axis absolute tables, summed and RMS-normalized, added in every block)."""
    qk_norm_eps: float = 1e-6
    """Epsilon of the per-head q/k RMSNorms (original Cosmos: 1e-6; diffusers: 1e-5)."""
    attention_backend_name: str = "auto"
    """Attention implementation (``megatron_rcm.ops.attention.attention_op``, picked at construction): "auto"
    (Triton JVP kernel on CUDA, PyTorch on CPU), "torch" (SDPA, PyTorch reference for the JVP), "triton"."""
    transformer_impl: str = "local"
    """Megatron's field, default "local" here; "transformer_engine" is implemented for Wan only (refused)."""
    extra: dict = field(default_factory=dict)
    """Free-form provenance (e.g. the source checkpoint a converted model came from)."""

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        check_attention_backend(self.attention_backend_name, f"{type(self).__name__}.attention_backend_name")
        check_recompute(self)
        if self.transformer_impl != "local":
            raise NotImplementedError(
                f"CosmosConfig.transformer_impl={self.transformer_impl!r}: Transformer Engine layers with a "
                "tangent path are built and tested for the Wan DiT only; use transformer_impl='local'"
            )
        self.max_size = tuple(int(m) for m in self.max_size)
        self.rope_scale = tuple(float(s) for s in self.rope_scale)
        if self.model_type not in ("t2i", "v2w"):
            raise ValueError(f"model_type must be 't2i' or 'v2w', got {self.model_type!r}")
        if self.pos_embedding not in ("none", "learnable"):
            raise ValueError(f"pos_embedding must be 'none' or 'learnable', got {self.pos_embedding!r}")
        if len(self.rope_scale) != 3 or len(self.max_size) != 3 or len(self.patch_size) != 3:
            raise ValueError(
                f"rope_scale {self.rope_scale}, max_size {self.max_size} and patch_size {self.patch_size} "
                "must each have 3 entries (frames, rows, cols)"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if min(self.rope_dims) < 4 or self.head_dim % 2:
            raise ValueError(
                f"head dim {self.head_dim} gives RoPE parts {self.rope_dims}; each must be >= 4 (the NTK "
                "scale divides by d_axis - 2) and the head dim even"
            )
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dim split over (frame, row, column): 128 -> (44, 42, 42) (Cosmos' dim_t, dim_h, dim_w)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)


def _predict2(layers: int, heads: int, **kw) -> dict:
    D = heads * 128
    return dict(num_layers=layers, num_attention_heads=heads, hidden_size=D, ffn_hidden_size=4 * D, **kw)


_PRESETS: dict[str, dict] = {
    "cosmos-predict2-2b-t2i": _predict2(28, 16, rope_scale=(1.0, 4.0, 4.0)),
    "cosmos-predict2-14b-t2i": _predict2(36, 40, rope_scale=(1.0, 4.0, 4.0)),
    "cosmos-predict2-2b-v2w": _predict2(
        28, 16, model_type="v2w", in_channels=17, rope_scale=(1.0, 3.0, 3.0), rope_fps=16.0
    ),
    "cosmos-predict2-14b-v2w": _predict2(
        36, 40, model_type="v2w", in_channels=17, rope_scale=(20 / 24, 2.0, 2.0), rope_fps=16.0
    ),
    "cosmos-tiny-t2i": dict(
        num_layers=2,
        hidden_size=128,
        ffn_hidden_size=512,
        num_attention_heads=4,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        adaln_lora_dim=16,
        max_size=(8, 16, 16),
        rope_scale=(1.0, 2.0, 3.0),
        pos_embedding="learnable",
    ),
    "cosmos-tiny-v2w": dict(
        num_layers=2,
        hidden_size=128,
        ffn_hidden_size=512,
        num_attention_heads=4,
        model_type="v2w",
        in_channels=5,
        out_channels=4,
        text_dim=32,
        adaln_lora_dim=16,
        max_size=(8, 16, 16),
        rope_scale=(0.8, 2.0, 2.0),
        rope_fps=16.0,
    ),
}

PRESETS = tuple(_PRESETS)


def cosmos_config(preset: str, **overrides) -> CosmosConfig:
    """Build a ``CosmosConfig`` from a preset name plus field overrides (parallel sizes as ``wan_config``:
    TP and CP from ``parallel_state`` unless given, ``cp_comm_type`` picks the context-parallel attention,
    sequence parallelism on whenever TP > 1)."""
    return config_from_preset(CosmosConfig, _PRESETS, preset, overrides, context_parallel=True,
                              add_bias_linear=False, layernorm_epsilon=1e-6)
