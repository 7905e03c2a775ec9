"""Attention JVP: softmax attention and its forward-mode derivative in one FlashAttention-style pass.

rcm_math.md section 9. ``attention_jvp`` returns O = softmax(Q K^T * scale) V and its tangent
dO along (dQ, dK, dV), and optionally LSE = logsumexp(Q K^T * scale) and dLSE = r / l (the
tangent of LSE, which ring context parallelism needs to merge partial results).

Shape legend (layout "sbhd", Megatron's order; "bshd" swaps the first two axes):
    q, t_q: [Sq, B, H, Dqk]    k, t_k: [Skv, B, H, Dqk]    v, t_v: [Skv, B, H, Dv]
    o, t_o: [Sq, B, H, Dv]     lse, t_lse: [B, H, Sq] float32

Autograd: o (and lse) are differentiable w.r.t. q, k, v through a backward that reuses the saved
O and LSE: cuDNN's fused attention backward where it applies (``attention_bwd_cudnn.py``: Hopper,
bf16/fp16, head dim 64 or 128, no LSE gradient), else the FlashAttention-2 backward in Triton
(``attention_jvp_bwd.py``). t_o and t_lse are returned detached: the JVP's
tangent carries no gradient (rCM's sCM loss uses it under stop-gradient, rcm_math.md section 3),
and the tangents t_q, t_k, t_v receive none.

Forward kernels: ``attention_jvp_fwd_sm90.py`` (Gluon, warp-specialized, Hopper, tangents for K and V)
and ``attention_jvp_fwd.py`` (Triton, every other case and the CPU interpreter). Backward:
``attention_bwd_cudnn.py`` and ``attention_jvp_bwd.py``. A pure-PyTorch reference with the same
signature: ``attention_jvp_reference.py``.
"""

from __future__ import annotations

import torch

from megatron_rcm.kernels.attention_bwd_cudnn import cudnn_attn_bwd, cudnn_bwd_supported
from megatron_rcm.kernels.attention_jvp_bwd import attn_bwd_launch
from megatron_rcm.kernels.attention_jvp_fwd import INTERPRET, attn_jvp_fwd_launch
from megatron_rcm.kernels.attention_jvp_fwd_sm90 import attn_jvp_fwd_sm90_launch, sm90_applies
from megatron_rcm.kernels.attention_jvp_reference import AttnDims, attention_jvp_torch, check_inputs

__all__ = ["AttentionJVPFunction", "attention_jvp", "attention_jvp_torch"]


def _strides(x: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, head, seq, feature) strides of a 4-D tensor in ``layout``."""
    if layout == "sbhd":
        return x.stride(1), x.stride(2), x.stride(0), x.stride(3)
    return x.stride(0), x.stride(2), x.stride(1), x.stride(3)


def _out_shape(q: torch.Tensor, dims: AttnDims) -> tuple[int, ...]:
    return (*q.shape[:3], dims.head_dim_v)


class AttentionJVPFunction(torch.autograd.Function):
    """(o, t_o, lse, t_lse) = attention JVP; gradients flow from o and lse to q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, t_q, t_k, t_v, dims: AttnDims, layout: str, backward: str = "auto",
                forward_impl: str = "auto"):
        o = q.new_empty(_out_shape(q, dims))
        t_o = torch.empty_like(o)
        lse = q.new_empty((dims.batch, dims.heads, dims.seqlen_q), dtype=torch.float32)
        t_lse = torch.empty_like(lse)
        s = lambda x: _strides(x, layout) if x is not None else None
        args = (q, k, v, t_q, t_k, t_v, o, t_o, lse, t_lse, dims, s(q), s(k), s(v), s(t_q), s(t_k), s(t_v), s(o), s(t_o))
        # "auto" keeps the dK = dV = 0 path on the Triton kernel: with 512 keys the warp-specialized kernel's
        # per-program setup dominates and it measured slower (docs/benchmarks.md)
        wanted = forward_impl == "sm90" or (forward_impl == "auto" and t_k is not None)
        use_sm90 = wanted and sm90_applies(q, k, v, t_q, t_k, t_v, dims, (s(q), s(t_q), s(k), s(t_k), s(v), s(t_v)))
        if forward_impl == "sm90" and not use_sm90:
            raise ValueError(
                "attention_jvp(forward='sm90'): the Hopper kernel does not apply here (it needs Triton 3.6's Gluon, CUDA sm_9x, "
                f"bf16/fp16, Dqk = Dv in (64, 128), TMA-readable strides; got {q.dtype} on {q.device}, "
                f"Dqk={dims.head_dim_qk}, Dv={dims.head_dim_v})"
            )
        (attn_jvp_fwd_sm90_launch if use_sm90 else attn_jvp_fwd_launch)(*args)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.dims, ctx.layout, ctx.backward_impl = dims, layout, backward
        ctx.mark_non_differentiable(t_o, t_lse)
        ctx.set_materialize_grads(False)  # an unused lse gives None, not zeros: the cuDNN path stays open
        return o, t_o, lse, t_lse

    @staticmethod
    def backward(ctx, grad_o, grad_t_o, grad_lse, grad_t_lse):
        q, k, v, o, lse = ctx.saved_tensors
        dims, layout = ctx.dims, ctx.layout
        if grad_o is None:
            grad_o = torch.zeros_like(o)
        use_cudnn = ctx.backward_impl != "triton" and cudnn_bwd_supported(q, dims, grad_lse is not None)
        if ctx.backward_impl == "cudnn" and not use_cudnn:
            raise ValueError(
                "attention_jvp(backward='cudnn'): cuDNN's attention backward does not apply here (it needs CUDA "
                f"sm90+, bf16/fp16, Dqk = Dv in (64, 128), no LSE gradient; got {q.dtype} on {q.device}, "
                f"Dqk={dims.head_dim_qk}, Dv={dims.head_dim_v}, LSE gradient: {grad_lse is not None})"
            )
        if use_cudnn:
            return (*cudnn_attn_bwd(q, k, v, o, grad_o, lse, dims, layout), None, None, None, None, None, None, None)
        if grad_lse is not None:
            grad_lse = grad_lse.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        tensors = {"q": q, "k": k, "v": v, "o": o, "do": grad_o, "dq": dq, "dk": dk, "dv": dv}
        strides = {name: _strides(x, layout) for name, x in tensors.items()}
        attn_bwd_launch(q, k, v, o, grad_o, lse, grad_lse, dq, dk, dv, dims, strides)
        return dq, dk, dv, None, None, None, None, None, None, None


