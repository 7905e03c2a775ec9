"""Cosmos self- and cross-attention on Megatron tensor-parallel linears, with a tangent path.

Legend: S full tokens, s = S/tp this rank's tokens (sequence parallel), L text tokens, B batch,
N_tp heads on this rank, d head dim, D hidden, D_tp = N_tp * d, E text width (T5: 1024).
Differences from Wan's attention (``models/wan/attention.py``): no biases, q/k RMSNorm per head (one
weight [d] shared by the heads, so no TP all-reduce in the norm), rotate-half RoPE with per-axis bases,
and cross-attention keys/values projected straight from the E-wide text embedding.
Tensor parallel: q/k/v column-parallel (heads split), the output projection row-parallel; under sequence
parallelism the column linears all-gather [s, B, D] -> [S, B, D_tp], the row linear reduce-scatters.
Context parallel (``config.context_parallel_size`` > 1; S is then this CP rank's tokens): self-attention runs
over the CP group with Wan's ``ContextParallelAttention`` (ring, Ulysses or both, ``config.cp_comm_type``),
picked at construction; cross-attention needs nothing (local queries, replicated text K/V).
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.module import MegatronModule

from megatron_rcm.models.cosmos.layers import HeadRMSNorm
from megatron_rcm.models.cosmos.rope import apply_rope_half
from megatron_rcm.models.jvp import linear_jvp
from megatron_rcm.models.tp_linears import column_linear, row_linear
from megatron_rcm.ops.attention import attention_op
from megatron_rcm.parallel.collectives import tp_world_size
from megatron_rcm.parallel.cp_attention import ContextParallelAttention


class CosmosAttention(MegatronModule):
    """Self-attention (``cross=False``: x [s, B, D] -> [s, B, D], RoPE on q/k) or cross-attention to the
    constant text [L, B, E] (no RoPE; keys/values carry no tangent: the kernel's fast path)."""

    def __init__(self, config, spec, cross: bool):
        super().__init__(config)
        tp = tp_world_size()
        if config.num_attention_heads % tp != 0:
            raise ValueError(
                f"num_attention_heads {config.num_attention_heads} is not divisible by tensor parallel "
                f"size {tp}; choose a TP size that divides the head count"
            )
        self.heads_per_rank = config.num_attention_heads // tp
        self.head_dim = config.head_dim
        self.cross = cross
        D = config.hidden_size
        kv_in = config.text_dim if cross else D
        # Text is replicated over TP ranks, not split along the sequence.
        kv_config = dataclasses.replace(config, sequence_parallel=False) if cross else config
        self.linear_q = column_linear(spec, config, D, D)
        self.linear_k = column_linear(spec, kv_config, kv_in, D)
        self.linear_v = column_linear(spec, kv_config, kv_in, D)
        self.q_norm = HeadRMSNorm(config, self.head_dim)
        self.k_norm = HeadRMSNorm(config, self.head_dim)
        self.linear_proj = row_linear(spec, config, D, D)
        self.attention = attention_op(config.attention_backend_name)
        cp = config.context_parallel_size
        self.cp_attention = (
            ContextParallelAttention(
                config.cp_comm_type or "p2p", cp, self.heads_per_rank, config.attention_backend_name,
                config.hierarchical_context_parallel_sizes,
            )
            if cp > 1 and not cross
            else None
        )

    def _heads(self, x):
        return None if x is None else x.unflatten(-1, (self.heads_per_rank, self.head_dim))

    def forward(self, x_sBD, t_x, context_LBE=None, rope_cos=None, rope_sin=None, shard=None):
        """``shard`` (a ``TokenShard``) is required by self-attention under context parallelism: which tokens
        this rank holds (``rope_cos``/``rope_sin`` are then this CP rank's rows of the tables)."""
        q, t_q = linear_jvp(self.linear_q, x_sBD, t_x)
        q, t_q = self.q_norm(self._heads(q), self._heads(t_q))
        kv_in, t_kv = (context_LBE, None) if self.cross else (x_sBD, t_x)
        k, t_k = linear_jvp(self.linear_k, kv_in, t_kv)
        k, t_k = self.k_norm(self._heads(k), self._heads(t_k))
        v, t_v = linear_jvp(self.linear_v, kv_in, t_kv)
        v, t_v = self._heads(v), self._heads(t_v)
        if not self.cross:
            q, k = apply_rope_half(q, rope_cos, rope_sin), apply_rope_half(k, rope_cos, rope_sin)
            if t_x is not None:
                t_q, t_k = apply_rope_half(t_q, rope_cos, rope_sin), apply_rope_half(t_k, rope_cos, rope_sin)
        if self.cp_attention is not None:
            o, t_o = self.cp_attention(q, k, v, t_q, t_k, t_v, shard)
        else:
            o, t_o = self.attention(q, k, v, t_q, t_k, t_v)
        o = o.flatten(-2)
        t_o = None if t_o is None else t_o.flatten(-2)
        return linear_jvp(self.linear_proj, o, t_o)
