"""Backward of attention's primal output O through cuDNN's fused attention backward, fed the JVP
forward's own O and LSE (no second forward).

``aten::_scaled_dot_product_cudnn_attention_backward`` (the kernel behind torch SDPA's cuDNN
backend) takes (dO, Q, K, V, O, LSE) as [B, H, S, D] tensors with any strides, and LSE as float32
[B, H, Sq, 1] in natural log: the forward's LSE with a unit axis appended. It rebuilds
P = exp(S * scale - LSE) tile by tile and returns dQ, dK, dV (rcm_math.md section 9) with the same
math as the Triton backward, ``attention_jvp_bwd.py``:

    Delta = rowsum(dO * O),  dV = P^T dO,  dS = P * (dO V^T - Delta),  dQ = dS K * scale,  dK = dS^T Q * scale

It has no input for an LSE gradient (Delta - dLSE), so a backward that receives one, and every
case outside ``cudnn_bwd_supported``, goes to the Triton backward.

Shape legend as in ``attention_jvp.py``: q [Sq, B, H, Dqk] in layout "sbhd", [B, Sq, H, Dqk] in "bshd".
"""

from __future__ import annotations

import torch

from megatron_rcm.kernels.attention_jvp_reference import AttnDims


def cudnn_bwd_supported(q: torch.Tensor, dims: AttnDims, has_grad_lse: bool) -> bool:
    """Whether the cuDNN backward applies: CUDA Hopper or newer, bf16/fp16, Dqk = Dv in (64, 128), no LSE
    gradient, and torch's cuDNN attention backend present and enabled (``torch.backends.cuda.enable_cudnn_sdp``)."""
    if has_grad_lse or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if dims.head_dim_qk != dims.head_dim_v or dims.head_dim_qk not in (64, 128):
        return False
    if not hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward"):
        return False
    if not (torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled()):
        return False
    return torch.cuda.get_device_capability(q.device) >= (9, 0)


def _bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A [B, H, S, D] view of a tensor in ``layout`` (no copy)."""
    return x.permute(1, 2, 0, 3) if layout == "sbhd" else x.permute(0, 2, 1, 3)


def _from_bhsd(x_bhsd: torch.Tensor, layout: str) -> torch.Tensor:
    """Back from [B, H, S, D] to ``layout`` (a view; autograd accepts any strides)."""
    return x_bhsd.permute(2, 0, 1, 3) if layout == "sbhd" else x_bhsd.permute(0, 2, 1, 3)


def cudnn_attn_bwd(q, k, v, o, grad_o, lse_bhs: torch.Tensor, dims: AttnDims, layout: str):
    """(dQ, dK, dV) of O = softmax(Q K^T * scale) V, in ``layout``, from the saved O and LSE [B, H, Sq]."""
    q_, k_, v_, o_, do_ = (_bhsd(x, layout) for x in (q, k, v, o, grad_o))
    if do_.stride() != o_.stride():  # cuDNN reads dO with O's strides
        do_ = torch.empty_like(o_).copy_(do_)
    no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed/offset, unused at p = 0
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do_, q_, k_, v_, o_, lse_bhs.unsqueeze(-1), no_dropout, no_dropout, None, None, None,
        dims.seqlen_q, dims.seqlen_kv, 0.0, False, scale=dims.softmax_scale,
    )
    return tuple(_from_bhsd(g, layout) for g in (dq, dk, dv))
