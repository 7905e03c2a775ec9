"""The elementwise chains of the Wan block with their tangents, as an implementation chosen once
(``elementwise_ops``) from the config's ``fused_elementwise``, the way ``ops/attention.py`` picks attention.

Each method takes primals and tangents (``None`` = zero tangent) and returns ``(out, t_out)`` in the
activation dtype (the block's dtype), the primal keeping its autograd graph, the tangent detached:

* ``modulated_layer_norm``  LN(x) * (1 + scale) + shift        (norm1 / norm2 + adaLN modulation)
* ``affine_layer_norm``     LN(x) * w + b                      (norm3, before cross-attention)
* ``gated_residual``        x + gate * (y + b)                 (after self-attention and the FFN)
* ``rope``                  3D RoPE of q and k                 (self-attention)
* ``rms_norm``              q/k RMSNorm of (x + b) across heads (TP: sums all-reduced over the TP group)
* ``gelu_tanh``             GELU(tanh) of (x + b)              (FFN activation)

``b`` (``bias=``, optional) is the bias of the linear before the chain, which Megatron's linears return
un-added (``skip_bias_add``; ``models.jvp.linear_jvp_split``); it has no tangent. The reference adds it
first, ``y + b`` in the activation dtype as ``linear_jvp`` does, then runs the chain: exactly the former
code. The kernels add it in float32 in registers and return its gradient (Megatron's bias-GELU and
bias-dropout-add fusions): no broadcast add over the activations, forward or backward.

``TorchElementwise`` is the reference: the PyTorch rules of ``models/jvp.py``, float32 (float64 for float64
inputs) math, exactly the block's unfused code. ``FusedElementwise`` runs the Triton kernels of
``megatron_rcm.kernels.elementwise_*`` (one kernel computing primal and tangent per chain, docs/kernels.md)
where they apply: "auto" takes them for CUDA bf16/fp16 tensors and the reference otherwise (float32/float64
parity runs stay on the reference); "true" takes them for every tensor (CPU only under TRITON_INTERPRET=1).
The modulation (shift, scale, gate) is [B, D], or [s, B, D] per token (Wan2.2 TI2V's per-token timesteps,
``models.jvp.over_tokens``); the kernels take [B, D] only, so per-token modulation runs on the reference.
"""

from __future__ import annotations

import functools

import torch

from megatron_rcm.models.jvp import (
    add_tangents,
    compute_dtype,
    gelu_tanh_jvp,
    layer_norm_jvp,
    mul_jvp,
    over_tokens,
)
from megatron_rcm.parallel.collectives import all_reduce_sum_tp, tp_world_size

FUSED_ELEMENTWISE = ("auto", True, False)
"""Values ``fused_elementwise`` accepts (``model.fused_elementwise`` in the run config)."""

__all__ = [
    "FUSED_ELEMENTWISE",
    "FusedElementwise",
    "TorchElementwise",
    "check_fused_elementwise",
    "elementwise_ops",
]


def check_fused_elementwise(value, where: str = "fused_elementwise"):
    """``value`` ("auto", True or False; the strings "true"/"false" too) normalized, else a ValueError."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value not in FUSED_ELEMENTWISE or (value != "auto" and not isinstance(value, bool)):
        raise ValueError(f"{where}: expected one of 'auto', true, false; got {value!r}")
    return value


@functools.cache
def _kernels():
    """The kernel entry points, or None where Triton does not import."""
    try:
        from megatron_rcm.kernels.elementwise_gate import gated_residual_jvp_fused
        from megatron_rcm.kernels.elementwise_gelu import gelu_tanh_jvp_fused
        from megatron_rcm.kernels.elementwise_layer_norm import layer_norm_jvp_fused
        from megatron_rcm.kernels.elementwise_rms_norm import rms_norm_jvp_fused
        from megatron_rcm.kernels.elementwise_rope import rope_jvp_fused
    except ImportError:
        return None
    return dict(layer_norm=layer_norm_jvp_fused, gate=gated_residual_jvp_fused, rope=rope_jvp_fused,
                rms_norm=rms_norm_jvp_fused, gelu=gelu_tanh_jvp_fused)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _add_bias(y, bias):
    """y + b as ``models.jvp.linear_jvp`` adds a ``skip_bias_add`` linear's bias (the reference)."""
    return y if bias is None else y + bias


