"""Cosmos building blocks that are not the attention: the time embedding, AdaLN-LoRA modulation, the
per-head q/k RMSNorm and the learnable absolute position embedding, each with its tangent path.

Legend: S tokens, s = S / tp this rank's tokens, B batch, D hidden, d head dim, K = adaln_lora_dim.
Every linear here is bias-free (Cosmos-Predict2 has no biases) and replicated on the TP ranks; those that
act on this rank's tokens only are marked sequence-parallel (their grads are partial sums, all-reduced by
Megatron's ``finalize_model_grads``).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_rcm.models.jvp import add_tangents, compute_dtype, linear_jvp, rms_norm_jvp, silu_jvp
from megatron_rcm.models.wan.layers import mark_sequence_parallel, sinusoidal_embedding_jvp


def _linear(config, in_dim: int, out_dim: int) -> nn.Linear:
    return nn.Linear(in_dim, out_dim, bias=False, dtype=config.params_dtype)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


class HeadRMSNorm(MegatronModule):
    """RMSNorm over each head's d channels with one weight [d] shared by all heads (Cosmos' q/k norm).

    With heads split over TP every rank applies the same weight to different heads, so the weight's
    gradient is a partial sum per rank: it is marked for the TP all-reduce of ``finalize_model_grads``.
    """

    def __init__(self, config, head_dim: int):
        super().__init__(config)
        self.eps = config.qk_norm_eps
        self.weight = nn.Parameter(torch.ones(head_dim, dtype=config.params_dtype))
        if config.sequence_parallel:
            mark_sequence_parallel(self)

    def forward(self, x_SBNd, t_x=None):
        y, t_y = rms_norm_jvp(x_SBNd, t_x, self.eps, self.weight)
        return y.to(x_SBNd.dtype), _cast(t_y, x_SBNd.dtype)


class CosmosTimeEmbedding(MegatronModule):
    """timestep [B] -> (emb [B, D], temb [B, 3 D]) (diffusers ``CosmosEmbedding``); any leading shape, e.g.
    one timestep per latent frame [F, B] -> [F, B, D], [F, B, 3 D]:

    f = [cos(t w), sin(t w)],  w_i = 10000^(-i / (D/2))      (the sinusoid, width D)
    emb  = RMSNorm(f) * norm.weight                            (drives every AdaLN-LoRA)
    temb = linear_2(SiLU(linear_1(f)))                         (the shared 3 D modulation base)
    """

    def __init__(self, config):
        super().__init__(config)
        D = config.hidden_size
        self.dim = D
        self.eps = config.layernorm_epsilon
        self.linear_1 = _linear(config, D, D)
        self.linear_2 = _linear(config, D, 3 * D)
        self.norm_weight = nn.Parameter(torch.ones(D, dtype=config.params_dtype))
        if config.sequence_parallel:
            for module in (self, self.linear_1, self.linear_2):
                mark_sequence_parallel(module)

    def forward(self, timestep_B, t_timestep_B):
        dtype = self.linear_1.weight.dtype
        f, t_f = sinusoidal_embedding_jvp(
            timestep_B, t_timestep_B, self.dim, compute_dtype(self.linear_1.weight)
        )
        f, t_f = f.to(dtype), _cast(t_f, dtype)
        temb, t_temb = linear_jvp(self.linear_1, f, t_f)
        temb, t_temb = silu_jvp(temb, t_temb)
        temb, t_temb = linear_jvp(self.linear_2, temb, t_temb)
        emb, t_emb = rms_norm_jvp(f, t_f, self.eps, self.norm_weight)
        return (emb.to(dtype), _cast(t_emb, dtype)), (temb, t_temb)


class AdaLNLoRA(MegatronModule):
    """(shift, scale[, gate]) = split(linear_2(linear_1(SiLU(emb))) + temb[..., :n D]), each [B, D], in float32.

    With a timestep per latent frame, emb [F, B, D] and temb [F, B, 3 D] give a modulation per frame, and
    ``frame_of_token`` [s] (the frame of each of this rank's tokens) takes it to this rank's tokens: each
    part [s, B, D]. Computing per frame and then indexing is what diffusers' per-token modulation equals
    (every token of a frame has that frame's time) at F instead of s rows; the index is rank-local, so the
    gradients of these (sequence-parallel marked) weights stay partial sums over the TP ranks' tokens.
    """

    def __init__(self, config, chunks: int):
        super().__init__(config)
        D = config.hidden_size
        self.chunks = chunks
        self.linear_1 = _linear(config, D, config.adaln_lora_dim)
        self.linear_2 = _linear(config, config.adaln_lora_dim, chunks * D)
        if config.sequence_parallel:
            mark_sequence_parallel(self.linear_1)
            mark_sequence_parallel(self.linear_2)

    def forward(self, emb, t_emb, temb, t_temb, frame_of_token=None):
        n = self.chunks * emb.shape[-1]
        h, t_h = silu_jvp(emb, t_emb)
        h, t_h = linear_jvp(self.linear_1, h, t_h)
        h, t_h = linear_jvp(self.linear_2, h, t_h)
        cdt = compute_dtype(h)
        mod = h.to(cdt) + temb[..., :n].to(cdt)
        t_mod = None if t_h is None else add_tangents(t_h.to(cdt), _cast(t_temb[..., :n], cdt))
        if frame_of_token is not None:  # per frame [F, B, n D] -> this rank's tokens [s, B, n D]
            mod = mod.index_select(0, frame_of_token)
            t_mod = None if t_mod is None else t_mod.index_select(0, frame_of_token)
        parts = mod.chunk(self.chunks, dim=-1)
        t_parts = (None,) * self.chunks if t_mod is None else t_mod.chunk(self.chunks, dim=-1)
        return parts, t_parts


class LearnablePosEmbedding(MegatronModule):
    """Absolute position embedding [S, D] = e / (eps + ||e|| / sqrt(D)), e = pos_t[f] + pos_h[h] + pos_w[w]
    (diffusers ``CosmosLearnablePositionalEmbed``). Constant in x and t: no tangent."""

    def __init__(self, config):
        super().__init__(config)
        D = config.hidden_size
        self.eps = 1e-6
        rows = [m // p for m, p in zip(config.max_size, config.patch_size)]
        self.pos_emb_t = nn.Parameter(torch.zeros(rows[0], D, dtype=config.params_dtype))
        self.pos_emb_h = nn.Parameter(torch.zeros(rows[1], D, dtype=config.params_dtype))
        self.pos_emb_w = nn.Parameter(torch.zeros(rows[2], D, dtype=config.params_dtype))

    def forward(self, grid_fhw):
        f, h, w = grid_fhw
        rows = (self.pos_emb_t.shape[0], self.pos_emb_h.shape[0], self.pos_emb_w.shape[0])
        if f > rows[0] or h > rows[1] or w > rows[2]:
            raise ValueError(
                f"patched grid {tuple(grid_fhw)} exceeds the position tables {rows} (max_size / patch)"
            )
        e = self.pos_emb_t[:f, None, None] + self.pos_emb_h[None, :h, None] + self.pos_emb_w[None, None, :w]
        e = e.reshape(f * h * w, -1)
        cdt = compute_dtype(e)
        norm = torch.linalg.vector_norm(e.to(cdt), dim=-1, keepdim=True)
        return (e.to(cdt) / (self.eps + norm / e.shape[-1] ** 0.5)).to(e.dtype)
