"""The Cosmos-Predict2 diffusion transformer (Text2Image, Video2World) on Megatron-Core, with a
forward-mode tangent path (diffusers ``CosmosTransformer3DModel``, the Cosmos-Predict2 configuration).

Legend: B batch, C channels, F/H/W latent frames/rows/cols, f/h/w after patching, S = f*h*w tokens,
S_pad = S padded to a multiple of CP x TP under context parallelism, s_cp = S_pad / CP tokens on this CP
rank, s = s_cp / tp tokens on this rank (sequence parallel), D hidden, L text tokens, E text width,
P = prod(patch) * C_out.

Context parallelism (``context_parallel_size`` > 1, ``megatron_rcm.parallel.context``), as ``WanModel``: the
model takes and returns the full latent on every CP rank; inside, the patchified tokens are padded and each
CP rank keeps its contiguous shard (``TokenShard``), RoPE and the learnable position embedding use each
token's global position (the full tables sliced with the same shard), ``frame_of_token`` is the frame of each
of this rank's tokens (global index; padding rows take frame 0, their outputs are dropped), the text and the
time embedding stay replicated, self-attention runs over the CP group (Wan's ``ContextParallelAttention``)
and the head's output is all-gathered over the CP group (backward: each rank keeps its slice of the
gradient, so the parameter gradients of the CP ranks sum to the full gradient).

    forward(x, timestep, context)                      -> v            (RF velocity, [B, C_out, F, H, W])
    forward_jvp(x, t_x, timestep, t_timestep, context) -> (v, t_v)

``timestep`` is the network time: Cosmos-Predict2 is fed the rectified-flow time itself,
c_noise = s_rf = sigma / (1 + sigma) (T_scale = 1, rcm_math.md sec. 1; diffusers'
``Cosmos2TextToImagePipeline`` passes ``current_t = sigma / (sigma + 1)`` with input ``c_in = 1 - t`` and
output ``c_skip x + c_out v = (1 - t) x - t v``, which is the TrigFlow wrapper's table at T_scale = 1).
``timestep`` is one per sample [B], or one per latent frame [B, F] (Video2World: the conditioning frames at
their own, clean time; diffusers takes it as [B, 1, F, 1, 1] and gives every token its frame's time
embedding and modulation). Per frame, the time embedding and the AdaLN-LoRA modulations are computed for the
F frames and indexed to this rank's tokens (``frame_of_token``, a slice under context and sequence parallelism);
``t_timestep`` then has the same shape. Patch frames pt must be 1 for per-frame timesteps (all presets).
Video2World's condition mask is an input channel of x (``in_channels`` counts it); the padding mask is
appended inside (zeros unless given). Weights carry no tangent; the text and the masks are constant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_rcm.models.config_fields import recomputed_block
from megatron_rcm.models.cosmos.block import CosmosBlock
from megatron_rcm.models.cosmos.config import CosmosConfig
from megatron_rcm.models.cosmos.layers import AdaLNLoRA, CosmosTimeEmbedding, LearnablePosEmbedding
from megatron_rcm.models.cosmos.rope import rope_cos_sin
from megatron_rcm.models.jvp import compute_dtype, linear_jvp
from megatron_rcm.models.wan.block import modulate_jvp
from megatron_rcm.models.wan.layers import LayerNorm, mark_sequence_parallel
from megatron_rcm.models.wan.model import patchify
from megatron_rcm.models.wan.spec import get_wan_block_spec
from megatron_rcm.parallel.collectives import gather_sequence, scatter_sequence, tp_world_size
from megatron_rcm.parallel.context import TokenShard, gather_from_cp, token_shard


def unpatchify(x_SBP: torch.Tensor, grid_fhw, patch, out_channels: int) -> torch.Tensor:
    """tokens [S, B, ph*pw*pt*C] (Cosmos' head order: row, column, frame offsets, then channels)
    -> [B, C, F, H, W]."""
    f, h, w = grid_fhw
    pt, ph, pw = patch
    B = x_SBP.shape[1]
    x = x_SBP.reshape(f, h, w, B, ph, pw, pt, out_channels)
    x = x.permute(3, 7, 0, 6, 1, 4, 2, 5)  # B C f pt h ph w pw
    return x.reshape(B, out_channels, f * pt, h * ph, w * pw)


def resize_nearest(mask_BCHW: torch.Tensor, size_hw) -> torch.Tensor:
    """Nearest-neighbour resize, src index floor(dst * in / out): what diffusers' Cosmos does with
    torchvision's ``resize(..., NEAREST)`` (which calls ``interpolate(mode="nearest")`` on tensors)."""
    if tuple(mask_BCHW.shape[-2:]) == tuple(size_hw):
        return mask_BCHW
    return F.interpolate(mask_BCHW, size=tuple(size_hw), mode="nearest")


class CosmosHead(MegatronModule):
    """x = linear(LN(x) * (1 + scale) + shift), (shift, scale) = AdaLN-LoRA(emb) + temb[:, :2 D]."""

    def __init__(self, config):
        super().__init__(config)
        self.norm = LayerNorm(config, config.hidden_size, affine=False)
        self.adaln = AdaLNLoRA(config, 2)
        P = config.out_channels * math.prod(config.patch_size)
        self.linear = nn.Linear(config.hidden_size, P, bias=False, dtype=config.params_dtype)
        if config.sequence_parallel:
            mark_sequence_parallel(self.linear)

    def forward(self, x, t_x, emb, t_emb, temb, t_temb, frame_of_token=None):
        (shift, scale), (t_shift, t_scale) = self.adaln(emb, t_emb, temb, t_temb, frame_of_token)
        h, t_h = self.norm(x, t_x)
        h, t_h = modulate_jvp(h, t_h, shift, t_shift, scale, t_scale)
        return linear_jvp(self.linear, h.to(x.dtype), None if t_h is None else t_h.to(x.dtype))


class CosmosModel(MegatronModule):
    """Cosmos-Predict2 DiT. Build after ``megatron_rcm.parallel.state.initialize_parallel``."""

    def __init__(self, config: CosmosConfig, layer_offset: int = 0, num_local_layers: int | None = None):
        super().__init__(config)
        self.config: CosmosConfig = config
        spec = get_wan_block_spec(config.transformer_impl)  # the same local TP linears as Wan
        D = config.hidden_size
        patch_in = (config.in_channels + int(config.concat_padding_mask)) * math.prod(config.patch_size)
        self.patch_embedding = nn.Linear(patch_in, D, bias=False, dtype=config.params_dtype)
        self.pos_embedding = LearnablePosEmbedding(config) if config.pos_embedding == "learnable" else None
        self.time_embedding = CosmosTimeEmbedding(config)
        n = config.num_layers if num_local_layers is None else num_local_layers
        self.blocks = nn.ModuleList([CosmosBlock(config, spec, layer_offset + i) for i in range(n)])
        self.head = CosmosHead(config)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """As ``WanModel.sharded_state_dict``: each block is asked for its own sharded state dict, keyed by
        its global layer number, so a checkpoint loads at any TP size and under any pipeline split."""
        blocks = f"{prefix}blocks."
        sharded_sd = {
            k: v
            for k, v in super().sharded_state_dict(prefix, sharded_offsets, metadata).items()
            if not k.startswith(blocks)
        }
        for i, block in enumerate(self.blocks):
            block_sd = block.sharded_state_dict(f"{blocks}{i}.", sharded_offsets, metadata)
            if block.layer_number != i:
                replace_prefix_for_sharding(block_sd, f"{blocks}{i}.", f"{blocks}{block.layer_number}.")
            sharded_sd.update(block_sd)
        return sharded_sd

    # ------------------------------------------------------------------------------------------------
    def _check_inputs(self, x, timestep, context, clip_fea, padding_mask):
        cfg = self.config
        if clip_fea is not None:
            raise ValueError("Cosmos-Predict2 takes no CLIP image features (clip_fea must be None)")
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            what = " (latents + condition mask)" if cfg.model_type == "v2w" else ""
            raise ValueError(f"x must be [B, C={cfg.in_channels}{what}, F, H, W], got shape {tuple(x.shape)}")
        B, _, F_, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        if F_ % pt or H % ph or W % pw:
            raise ValueError(
                f"latent size (F, H, W) = {(F_, H, W)} is not divisible by patch {cfg.patch_size}"
            )
        S = (F_ // pt) * (H // ph) * (W // pw)
        tp = tp_world_size()
        if cfg.sequence_parallel and S % tp and cfg.context_parallel_size == 1:
            raise ValueError(
                f"{S} tokens (F*H*W / patch = {F_}*{H}*{W} / {pt * ph * pw}) are not divisible by the "
                f"sequence-parallel size {tp}; change the latent size or the TP size"
            )
        if timestep.shape not in ((B,), (B, F_)):
            raise ValueError(
                f"timestep must be [B={B}] (one per sample) or [B={B}, F={F_}] (one per latent frame), got shape "
                f"{tuple(timestep.shape)}"
            )
        if timestep.ndim == 2 and pt != 1:
            raise ValueError(
                f"a timestep per latent frame needs patch frames pt = 1 (one frame per token), got patch "
                f"{cfg.patch_size}"
            )
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [B={B}, L, {cfg.text_dim}], got shape {tuple(context.shape)}")
        if padding_mask is not None:
            if not cfg.concat_padding_mask:
                raise ValueError("padding_mask given but the model has concat_padding_mask=False")
            if padding_mask.ndim != 4 or padding_mask.shape[0] not in (1, B) or padding_mask.shape[1] != 1:
                raise ValueError(
                    f"padding_mask must be [B={B} or 1, 1, H, W], got shape {tuple(padding_mask.shape)}"
                )

    def _with_padding_mask(self, x, t_x, padding_mask):
        """Append the padding-mask channel (zeros unless given; constant, so its tangent is zero)."""
        if not self.config.concat_padding_mask:
            return x, t_x
        B, _, F_, H, W = x.shape
        if padding_mask is None:
            pad = x.new_zeros(B, 1, F_, H, W)
        else:
            pad = resize_nearest(padding_mask.to(x.dtype), (H, W))[:, :, None].expand(B, 1, F_, H, W)
        x = torch.cat([x, pad], dim=1)
        t_x = None if t_x is None else torch.cat([t_x, torch.zeros_like(pad, dtype=t_x.dtype)], dim=1)
        return x, t_x

    @staticmethod
    def _frame_of_token(grid_fhw, shard: TokenShard, device) -> torch.Tensor:
        """[s] the latent frame of each of this rank's tokens (tokens ordered (f, h, w)): this CP rank's
        ``shard`` of the sequence (padding rows: frame 0, their outputs are dropped), then under sequence
        parallelism the contiguous slice ``scatter_sequence`` gives this TP rank."""
        f, h, w = grid_fhw
        frame_S = torch.arange(f * h * w, device=device) // (h * w)
        return scatter_sequence(shard.shard(frame_S))

    def frame_timestep(self, timestep_BF: torch.Tensor, x_shape) -> torch.Tensor:
        """A time per latent frame [B, F] in the layout ``forward`` takes: as it is (``rcm.condition_frames``)."""
        if timestep_BF.shape != (x_shape[0], x_shape[2]):
            raise ValueError(
                f"timestep per frame must be [B, F] of x {tuple(x_shape)}, got {tuple(timestep_BF.shape)}"
            )
        return timestep_BF

    def forward(self, x_BCFHW, timestep_B, context_BLE, clip_fea=None, padding_mask=None):
        return self.forward_jvp(x_BCFHW, None, timestep_B, None, context_BLE, clip_fea, padding_mask)[0]

    def forward_jvp(
        self, x_BCFHW, t_x_BCFHW, timestep_B, t_timestep_B, context_BLE, clip_fea=None, padding_mask=None
    ):
        """Returns (v, t_v). Pass both tangents (zeros allowed) or neither (then t_v is None)."""
        cfg = self.config
        self._check_inputs(x_BCFHW, timestep_B, context_BLE, clip_fea, padding_mask)
        with_tangent = t_x_BCFHW is not None or t_timestep_B is not None
        if with_tangent:
            t_x_BCFHW = torch.zeros_like(x_BCFHW) if t_x_BCFHW is None else t_x_BCFHW
            t_timestep_B = (
                torch.zeros_like(timestep_B, dtype=torch.float32) if t_timestep_B is None else t_timestep_B
            )
            if t_x_BCFHW.shape != x_BCFHW.shape:
                raise ValueError(f"t_x shape {tuple(t_x_BCFHW.shape)} != x shape {tuple(x_BCFHW.shape)}")
            if t_timestep_B.shape != timestep_B.shape:
                raise ValueError(
                    f"t_timestep shape {tuple(t_timestep_B.shape)} != timestep shape {tuple(timestep_B.shape)}"
                )
        dtype = self.patch_embedding.weight.dtype
        cdt = compute_dtype(self.patch_embedding.weight)
        _, _, F_, H, W = x_BCFHW.shape
        pt, ph, pw = cfg.patch_size
        grid = (F_ // pt, H // ph, W // pw)

        # padding-mask channel, patch embedding, then this rank's sequence shard
        x, t_x = self._with_padding_mask(
            x_BCFHW.to(dtype), t_x_BCFHW.to(dtype) if with_tangent else None, padding_mask
        )
        # this CP rank's tokens [s_cp, B, P] (padded at the end), patch embedding, this TP rank's shard
        S = grid[0] * grid[1] * grid[2]
        shard = token_shard(S, tp_world_size() if cfg.sequence_parallel else 1, cfg.context_parallel_size)
        x, t_x = linear_jvp(
            self.patch_embedding,
            shard.shard(patchify(x, cfg.patch_size)),
            shard.shard(patchify(t_x, cfg.patch_size)) if with_tangent else None,
        )
        x = scatter_sequence(x)
        t_x = scatter_sequence(t_x) if with_tangent else None
        pos_emb = None
        if self.pos_embedding is not None:  # at each token's global position: [s, 1, D], no tangent
            pos_emb = scatter_sequence(shard.shard(self.pos_embedding(grid))[:, None])

        # time: emb [B, D] (AdaLN-LoRA input), temb [B, 3 D] (shared modulation base); a timestep per frame
        # [B, F] gives emb [F, B, D], temb [F, B, 3 D], taken to this rank's tokens inside each AdaLN-LoRA
        timestep, t_timestep, frame_of_token = timestep_B, t_timestep_B, None
        if timestep_B.ndim == 2:
            timestep = timestep_B.transpose(0, 1)
            t_timestep = t_timestep_B.transpose(0, 1) if with_tangent else None
            frame_of_token = self._frame_of_token(grid, shard, x.device)
        (emb, t_emb), (temb, t_temb) = self.time_embedding(timestep, t_timestep)

        context = context_BLE.to(dtype).transpose(0, 1)  # [L, B, E], constant
        # RoPE at each token's global position (padding rows get cos = sin = 0; their outputs are dropped)
        rope_cos, rope_sin = rope_cos_sin(
            grid, cfg.rope_dims, cfg.rope_scale, cfg.rope_fps, cfg.base_fps, x.device, cdt
        )
        rope_cos, rope_sin = shard.shard(rope_cos), shard.shard(rope_sin)
        for i, block in enumerate(self.blocks):
            args = (
                x, t_x, emb, t_emb, temb, t_temb, pos_emb, context, rope_cos, rope_sin, frame_of_token, shard
            )
            if recomputed_block(cfg, i) and torch.is_grad_enabled():  # primal and tangent re-run together
                x, t_x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x, t_x = block(*args)

        out, t_out = self.head(x, t_x, emb, t_emb, temb, t_temb, frame_of_token)
        v = unpatchify(gather_from_cp(gather_sequence(out), shard), grid, cfg.patch_size, cfg.out_channels)
        if not with_tangent:
            return v, None
        t_v = unpatchify(gather_from_cp(gather_sequence(t_out), shard), grid, cfg.patch_size, cfg.out_channels)
        return v, t_v
