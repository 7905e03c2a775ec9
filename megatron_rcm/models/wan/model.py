"""The Wan2.1 diffusion transformer (T2V and I2V) on Megatron-Core, with a forward-mode tangent path.

Legend: B batch, C channels, F/H/W latent frames/rows/cols, f/h/w after patching, S = f*h*w tokens,
S_pad = S padded to a multiple of CP x TP under context parallelism, s_cp = S_pad / CP tokens on this CP
rank, s = s_cp / tp tokens on this rank (sequence parallel), D hidden, L context tokens,
P = C_out * prod(patch).

Context parallelism (``context_parallel_size`` > 1, ``megatron_rcm.parallel.context``): the model takes and
returns the full latent on every CP rank (the CP ranks of one replica hold the same sample); inside,
the patchified tokens are padded and each CP rank keeps its contiguous shard, RoPE uses each token's global
position, text context, time embedding and modulation stay replicated, and the output is all-gathered
over the CP group at the head (backward: each rank keeps its slice of the gradient, so the parameter
gradients of the CP ranks sum to the full gradient).

    forward(x, timestep, context)                      -> v            (RF velocity, [B, C_out, F, H, W])
    forward_jvp(x, t_x, timestep, t_timestep, context) -> (v, t_v)

``timestep`` is the network time (Wan: 1000 * s_rf), one per sample [B], or one per token [B, S] (Wan2.2
TI2V's ``expand_timesteps``: the image-conditioned first frame's tokens at t = 0; ``t_timestep`` then has the
same shape, 0 on those tokens). Per token, the time embedding and the modulation of every block and the
head are computed for each of this rank's tokens ([s, B, D], the adaLN tables broadcast over them). Weights carry no tangent and the context (text,
CLIP image features) is constant. The primal of ``forward_jvp`` keeps its autograd graph, the tangent none.

Pipeline parallelism (``megatron_rcm.parallel.pipeline``): a stage model holds the blocks
``[layer_offset, layer_offset + num_local_layers)``, the patch embedding when ``pre_process`` and the head
when ``post_process``; the conditioning embeddings are copied on every stage. A stage after the first takes
its input from ``set_input_tensor`` (Megatron's schedules call it) and still needs ``x`` for the latent's
shape; a stage before the last returns ``(h, None)``, ``h`` the boundary tensor ([s, B, D], or
[2, s, B, D] with the tangent stacked in the JVP pass).
"""

from __future__ import annotations

import math

import torch
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_rcm.models.config_fields import recomputed_block, selective_block
from megatron_rcm.models.jvp import compute_dtype, linear_jvp, silu_jvp
from megatron_rcm.models.te_support import recompute_context_fn
from megatron_rcm.models.wan import impl_keys
from megatron_rcm.models.wan.block import WanBlock, modulate_jvp
from megatron_rcm.models.wan.config import WanConfig
from megatron_rcm.models.wan.layers import (
    ImageEmbedder,
    LayerNorm,
    MLPEmbedder,
    mark_sequence_parallel,
    sinusoidal_embedding_jvp,
)
from megatron_rcm.models.wan.rope import rope_cos_sin
from megatron_rcm.models.wan.spec import get_wan_block_spec
from megatron_rcm.parallel import pipeline
from megatron_rcm.parallel.collectives import gather_sequence, scatter_sequence, tp_world_size
from megatron_rcm.parallel.context import gather_from_cp, token_shard


