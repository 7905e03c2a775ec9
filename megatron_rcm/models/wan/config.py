"""Wan2.1 / Wan2.2 DiT configuration: a Megatron ``TransformerConfig`` plus the Wan-specific fields, and presets.

Presets follow the released Wan2.1 configs (``config.json`` of Wan-AI/Wan2.1-*-Diffusers); the ``tiny``
presets are debug sizes that exercise every code path (RoPE split, I2V image branch) in seconds on CPU.

Wan2.2 (values from diffusers' ``scripts/convert_wan_to_diffusers.py``, ``get_transformer_config``, and the
Wan team's ``wan/configs/wan_{ti2v_5B,t2v_A14B,i2v_A14B}.py``):

* ``wan2.2-ti2v-5b``: the Wan2.1 DiT at 30 layers, 3072 wide (24 heads of 128), FFN 14336, on the
  48-channel latents of the Wan2.2 VAE (stride (4, 16, 16), against Wan2.1's (4, 8, 8)); patch (1, 2, 2).
  diffusers' ``WanTransformer3DModel`` runs it with the Wan2.1 math for a timestep per sample; its TI2V
  pipeline (``expand_timesteps``) passes a timestep per token instead (image-conditioned first-frame
  tokens at t = 0), which ``WanModel`` takes as ``timestep`` [B, S] (per-token modulation).
* ``wan2.2-t2v-a14b`` / ``wan2.2-i2v-a14b``: two experts of the Wan2.1-14B shape each, the high-noise one
  used for timesteps t >= boundary * 1000, the low-noise one below (``WAN22_BOUNDARY``; the switch and its
  TrigFlow form: ``megatron_rcm.models.wan.experts``). The I2V experts
  take 36 input channels (16 noisy + 4 mask + 16 image latents) and have no CLIP branch (diffusers'
  config: ``added_kv_proj_dim=None``, no ``image_dim``), so they are ``model_type="t2v"`` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.core.transformer import TransformerConfig

from megatron_rcm.models.config_fields import check_recompute, config_from_preset, megatron_check_view
from megatron_rcm.models.te_support import check_transformer_impl
from megatron_rcm.ops.attention import check_attention_backend
from megatron_rcm.ops.elementwise import check_fused_elementwise


@dataclass
class WanConfig(TransformerConfig):
    """Wan2.1 model hyper-parameters. ``hidden_size`` is Wan's ``dim``, ``ffn_hidden_size`` its ``ffn_dim``.

    Megatron's fields used as they are (``models/config_fields.py``): ``layernorm_epsilon`` is the epsilon of
    every LayerNorm / RMSNorm (override name ``norm_eps`` maps onto it); activation recompute of each block
    is ``recompute_granularity="full"``, ``recompute_method="uniform"``, ``recompute_num_layers=1``, of the first
    N blocks of each stage ``recompute_method="block"``, ``recompute_num_layers=N``; with
    ``recompute_granularity="selective"`` the chosen blocks re-run all but their self-attention core."""

    model_type: str = "t2v"
    """"t2v" or "i2v" (I2V adds the CLIP-feature projection and the image cross-attention)."""
    in_channels: int = 16
    """Latent channels into the patch embedding (I2V: 16 noisy + 4 mask + 16 image-condition = 36)."""
    out_channels: int = 16
    """Velocity channels out of the head."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(frames, rows, cols) patch of the 3D patch embedding."""
    text_dim: int = 4096
    """Width of the text-encoder (umT5) embeddings."""
    text_len: int = 512
    """Text tokens the released models are trained with (context is used as given, not padded)."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    image_dim: int = 1280
    """Width of the CLIP image features (I2V only)."""
    image_len: int = 257
    """CLIP tokens ahead of the text tokens (I2V only)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_max_seq_len: int = 1024
    """Largest frame/row/column index the RoPE tables cover."""
    cp_a2a_head_groups: int = 1
    """Under ``cp_comm_type`` "a2a": Ulysses' all-to-all in this many head groups, overlapped with the
    attention (``parallel.cp_ulysses_groups``); 1 is one all-to-all each way. Must divide the heads per CP rank."""
    attention_backend_name: str = "auto"
    """Attention implementation (``megatron_rcm.ops.attention.attention_op``, picked at construction): "auto"
    (Triton JVP kernel on CUDA, PyTorch on CPU), "torch" (SDPA, PyTorch reference for the JVP), "triton"."""
    fused_elementwise: str | bool = "auto"
    """Elementwise chains of the block (norm + modulation, gated residual, RoPE, q/k RMSNorm, GELU-tanh;
    ``ops/elementwise.py``, picked at construction): "auto" (fused Triton kernels, primal and tangent in one,
    for CUDA bf16/fp16 tensors; the PyTorch reference otherwise), true (always the kernels), false (never)."""
    fused_qkv: bool = False
    """Self-attention q, k, v from one column-parallel linear (one GEMM, under sequence parallelism one
    all-gather; ``models.fused_qkv``). Checkpoints keep the q/k/v names: they load with either setting."""
    transformer_impl: str = "local"
    """Megatron's field, default "local" here: Megatron's local tensor-parallel linears; "transformer_engine":
    Transformer Engine's (BF16, or FP8 with ``fp8`` + ``fp8_recipe``; ``models.te_support``)."""
    disable_parameter_transpose_cache: bool = True
    """Megatron's field, default True here: TE re-casts the weights on every call (the FP8 weight cache would
    go stale between the student's calls across optimizer steps; rCM steps call it without Megatron's
    schedules, which reset the cache per micro-batch)."""
    extra: dict = field(default_factory=dict)
    """Free-form provenance (e.g. the source checkpoint a converted model came from)."""

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        check_attention_backend(self.attention_backend_name, f"{type(self).__name__}.attention_backend_name")
        check_recompute(self, selective=True)
        self.fused_elementwise = check_fused_elementwise(self.fused_elementwise, f"{type(self).__name__}.fused_elementwise")
        check_transformer_impl(self)
        if not isinstance(self.fused_qkv, bool):
            raise ValueError(f"{type(self).__name__}.fused_qkv={self.fused_qkv!r}: expected true or false")
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 2 != 0 or head_dim < 6:
            raise ValueError(f"head dim {head_dim} must be even and >= 6 for the 3D RoPE split")
        with megatron_check_view(self):
            super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dim split over (frame, row, column): 128 -> (44, 42, 42)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)


