"""Forward-mode tangent rules for the pointwise and normalization ops of the DiTs.

Every function takes a primal ``x`` and its tangent ``t_x`` (or ``None``: no tangent wanted) and returns
``(y, t_y)``. The primal keeps its autograd graph; tangents are computed from detached primals under
``no_grad``, so the sCM step can take its gradient from the primal of the one JVP pass while the tangent
costs no activation memory.

Normalizations and the modulation run in float32 (as Wan does), or float64 when the input is float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_rcm.models.te_support import fp8_active


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def over_tokens(m):
    """A modulation term against activations [s, B, D]: per sample [B, D] -> [1, B, D] (broadcast over the
    tokens), per token [s, B, D] as it is (Wan2.2 TI2V's per-token timesteps); ``None`` stays ``None``."""
    if m is None or m.ndim == 3:
        return m
    return m[None]


def layer_norm_jvp(x, t_x, eps: float, weight=None, bias=None):
    """y = (x - mean) * rstd [* w + b]; tangent from ``layer_norm_tangent``."""
    dt = compute_dtype(x)
    xf = x.to(dt)
    y_hat = F.layer_norm(xf, xf.shape[-1:], eps=eps)
    y = y_hat if weight is None else y_hat * weight.to(dt) + bias.to(dt)
    if t_x is None:
        return y, None
    return y, layer_norm_tangent(x, t_x, eps, weight)


def layer_norm_tangent(x, t_x, eps: float, weight=None):
    """t_y = rstd * (t_x' - y_hat * mean(y_hat * t_x')) [* w], t_x' = t_x - mean(t_x), y_hat = (x - mean) * rstd;
    under ``no_grad``, in float32 (float64 for float64 inputs). The bias has no tangent."""
    dt = compute_dtype(x)
    with torch.no_grad():
        xd = x.detach().to(dt)
        mean = xd.mean(-1, keepdim=True)
        rstd = torch.rsqrt((xd - mean).pow(2).mean(-1, keepdim=True) + eps)
        yd = (xd - mean) * rstd
        t_c = t_x.to(dt) - t_x.to(dt).mean(-1, keepdim=True)
        t_y = rstd * (t_c - yd * (yd * t_c).mean(-1, keepdim=True))
        if weight is not None:
            t_y = t_y * weight.detach().to(dt)
    return t_y


def _gelu_tanh_grad(x):
    # d/dx 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3)
    c = math.sqrt(2.0 / math.pi)
    th = torch.tanh(c * (x + 0.044715 * x.pow(3)))
    return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * c * (1 + 3 * 0.044715 * x * x)


def gelu_tanh_jvp(x, t_x):
    y = F.gelu(x, approximate="tanh")
    if t_x is None:
        return y, None
    with torch.no_grad():
        xd = x.detach().to(compute_dtype(x))
        t_y = (_gelu_tanh_grad(xd) * t_x.to(xd.dtype)).to(t_x.dtype)
    return y, t_y


def gelu_jvp(x, t_x):
    """Exact (erf) GELU: dy/dx = Phi(x) + x phi(x)."""
    y = F.gelu(x)
    if t_x is None:
        return y, None
    with torch.no_grad():
        xd = x.detach().to(compute_dtype(x))
        cdf = 0.5 * (1 + torch.erf(xd / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * xd * xd) / math.sqrt(2 * math.pi)
        t_y = ((cdf + xd * pdf) * t_x.to(xd.dtype)).to(t_x.dtype)
    return y, t_y


def silu_jvp(x, t_x):
    """dy/dx = s (1 + x (1 - s)), s = sigmoid(x)."""
    y = F.silu(x)
    if t_x is None:
        return y, None
    with torch.no_grad():
        xd = x.detach().to(compute_dtype(x))
        s = torch.sigmoid(xd)
        t_y = ((s * (1 + xd * (1 - s))) * t_x.to(xd.dtype)).to(t_x.dtype)
    return y, t_y


def mul_jvp(a, t_a, b, t_b):
    """Product rule; either tangent may be None (a zero tangent)."""
    y = a * b
    if t_a is None and t_b is None:
        return y, None
    with torch.no_grad():
        t_y = 0
        if t_a is not None:
            t_y = t_a * b.detach()
        if t_b is not None:
            t_y = t_y + a.detach() * t_b
    return y, t_y


def add_tangents(*ts):
    """Sum of tangents, ``None`` standing for zero."""
    ts = [t for t in ts if t is not None]
    if not ts:
        return None
    out = ts[0]
    for t in ts[1:]:
        out = out + t
    return out


def linear_jvp(layer, x, t_x):
    """(y + b, t_y): ``linear_jvp_split`` with the bias added to the primal."""
    y, t_y, b = linear_jvp_split(layer, x, t_x)
    return (y if b is None else y + b), t_y


def linear_jvp_split(layer, x, t_x):
    """(y, t_y, b): the primal without a ``skip_bias_add`` layer's bias ``b`` (None when the layer has none or
    adds its own), for a consumer that fuses the add into its kernel (``ops/elementwise.py``: the bias-GELU
    and bias-residual fusions); the bias has no tangent.
    Tangent through a linear layer built with ``skip_bias_add=True`` (Megatron TP linears) or a plain
    ``nn.Linear``: t_y = W t_x (no bias). TP collectives are linear, so without autograd the tangent rides
    along the batch dim with its primal ([s, 2b, h]) and shares one GEMM and one collective.
    Transformer Engine linears (Megatron's TE wrappers return ``(y, b)`` too) take the same path, except inside
    an FP8 autocast region: there the tangent is its own call, so current scaling gives it its own scale
    (|t_x| and |x| can differ by orders of magnitude). A layer with its own ``forward_jvp`` runs that."""
    if hasattr(layer, "forward_jvp"):
        return (*layer.forward_jvp(x, t_x), None)
    if isinstance(layer, torch.nn.Linear):
        y = layer(x)
        if t_x is None:
            return y, None, None
        with torch.no_grad():
            return y, F.linear(t_x, layer.weight), None
    if t_x is None:
        y, b = layer(x)
        return y, None, b
    if torch.is_grad_enabled() or fp8_active():
        y, b = layer(x)
        with torch.no_grad():
            t_y, _ = layer(t_x.to(x.dtype))
    else:
        batch_dim = 1  # Megatron layout [s, b, h]
        yy, b = layer(torch.cat([x, t_x.to(x.dtype)], dim=batch_dim))
        y, t_y = yy.chunk(2, dim=batch_dim)
    return y, t_y, b


def rms_norm_jvp(x, t_x, eps: float, weight=None):
    """y = x * r [* w], r = rsqrt(mean(x^2) + eps) over the last dim; t_y = (t_x r + x t_r) [* w] with
    t_r = -r^3 mean(x t_x). Computed in float32 (float64 for float64 inputs), returned in that dtype."""
    dt = compute_dtype(x)
    xf = x.to(dt)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf * r if weight is None else xf * r * weight.to(dt)
    if t_x is None:
        return y, None
    with torch.no_grad():
        xd, rd = xf.detach(), r.detach()
        t_xf = t_x.to(dt)
        t_r = -rd.pow(3) * (xd * t_xf).mean(-1, keepdim=True)
        t_y = t_xf * rd + xd * t_r
        if weight is not None:
            t_y = t_y * weight.detach().to(dt)
    return y, t_y


def norm_linear_jvp(layer, tangent_gemm, x, t_x):
    """Tangent through a fused LayerNorm + linear ``layer`` (TE's LayerNormLinear: y = LN(x; gamma, beta) W^T
    + b, returning ``(y, b)``): t_y = t_LN(x, t_x; gamma) W^T with the LN tangent rule
    (``layer_norm_tangent``; LN is not linear, so the fused LN is never run on t_x) and the GEMM through
    ``tangent_gemm``, a linear sharing ``layer``'s weight (``(t_x W^T, None)``), under ``no_grad``."""
    y, b = layer(x)
    y = y if b is None else y + b
    if t_x is None:
        return y, None
    gamma = layer.layer_norm_weight
    if getattr(layer, "zero_centered_gamma", False):
        gamma = gamma + 1
    with torch.no_grad():
        t_h = layer_norm_tangent(x, t_x, layer.eps, gamma)
        t_y, _ = tangent_gemm(t_h.to(x.dtype))
    return y, t_y
