"""The single dispatch point for attention and its tangent.

``attention_jvp(q, k, v, t_q, t_k, t_v)`` in Megatron's layout [S, B, heads, d]:
* CUDA tensors and Triton importable: ``megatron_rcm.kernels.attention_jvp`` (one FlashAttention-style
  pass, O and dO, never materializing the S x S matrix; a warp-specialized Gluon kernel on Hopper, a
  Triton kernel elsewhere, see docs/kernels.md);
* otherwise: the float-exact PyTorch reference below, which materializes softmax(QK^T).

The primal output keeps its autograd graph; the tangent carries none. ``t_q is None`` means no tangent
(plain attention); ``t_k = t_v = None`` with ``t_q`` given means constant keys/values (cross-attention to
text): the kernel's four-product fast path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _triton_attention_jvp():
    try:
        from megatron_rcm.kernels.attention_jvp import attention_jvp
    except ImportError:
        return None
    return attention_jvp


def attention_reference(q, k, v, t_q=None, t_k=None, t_v=None, softmax_scale=None):
    """Materialized softmax attention and its JVP (rcm_math.md section 9, in closed form):
    P = softmax(Q K^T s), O = P V, dS = (dQ K^T + Q dK^T) s, dP = P (dS - rowsum(P dS)), dO = dP V + P dV.
    Inputs [S, B, N, d]; computed in float32 (float64 for float64 inputs)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    to_bn = lambda x: x.to(dt).permute(1, 2, 0, 3)  # [S, B, N, d] -> [B, N, S, d]
    from_bn = lambda x: x.permute(2, 0, 1, 3).to(q.dtype)
    qb, kb, vb = to_bn(q), to_bn(k), to_bn(v)
    p = torch.softmax(qb @ kb.transpose(-1, -2) * scale, dim=-1)
    o = from_bn(p @ vb)
    if t_q is None:
        return o, None
    with torch.no_grad():
        pd, kd = p.detach(), kb.detach()
        ds = to_bn(t_q) @ kd.transpose(-1, -2)
        if t_k is not None:
            ds = ds + qb.detach() @ to_bn(t_k).transpose(-1, -2)
        ds = ds * scale
        dp = pd * (ds - (pd * ds).sum(-1, keepdim=True))
        t_o = dp @ vb.detach()
        if t_v is not None:
            t_o = t_o + pd @ to_bn(t_v)
    return o, from_bn(t_o)


def _sdpa(q, k, v, softmax_scale):
    to_bn = lambda x: x.permute(1, 2, 0, 3)
    o = F.scaled_dot_product_attention(to_bn(q), to_bn(k), to_bn(v), scale=softmax_scale)
    return o.permute(2, 0, 1, 3)


def attention_jvp(q, k, v, t_q=None, t_k=None, t_v=None, softmax_scale=None, backend: str = "auto"):
    """Attention and its tangent, [S, B, N, d] in and out. Returns (o, t_o); t_o is None if t_q is None."""
    if (t_k is None) != (t_v is None):
        raise ValueError("t_k and t_v must both be given or both be None (constant keys and values)")
    if q.shape[1:3] != k.shape[1:3] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(expected [S, B, heads, d] with equal B and heads, and k/v of equal length)"
        )
    kernel = _triton_attention_jvp() if q.is_cuda and backend in ("auto", "triton") else None
    if backend == "triton" and kernel is None:
        raise RuntimeError("attention backend 'triton' requested but the Triton kernel needs CUDA tensors")
    if t_q is None:
        if q.dtype == torch.float64 or backend == "torch_reference":
            return attention_reference(q, k, v, softmax_scale=softmax_scale)
        return _sdpa(q, k, v, softmax_scale), None
    if kernel is not None and q.dtype in (torch.float16, torch.bfloat16):
        return kernel(q, k, v, t_q, t_k, t_v, softmax_scale=softmax_scale, layout="sbhd")
    return attention_reference(q, k, v, t_q, t_k, t_v, softmax_scale)