def patchify(x_BCFHW: torch.Tensor, patch) -> torch.Tensor:
    """[B, C, F, H, W] -> tokens [S, B, C*pt*ph*pw], tokens ordered (f, h, w), features (c, pt, ph, pw)
    (the flattening of Wan's Conv3d patch-embedding weight [D, C, pt, ph, pw])."""
    B, C, F, H, W = x_BCFHW.shape
    pt, ph, pw = patch
    x = x_BCFHW.reshape(B, C, F // pt, pt, H // ph, ph, W // pw, pw)
    x = x.permute(2, 4, 6, 0, 1, 3, 5, 7)  # f h w B C pt ph pw
    return x.reshape((F // pt) * (H // ph) * (W // pw), B, C * pt * ph * pw)


def unpatchify(x_SBP: torch.Tensor, grid_fhw, patch, out_channels: int) -> torch.Tensor:
    """tokens [S, B, pt*ph*pw*C] (Wan's head order: patch offsets, then channels) -> [B, C, F, H, W]."""
    f, h, w = grid_fhw
    pt, ph, pw = patch
    B = x_SBP.shape[1]
    x = x_SBP.reshape(f, h, w, B, pt, ph, pw, out_channels)
    x = x.permute(3, 7, 0, 4, 1, 5, 2, 6)  # B C f pt h ph w pw
    return x.reshape(B, out_channels, f * pt, h * ph, w * pw)


class WanHead(MegatronModule):
    """x = linear(LN(x) * (1 + scale) + shift), (shift, scale) = modulation + e (the time embedding)."""

    def __init__(self, config):
        super().__init__(config)
        D = config.hidden_size
        self.norm = LayerNorm(config, D, affine=False)
        P = config.out_channels * math.prod(config.patch_size)
        self.linear = nn.Linear(D, P, dtype=config.params_dtype)
        self.modulation = nn.Parameter(torch.randn(1, 2, D, dtype=config.params_dtype) / D**0.5)
        if config.sequence_parallel:
            mark_sequence_parallel(self)
            mark_sequence_parallel(self.linear)

    def forward(self, x, t_x, e_BD, t_e_BD):
        """e_BD: the time embedding [B, D], or [s, B, D] with a timestep per token (this rank's tokens)."""
        cdt = compute_dtype(x)
        shift, scale = (self.modulation.to(cdt) + e_BD.to(cdt).unsqueeze(-2)).unbind(-2)
        # d shift = d scale = d e (the modulation table is a weight: no tangent)
        t_shift = t_scale = None if t_e_BD is None else t_e_BD.to(cdt)
        h, t_h = self.norm(x, t_x)
        h, t_h = modulate_jvp(h, t_h, shift, t_shift, scale, t_scale)
        return linear_jvp(self.linear, h.to(x.dtype), None if t_h is None else t_h.to(x.dtype))


class WanModel(MegatronModule):
    """Wan2.1 DiT. Build after ``megatron_rcm.parallel.state.initialize_parallel``."""

    def __init__(
        self,
        config: WanConfig,
        layer_offset: int = 0,
        num_local_layers: int | None = None,
        pre_process: bool = True,
        post_process: bool = True,
    ):
        super().__init__(config)
        self.config: WanConfig = config
        self.pre_process, self.post_process = pre_process, post_process
        self.model_type = ModelType.encoder_or_decoder  # what Megatron's pipeline schedules ask for
        self.share_embeddings_and_output_weights = False  # finalize_model_grads asks (patch embedding != head)
        self.input_tensor = None  # a later pipeline stage's input, set by set_input_tensor
        spec = get_wan_block_spec(config.transformer_impl)
        D = config.hidden_size
        patch_dim = config.in_channels * math.prod(config.patch_size)
        self.patch_embedding = nn.Linear(patch_dim, D, dtype=config.params_dtype) if pre_process else None
        self.text_embedding = MLPEmbedder(config, config.text_dim, D, D, "gelu_tanh")
        self.time_embedding = MLPEmbedder(config, config.freq_dim, D, D, "silu")
        self.time_projection = nn.Linear(D, 6 * D, dtype=config.params_dtype)
        if config.sequence_parallel:
            # e/e0 modulate this rank's tokens only: their grads are partial sums over the sequence.
            for module in (self.time_embedding.linear_1, self.time_embedding.linear_2, self.time_projection):
                mark_sequence_parallel(module)
        self.img_emb = ImageEmbedder(config) if config.model_type == "i2v" else None
        n = config.num_layers if num_local_layers is None else num_local_layers
        self.blocks = nn.ModuleList(
            [WanBlock(config, spec, layer_offset + i, selective=selective_block(config, i)) for i in range(n)]
        )
        self.head = WanHead(config) if post_process else None
        if not (pre_process and post_process):
            for module in self._conditioning_modules():
                pipeline.mark_replicated(module, first_stage=pre_process)
        # a state dict of either linear implementation (transformer_impl) loads into this one
        self.register_load_state_dict_pre_hook(impl_keys.load_state_dict_pre_hook)

    def _conditioning_modules(self):
        modules = (self.text_embedding, self.time_embedding, self.time_projection, self.img_emb)
        return [m for m in modules if m is not None]

    @property
    def stage(self) -> pipeline.PipelineStage:
        """The blocks and ends of the network this model holds (the whole network at PP=1)."""
        offset = self.blocks[0].layer_number if len(self.blocks) else 0
        return pipeline.PipelineStage(offset, len(self.blocks), self.pre_process, self.post_process)

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's schedule hands a later stage its input (a list of one tensor)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"WanModel takes one stage input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron's default, except for the blocks: each is asked for its own sharded state dict (an
        ``nn.ModuleList`` has none, and the default would record its TP shards as replicated tensors), and
        its checkpoint keys name it by global layer number (``blocks.{layer_number}.``), not by its index on
        this pipeline stage, so a checkpoint loads at any TP size and under any pipeline split. Checkpoint keys
        are the local implementation's names (``impl_keys``), so a checkpoint loads under either
        ``transformer_impl``."""
        blocks = f"{prefix}blocks."
        sharded_sd = {
            k: v
            for k, v in super().sharded_state_dict(prefix, sharded_offsets, metadata).items()
            if not k.startswith(blocks)
        }
        for i, block in enumerate(self.blocks):
            block_sd = block.sharded_state_dict(f"{blocks}{i}.", sharded_offsets, metadata)
            if block.layer_number != i:  # state-dict keys stay local, checkpoint keys become global
                replace_prefix_for_sharding(block_sd, f"{blocks}{i}.", f"{blocks}{block.layer_number}.")
            sharded_sd.update(block_sd)
        if pipeline.pp_world_size() > 1 and pipeline.pp_rank() > 0:
            # the conditioning embeddings are copied on every stage: only the first stage's copy is the main
            # replica (Megatron's replica_id = (PP-ish, TP, DP), as for tied embeddings)
            for k, sh in sharded_sd.items():
                if k.startswith(tuple(f"{prefix}{name}." for name in self._conditioning_names())):
                    sh.replica_id = (pipeline.pp_rank(), *sh.replica_id[1:])
        return impl_keys.canonical_sharded_state_dict(sharded_sd)

    def _conditioning_names(self):
        return [n for n, m in self.named_children() if m is not None and m in self._conditioning_modules()]

    # ------------------------------------------------------------------------------------------------
    def _check_inputs(self, x, timestep, context, clip_fea):
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, C={cfg.in_channels}, F, H, W], got shape {tuple(x.shape)}")
        B, _, F, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        if F % pt or H % ph or W % pw:
            raise ValueError(
                f"latent size (F, H, W) = {(F, H, W)} is not divisible by patch {cfg.patch_size}"
            )
        S = (F // pt) * (H // ph) * (W // pw)
        tp = tp_world_size()
        if cfg.sequence_parallel and S % tp and cfg.context_parallel_size == 1:
            raise ValueError(
                f"{S} tokens (F*H*W / patch = {F}*{H}*{W} / {pt * ph * pw}) are not divisible by the "
                f"sequence-parallel size {tp}; change the latent size or the TP size"
            )
        if max(F // pt, H // ph, W // pw) > cfg.rope_max_seq_len:
            raise ValueError(
                f"patched grid {(F // pt, H // ph, W // pw)} exceeds rope_max_seq_len {cfg.rope_max_seq_len}"
            )
        if timestep.shape not in ((B,), (B, S)):
            raise ValueError(
                f"timestep must be [B={B}] (one per sample) or [B={B}, S={S}] (one per token, S = F*H*W / patch "
                f"= {F}*{H}*{W} / {pt * ph * pw}, Wan2.2 TI2V), got shape {tuple(timestep.shape)}"
            )
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [B={B}, L, {cfg.text_dim}], got shape {tuple(context.shape)}")
        if (clip_fea is not None) != (cfg.model_type == "i2v"):
            raise ValueError(
                f"clip_fea is required for i2v models and not accepted by t2v (model_type={cfg.model_type})"
            )
        if clip_fea is not None and (
            clip_fea.ndim != 3 or clip_fea.shape[0] != B or clip_fea.shape[2] != cfg.image_dim
        ):
            raise ValueError(
                f"clip_fea must be [B={B}, N, {cfg.image_dim}], got shape {tuple(clip_fea.shape)}"
            )

    def frame_timestep(self, timestep_BF: torch.Tensor, x_shape) -> torch.Tensor:
        """A time per latent frame [B, F] -> one per token [B, S] (tokens ordered (f, h, w)), the layout of
        diffusers' Wan2.2 TI2V ``expand_timesteps`` (``rcm.condition_frames``); needs patch frames pt = 1."""
        B, _, F, H, W = x_shape
        pt, ph, pw = self.config.patch_size
        if pt != 1 or timestep_BF.shape != (B, F):
            raise ValueError(
                f"a time per latent frame needs timestep [B={B}, F={F}] and patch frames pt = 1, got "
                f"{tuple(timestep_BF.shape)} and patch {self.config.patch_size}"
            )
        return timestep_BF.repeat_interleave((H // ph) * (W // pw), dim=1)

    def forward(self, x_BCFHW, timestep_B, context_BLD, clip_fea_BND=None):
        return self.forward_jvp(x_BCFHW, None, timestep_B, None, context_BLD, clip_fea_BND)[0]

    def forward_jvp(self, x_BCFHW, t_x_BCFHW, timestep_B, t_timestep_B, context_BLD, clip_fea_BND=None):
        """Returns (v, t_v). Pass both tangents (zeros allowed) or neither (then t_v is None)."""
        cfg = self.config
        self._check_inputs(x_BCFHW, timestep_B, context_BLD, clip_fea_BND)
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
        dtype = self.time_projection.weight.dtype  # on every stage; follows .double()/.bfloat16() of the model
        _, _, F, H, W = x_BCFHW.shape
        pt, ph, pw = cfg.patch_size
        grid = (F // pt, H // ph, W // pw)

        # this CP rank's tokens [s_cp, B, P] (padded at the end), patch embedding, this TP rank's shard
        S = grid[0] * grid[1] * grid[2]
        shard = token_shard(S, tp_world_size() if cfg.sequence_parallel else 1, cfg.context_parallel_size)
        if self.pre_process:
            x, t_x = linear_jvp(
                self.patch_embedding,
                shard.shard(patchify(x_BCFHW.to(dtype), cfg.patch_size)),
                shard.shard(patchify(t_x_BCFHW.to(dtype), cfg.patch_size)) if with_tangent else None,
            )
            x = scatter_sequence(x)
            t_x = scatter_sequence(t_x) if with_tangent else None
        else:  # a later pipeline stage: the previous stage's [s, B, D] (with its tangent: [2, s, B, D])
            if self.input_tensor is None:
                raise RuntimeError("a pipeline stage after the first needs its input from set_input_tensor")
            x, t_x = pipeline.unpack_boundary(self.input_tensor, with_tangent)

        # time: e [B, D] (head), e0 [B, 6, D] (blocks); in float32 like Wan (float64 models: float64).
        # A timestep per token [B, S] (Wan2.2 TI2V: the clean first frame at t = 0) is taken to this rank's
        # tokens [s, B] like the activations, giving e [s, B, D] and e0 [s, B, 6, D]
        timestep, t_timestep = timestep_B, t_timestep_B
        if timestep_B.ndim == 2:
            timestep = scatter_sequence(shard.shard(timestep_B.transpose(0, 1)))
            t_timestep = scatter_sequence(shard.shard(t_timestep_B.transpose(0, 1))) if with_tangent else None
        cdt = compute_dtype(self.time_projection.weight)
        sin_emb, t_sin_emb = sinusoidal_embedding_jvp(timestep, t_timestep, cfg.freq_dim, cdt)
        e, t_e = self.time_embedding(sin_emb.to(dtype), None if t_sin_emb is None else t_sin_emb.to(dtype))
        e0, t_e0 = silu_jvp(e, t_e)
        e0, t_e0 = linear_jvp(self.time_projection, e0, t_e0)
        e0 = e0.unflatten(-1, (6, -1))
        t_e0 = None if t_e0 is None else t_e0.unflatten(-1, (6, -1))

        # constant conditioning (no tangent), Megatron layout [L, B, D]
        context = self.text_embedding(context_BLD.to(dtype))[0].transpose(0, 1)
        context_img = None
        if self.img_emb is not None:
            context_img = self.img_emb(clip_fea_BND.to(dtype)).transpose(0, 1)
        # RoPE at each token's global position (padding rows get cos = sin = 0; their outputs are dropped)
        rope = rope_cos_sin(grid, cfg.rope_dims, cfg.rope_theta, x.device, cdt)
        rope_cos, rope_sin = shard.shard(rope[0]), shard.shard(rope[1])

        for i, block in enumerate(self.blocks):
            args = (x, t_x, e0, t_e0, context, context_img, rope_cos, rope_sin, shard)
            # full: the whole block re-runs, primal and tangent together; selective: the block checkpoints its
            # segments around the self-attention core itself (``WanBlock``)
            if recomputed_block(cfg, i) and not block.selective and torch.is_grad_enabled():
                x, t_x = torch.utils.checkpoint.checkpoint(
                    block, *args, use_reentrant=False, context_fn=recompute_context_fn(cfg)
                )
            else:
                x, t_x = block(*args)
        if not self.post_process:
            return pipeline.pack_boundary(x, t_x), None

        out, t_out = self.head(x, t_x, e, t_e)
        out = gather_from_cp(gather_sequence(out), shard)
        v = unpatchify(out, grid, cfg.patch_size, cfg.out_channels)
        if not with_tangent:
            return v, None
        t_v = unpatchify(gather_from_cp(gather_sequence(t_out), shard), grid, cfg.patch_size, cfg.out_channels)
        return v, t_v