def attention_jvp(q, k, v, t_q, t_k=None, t_v=None, softmax_scale=None, layout="sbhd", return_lse=False,
                  backward="auto", forward="auto"):
    """Attention and its JVP in one FlashAttention-style pass (rcm_math.md section 9).

    Args:
        q, k, v: [Sq, B, H, Dqk], [Skv, B, H, Dqk], [Skv, B, H, Dv] in layout "sbhd"
            ([B, S, H, D] in "bshd"); bf16 or fp16 (float32 runs exact, slow products for checks).
            Any strides with a unit feature stride are read in place, no copies.
        t_q, t_k, t_v: tangents, shaped like q, k, v. t_k = t_v = None means constant K/V
            (cross-attention to fixed text): the four-product fast path.
        softmax_scale: multiplies Q K^T; default 1/sqrt(Dqk).
        layout: "sbhd" (Megatron) or "bshd".
        return_lse: also return lse and t_lse, float32 [B, H, Sq].
        backward: "auto" (cuDNN's attention backward where it applies, else Triton), "triton", or
            "cudnn" (ValueError in backward where it does not apply).
        forward: "auto" (the warp-specialized Gluon kernel ``attention_jvp_fwd_sm90.py`` on Hopper when t_k
            and t_v are given, else the Triton kernel), "triton", or "sm90" (ValueError where it does not
            apply).

    Returns:
        (o, t_o) or (o, t_o, lse, t_lse); o and t_o in q's layout and dtype. o and lse are
        differentiable w.r.t. q, k, v; t_o and t_lse are detached.
    """
    dims = check_inputs(q, k, v, t_q, t_k, t_v, softmax_scale, layout)
    if backward not in ("auto", "triton", "cudnn"):
        raise ValueError(f"attention_jvp: backward must be 'auto', 'triton' or 'cudnn', got {backward!r}")
    if forward not in ("auto", "triton", "sm90"):
        raise ValueError(f"attention_jvp: forward must be 'auto', 'triton' or 'sm90', got {forward!r}")
    if not q.is_cuda and not INTERPRET:
        raise ValueError(
            f"attention_jvp: the Triton kernel needs CUDA tensors (got device {q.device}); set "
            "TRITON_INTERPRET=1 before importing triton to run it on the CPU, or call attention_jvp_torch"
        )
    o, t_o, lse, t_lse = AttentionJVPFunction.apply(q, k, v, t_q, t_k, t_v, dims, layout, backward, forward)
    if return_lse:
        return o, t_o, lse, t_lse
    return o, t_o