class TorchElementwise:
    """The reference chains in PyTorch (``models/jvp.py`` rules), float32 math, out in x's dtype."""

    fused = False

    def modulated_layer_norm(self, x, t_x, eps, shift, t_shift, scale, t_scale):
        cdt = compute_dtype(x)
        h, t_h = layer_norm_jvp(x, t_x, eps)
        h, t_h = mul_jvp(h, t_h, 1 + over_tokens(scale.to(cdt)), over_tokens(_cast(t_scale, cdt)))
        h, t_h = h + over_tokens(shift.to(cdt)), add_tangents(t_h, over_tokens(_cast(t_shift, cdt)))
        return h.to(x.dtype), _cast(t_h, x.dtype)

    def affine_layer_norm(self, x, t_x, eps, weight, bias):
        h, t_h = layer_norm_jvp(x, t_x, eps, weight, bias)
        return h.to(x.dtype), _cast(t_h, x.dtype)

    def gated_residual(self, x, t_x, y, t_y, gate, t_gate, bias=None):
        dtype, cdt = x.dtype, compute_dtype(x)
        y = _add_bias(y, bias)
        y, t_y = mul_jvp(y.to(cdt), _cast(t_y, cdt), over_tokens(gate.to(cdt)), over_tokens(_cast(t_gate, cdt)))
        return (x.to(cdt) + y).to(dtype), _cast(add_tangents(t_x, t_y), dtype)

    def rope(self, q, k, t_q, t_k, cos, sin):
        from megatron_rcm.models.wan.rope import apply_rope

        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if t_q is not None:
            t_q, t_k = apply_rope(t_q, cos, sin), apply_rope(t_k, cos, sin)
        return q, k, t_q, t_k

    def rms_norm(self, x, t_x, weight, eps, hidden_size, bias=None):
        """y = x * rsqrt(sum_tp(sum x^2) / D + eps) * w, x <- x + bias, D = ``hidden_size`` (``TPRMSNorm``)."""
        x = _add_bias(x, bias)
        dt = compute_dtype(x)
        xf = x.to(dt)
        ss = all_reduce_sum_tp(xf.pow(2).sum(-1, keepdim=True))
        r = torch.rsqrt(ss / hidden_size + eps)
        w = weight.to(dt)
        y = (xf * r * w).to(x.dtype)
        if t_x is None:
            return y, None
        with torch.no_grad():
            # d r = -r^3 * sum_tp(x t_x) / D
            xd, rd = xf.detach(), r.detach()
            t_xf = t_x.to(dt)
            s_xt = all_reduce_sum_tp((xd * t_xf).sum(-1, keepdim=True))
            t_r = -rd.pow(3) * s_xt / hidden_size
            t_y = ((t_xf * rd + xd * t_r) * w.detach()).to(t_x.dtype)
        return y, t_y

    def gelu_tanh(self, x, t_x, bias=None):
        return gelu_tanh_jvp(_add_bias(x, bias), t_x)


def _tp_all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """In-place float32 sum over the TP group (the fused RMSNorm's statistics; no autograd)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.all_reduce(t, group=parallel_state.get_tensor_model_parallel_group())
    return t


class FusedElementwise(TorchElementwise):
    """The Triton kernels where they apply (see the module docstring), the reference elsewhere."""

    fused = True

    def __init__(self, always: bool):
        self.always = always
        self.k = _kernels()
        if self.k is None:
            raise ValueError(
                "fused_elementwise: the fused Triton kernels need triton, which does not import here; "
                "use fused_elementwise=false (or auto)"
            )

    def _applies(self, x, bias=None) -> bool:
        """Kernels for this input; a bias of another dtype (where the reference's y + b would promote)
        stays on the reference."""
        if bias is not None and bias.dtype != x.dtype:
            return False
        return self.always or (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16))

    def modulated_layer_norm(self, x, t_x, eps, shift, t_shift, scale, t_scale):
        if not self._applies(x) or shift.ndim != 2:  # the kernels take [B, D]; per token: the reference
            return super().modulated_layer_norm(x, t_x, eps, shift, t_shift, scale, t_scale)
        return self.k["layer_norm"](x, t_x, eps, scale_BD=scale, shift_BD=shift, t_scale_BD=t_scale,
                                    t_shift_BD=t_shift)

    def affine_layer_norm(self, x, t_x, eps, weight, bias):
        if not self._applies(x):
            return super().affine_layer_norm(x, t_x, eps, weight, bias)
        return self.k["layer_norm"](x, t_x, eps, weight=weight, bias=bias)

    def gated_residual(self, x, t_x, y, t_y, gate, t_gate, bias=None):
        if not self._applies(x, bias) or gate.ndim != 2:  # the kernel takes [B, D]; per token: the reference
            return super().gated_residual(x, t_x, y, t_y, gate, t_gate, bias)
        return self.k["gate"](x, t_x, y, t_y, gate, t_gate, bias)

    def rope(self, q, k, t_q, t_k, cos, sin):
        if not self._applies(q):
            return super().rope(q, k, t_q, t_k, cos, sin)
        return self.k["rope"](q, k, t_q, t_k, cos, sin)

    def rms_norm(self, x, t_x, weight, eps, hidden_size, bias=None):
        if not self._applies(x, bias):
            return super().rms_norm(x, t_x, weight, eps, hidden_size, bias)
        all_reduce = _tp_all_reduce_ if tp_world_size() > 1 else None
        return self.k["rms_norm"](x, t_x, weight, eps, hidden_size, all_reduce, bias)

    def gelu_tanh(self, x, t_x, bias=None):
        if not self._applies(x, bias):
            return super().gelu_tanh(x, t_x, bias)
        return self.k["gelu"](x, t_x, bias)


def elementwise_ops(fused_elementwise) -> TorchElementwise:
    """The implementation for ``fused_elementwise`` ("auto", True, False): picked once, at construction.
    "auto" without Triton falls back to the reference; True without Triton is an error."""
    mode = check_fused_elementwise(fused_elementwise)
    if mode is False or (mode == "auto" and _kernels() is None):
        return TorchElementwise()
    return FusedElementwise(always=mode is True)
