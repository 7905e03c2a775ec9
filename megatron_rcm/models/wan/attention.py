"""Wan self- and cross-attention on Megatron tensor-parallel linears, with a tangent path.

Legend: S full tokens (this CP rank's tokens under context parallelism), s = S/tp this rank's tokens
(sequence parallel), L context tokens, B batch, N_tp heads on this rank, d head dim, D hidden, D_tp = N_tp * d.
Tensor parallel: q/k/v are column-parallel (heads split), the output projection row-parallel; under
sequence parallelism the column linears all-gather [s, B, D] -> [S, B, D_tp] and the row linear
reduce-scatters back to [s, B, D].
Context parallel (``config.context_parallel_size`` > 1): self-attention runs over the CP group with the
flavour of ``config.cp_comm_type`` (``megatron_rcm.parallel.cp_attention``), picked at construction;
the attention implementation (``megatron_rcm.ops.attention.attention_op``) is picked at construction too,
from ``config.attention_backend_name``;
cross-attention needs nothing (local queries, replicated text K/V).
Fused QKV (``config.fused_qkv``, self-attention only): one column-parallel ``linear_qkv`` [3 D_tp, D] per rank,
its output split locally into this rank's q, k, v (``models.fused_qkv``: one GEMM and under sequence
parallelism one all-gather instead of three; checkpoints keep the q/k/v names and shapes).
Biases: the q and k linears' biases go into the q/k RMSNorm and the output projection's (self-attention)
into the block's gated residual (``linear_jvp_split``; fused into their kernels under
``fused_elementwise``); v and the cross-attention's output add theirs (``linear_jvp``).
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.module import MegatronModule

from megatron_rcm.models import fused_qkv
from megatron_rcm.models.jvp import add_tangents, linear_jvp, linear_jvp_split
from megatron_rcm.models.tp_linears import column_linear, norm_column_linear, row_linear
from megatron_rcm.models.wan.layers import TPRMSNorm
from megatron_rcm.ops.attention import attention_op
from megatron_rcm.ops.elementwise import elementwise_ops
from megatron_rcm.parallel.collectives import tp_world_size
from megatron_rcm.parallel.cp_attention import ContextParallelAttention


class _WanAttentionBase(MegatronModule):
    def __init__(self, config, spec, query_norm: bool = False, query_linear: bool = True):
        """``query_norm``: the query linear takes the block's un-normalized x and applies the block's affine
        LayerNorm itself (the spec's ``norm_column_linear``). ``query_linear=False``: no ``linear_q`` (the
        subclass projects q itself: the fused QKV linear)."""
        super().__init__(config)
        tp = tp_world_size()
        if config.num_attention_heads % tp != 0:
            raise ValueError(
                f"num_attention_heads {config.num_attention_heads} is not divisible by tensor parallel "
                f"size {tp}; choose a TP size that divides the head count"
            )
        self.heads_per_rank = config.num_attention_heads // tp
        self.head_dim = config.head_dim
        D = config.hidden_size
        if query_linear:
            self.linear_q = (norm_column_linear if query_norm else column_linear)(spec, config, D, D)
        self.q_norm = TPRMSNorm(config, D)
        self.linear_proj = row_linear(spec, config, D, D)

    def _heads(self, x_SBD):
        return x_SBD if x_SBD is None else x_SBD.unflatten(-1, (self.heads_per_rank, self.head_dim))

    def _query(self, x, t_x):
        q, t_q, b = linear_jvp_split(self.linear_q, x, t_x)
        q, t_q = self.q_norm(q, t_q, bias=b)
        return self._heads(q), self._heads(t_q)

    def project_out(self, o_SBNd, t_o):
        """(y, t_y, b): the output projection, its bias ``b`` not added."""
        o = o_SBNd.flatten(-2)
        t_o = None if t_o is None else t_o.flatten(-2)
        return linear_jvp_split(self.linear_proj, o, t_o)

    def forward(self, *args, **kwargs):
        y, t_y, b = self.forward_split(*args, **kwargs)
        return (y if b is None else y + b), t_y


class WanSelfAttention(_WanAttentionBase):
    """x [s, B, D] -> [s, B, D]: q/k RMSNorm across heads, 3D RoPE, full (non-causal) attention."""

    def __init__(self, config, spec):
        fused = config.fused_qkv
        super().__init__(config, spec, query_linear=not fused)
        D = config.hidden_size
        if fused:  # [q_r; k_r; v_r] rows on rank r; state dicts keep the unfused names (models.fused_qkv)
            self.linear_qkv = column_linear(spec, config, D, 3 * D)
            self._register_state_dict_hook(fused_qkv.state_dict_hook)
            self.register_load_state_dict_pre_hook(fused_qkv.load_state_dict_pre_hook)
        else:
            self.linear_qkv = None
            self.linear_k = column_linear(spec, config, D, D)
            self.linear_v = column_linear(spec, config, D, D)
        self.k_norm = TPRMSNorm(config, D)
        self.attention = attention_op(config.attention_backend_name)
        self.ew = elementwise_ops(config.fused_elementwise)  # RoPE of q, k and their tangents
        cp = config.context_parallel_size
        self.cp_attention = (
            ContextParallelAttention(
                config.cp_comm_type or "p2p", cp, self.heads_per_rank, config.attention_backend_name,
                config.hierarchical_context_parallel_sizes, config.cp_a2a_head_groups,
            )
            if cp > 1
            else None
        )

    def forward_split(self, x_sBD, t_x, rope_cos, rope_sin, shard=None):
        """(y, t_y, b), the output projection's bias ``b`` not added (``forward`` adds it). ``shard`` (a
        ``TokenShard``) is required under context parallelism: which tokens this rank holds. The three
        parts ``qkv`` -> ``core`` -> ``project_out`` are called one by one by the block's selective recompute."""
        o, t_o = self.core(*self.qkv(x_sBD, t_x, rope_cos, rope_sin), shard)
        return self.project_out(o, t_o)

    def qkv(self, x_sBD, t_x, rope_cos, rope_sin):
        """(q, k, v, t_q, t_k, t_v) [S, B, N_tp, d]: the linears, q/k RMSNorm and RoPE before the core."""
        if self.linear_qkv is None:
            q, t_q = self._query(x_sBD, t_x)
            k, t_k, b_k = linear_jvp_split(self.linear_k, x_sBD, t_x)
            k, t_k = self.k_norm(k, t_k, bias=b_k)
            v, t_v = linear_jvp(self.linear_v, x_sBD, t_x)
        else:
            q, t_q, k, t_k, v, t_v = self._fused_qkv(x_sBD, t_x)
        k, t_k, v, t_v = self._heads(k), self._heads(t_k), self._heads(v), self._heads(t_v)
        q, k, t_q, t_k = self.ew.rope(q, k, t_q, t_k, rope_cos, rope_sin)
        return q, k, v, t_q, t_k, t_v

    def core(self, q, k, v, t_q, t_k, t_v, shard=None):
        """(o, t_o) [S, B, N_tp, d]: the attention op (over the CP group under context parallelism)."""
        if self.cp_attention is not None:
            return self.cp_attention(q, k, v, t_q, t_k, t_v, shard)
        return self.attention(q, k, v, t_q, t_k, t_v)

    def _fused_qkv(self, x_sBD, t_x):
        """q, t_q, k, t_k (RMS-normed, [S, B, D_tp]; q split into heads), v, t_v [S, B, D_tp] from one GEMM."""
        (q, t_q, b_q), (k, t_k, b_k), (v, t_v, b_v) = fused_qkv.split_qkv(
            *linear_jvp_split(self.linear_qkv, x_sBD, t_x)
        )
        q, t_q = self.q_norm(q, t_q, bias=b_q)
        k, t_k = self.k_norm(k, t_k, bias=b_k)
        v = v.contiguous() if b_v is None else v + b_v
        t_v = None if t_v is None else t_v.contiguous()
        return self._heads(q), self._heads(t_q), k, t_k, v, t_v

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Megatron's default; with the fused QKV linear its weight/bias become the unfused ``linear_{q,k,v}``
        checkpoint tensors (``models.fused_qkv.qkv_factory``)."""
        sharded_sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.linear_qkv is None:
            return sharded_sd
        return fused_qkv.fused_sharded_state_dict(sharded_sd, prefix, len(sharded_offsets))


class WanCrossAttention(_WanAttentionBase):
    """x [s, B, D] attends to constant context [L, B, D] (text; for I2V also CLIP image tokens, with
    their own k_img/v_img projections and key norm). Context carries no tangent: the kernel's fast path.
    With a spec that fuses norms (``spec.norm_column_linear``), x is the block's un-normalized residual and
    ``linear_q`` applies norm3 itself."""

    def __init__(self, config, spec, with_image: bool):
        super().__init__(config, spec, query_norm=spec.norm_column_linear is not None)
        D = config.hidden_size
        # Context is replicated over TP ranks, not split along the sequence.
        ctx_config = dataclasses.replace(config, sequence_parallel=False)
        self.linear_k = column_linear(spec, ctx_config, D, D)
        self.linear_v = column_linear(spec, ctx_config, D, D)
        self.k_norm = TPRMSNorm(config, D)
        self.with_image = with_image
        if with_image:
            self.linear_k_img = column_linear(spec, ctx_config, D, D)
            self.linear_v_img = column_linear(spec, ctx_config, D, D)
            self.k_img_norm = TPRMSNorm(config, D)
        self.attention = attention_op(config.attention_backend_name)

    def _attend(self, q, t_q, ctx_LBD, linear_k, linear_v, k_norm):
        k, _ = k_norm(linear_jvp(linear_k, ctx_LBD, None)[0])
        v, _ = linear_jvp(linear_v, ctx_LBD, None)
        return self.attention(q, self._heads(k), self._heads(v), t_q, None, None)

    def forward_split(self, x_sBD, t_x, context_LBD, context_img_LBD=None):
        q, t_q = self._query(x_sBD, t_x)
        o, t_o = self._attend(q, t_q, context_LBD, self.linear_k, self.linear_v, self.k_norm)
        if self.with_image:
            o_img, t_o_img = self._attend(
                q, t_q, context_img_LBD, self.linear_k_img, self.linear_v_img, self.k_img_norm
            )
            o = o + o_img
            t_o = add_tangents(t_o, t_o_img)
        return self.project_out(o, t_o)