_PRESETS: dict[str, dict] = {
    "wan2.1-t2v-1.3b": dict(
        num_layers=30, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12, in_channels=16
    ),
    "wan2.1-t2v-14b": dict(
        num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40, in_channels=16
    ),
    "wan2.1-i2v-14b": dict(
        num_layers=40,
        hidden_size=5120,
        ffn_hidden_size=13824,
        num_attention_heads=40,
        in_channels=36,
        model_type="i2v",
    ),
    "wan2.2-ti2v-5b": dict(
        num_layers=30, hidden_size=3072, ffn_hidden_size=14336, num_attention_heads=24, in_channels=48,
        out_channels=48,
    ),
    "wan2.2-t2v-a14b": dict(
        num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40, in_channels=16
    ),
    "wan2.2-i2v-a14b": dict(
        num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40, in_channels=36
    ),
    "wan-tiny-t2v": dict(
        num_layers=2,
        hidden_size=128,
        ffn_hidden_size=256,
        num_attention_heads=4,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
    ),
    "wan-tiny-i2v": dict(
        num_layers=2,
        hidden_size=128,
        ffn_hidden_size=256,
        num_attention_heads=4,
        in_channels=8,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        image_dim=24,
        model_type="i2v",
    ),
}

PRESETS = tuple(_PRESETS)

WAN22_BOUNDARY: dict[str, float] = {"wan2.2-t2v-a14b": 0.875, "wan2.2-i2v-a14b": 0.900}
"""Two-expert presets -> boundary ratio: the high-noise expert serves timesteps t >= ratio * 1000 (the Wan
team's ``boundary`` in ``wan_t2v_A14B.py`` / ``wan_i2v_A14B.py``; diffusers' ``boundary_ratio``)."""

WAN22_VAE_STRIDE: dict[str, tuple[int, int, int]] = {"wan2.2-ti2v-5b": (4, 16, 16)}
"""(frames, rows, cols) pixels per latent of the VAE a preset's latents come from; Wan2.1's is (4, 8, 8)."""


def wan_config(preset: str, **overrides) -> WanConfig:
    """Build a ``WanConfig`` from a preset name plus field overrides.

    Parallel sizes (TP, CP) default to what ``parallel_state`` was initialized with; ``cp_comm_type``
    (Megatron's field: "p2p" ring, "a2a" Ulysses) picks the context-parallel attention; sequence parallelism is on
    whenever TP > 1 (Megatron's recommended setting).
    """
    return config_from_preset(WanConfig, _PRESETS, preset, overrides, context_parallel=True, add_bias_linear=True,
                              layernorm_epsilon=1e-6)
