"""Attention and its tangent, as an implementation chosen once (``attention_op``) from the config's
``attention_backend_name`` and the device type, the way ``attention_chunks.chunk_ops`` picks ring chunks.

``op(q, k, v, t_q, t_k, t_v, softmax_scale)`` in Megatron's layout [S, B, heads, d] -> (o, t_o):

* ``TorchAttention`` ("torch"; "auto" off CUDA): PyTorch's SDPA for plain attention (the reference for
  float64), the float-exact PyTorch reference (``kernels/attention_jvp_reference.py``, which materializes
  softmax(QK^T)) for attention with a tangent;
* ``KernelAttention`` ("triton"; "auto" on CUDA with Triton importable): ``megatron_rcm.kernels.attention_jvp``
  for 16-bit CUDA tensors with a tangent (one FlashAttention-style pass, O and dO, never materializing the
  S x S matrix; a warp-specialized Gluon kernel on Hopper, a Triton kernel elsewhere, see docs/kernels.md),
  the PyTorch path otherwise ("auto": also for CPU tensors; "triton" refuses those).

The primal output keeps its autograd graph; the tangent carries none. ``t_q is None`` means no tangent
(plain attention); ``t_k = t_v = None`` with ``t_q`` given means constant keys/values (cross-attention to
text): the kernel's four-product fast path.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from megatron_rcm.kernels.attention_jvp_reference import attention_jvp_torch

ATTENTION_BACKENDS = ("auto", "torch", "triton")
"""Names ``attention_backend_name`` accepts (Wan and Cosmos configs), see ``attention_op``."""

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionOp",
    "KernelAttention",
    "SDPA_PREFERENCES",
    "TorchAttention",
    "attention_op",
    "attention_reference",
    "check_attention_backend",
    "sdpa_preference",
    "set_sdpa_preference",
]


@functools.cache
def _triton_attention_jvp():
    try:
        from megatron_rcm.kernels.attention_jvp import attention_jvp
    except ImportError:
        return None
    return attention_jvp


def check_attention_backend(name: str, where: str = "attention_backend_name") -> str:
    """``name`` if it is a known attention backend, else a ValueError naming ``where`` and the choices."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"{where}: unknown attention backend {name!r}; expected one of {ATTENTION_BACKENDS}")
    return name


def attention_reference(q, k, v, t_q=None, t_k=None, t_v=None, softmax_scale=None):
    """Materialized softmax attention and its JVP (rcm_math.md section 9), [S, B, N, d] in and out, computed
    in float32 (float64 for float64 inputs): ``kernels/attention_jvp_reference.attention_jvp_torch``."""
    return attention_jvp_torch(q, k, v, t_q, t_k, t_v, softmax_scale=softmax_scale, layout="sbhd")


SDPA_PREFERENCES = ("cudnn", "flash")
"""Which fused kernel PyTorch's SDPA tries first on CUDA for attention without a tangent (``set_sdpa_preference``):
"cudnn" (the default; on an H200 cuDNN's Hopper kernels beat FlashAttention-2, docs/benchmarks.md) or "flash"
(PyTorch's own order here). Each falls back to the next kernel that supports the inputs."""
_sdpa_preference = "cudnn"


def set_sdpa_preference(name: str) -> None:
    """Pick the SDPA kernel order for CUDA (``SDPA_PREFERENCES``); benchmarks compare the two."""
    global _sdpa_preference
    if name not in SDPA_PREFERENCES:
        raise ValueError(f"unknown SDPA preference {name!r}; expected one of {SDPA_PREFERENCES}")
    _sdpa_preference = name


def _sdpa_order():
    from torch.nn.attention import SDPBackend

    first = [SDPBackend.CUDNN_ATTENTION] if _sdpa_preference == "cudnn" else []
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return first + rest


def sdpa_preference():
    """The context in which SDPA (and ``torch._fused_sdp_choice``) follows ``set_sdpa_preference`` on CUDA."""
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(_sdpa_order(), set_priority=True)


def _sdpa(q, k, v, softmax_scale):
    to_bn = lambda x: x.permute(1, 2, 0, 3)
    with sdpa_preference() if q.is_cuda else contextlib.nullcontext():
        o = F.scaled_dot_product_attention(to_bn(q), to_bn(k), to_bn(v), scale=softmax_scale)
    return o.permute(2, 0, 1, 3)


def _check(q, k, v, t_q, t_k, t_v):
    if (t_k is None) != (t_v is None):
        raise ValueError("t_k and t_v must both be given or both be None (constant keys and values)")
    if q.shape[1:3] != k.shape[1:3] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(expected [S, B, heads, d] with equal B and heads, and k/v of equal length)"
        )


class AttentionOp:
    """Interface: ``op(q, k, v, t_q=None, t_k=None, t_v=None, softmax_scale=None) -> (o, t_o)``."""

    name = "abstract"

    def __call__(self, q, k, v, t_q=None, t_k=None, t_v=None, softmax_scale=None):
        raise NotImplementedError(f"{type(self).__name__}.__call__")

    def __repr__(self):
        return f"{type(self).__name__}()"


class TorchAttention(AttentionOp):
    """SDPA for plain attention (the reference for float64), the PyTorch reference for the JVP."""

    name = "torch"

    def __call__(self, q, k, v, t_q=None, t_k=None, t_v=None, softmax_scale=None):
        _check(q, k, v, t_q, t_k, t_v)
        if t_q is None and q.dtype != torch.float64:
            return _sdpa(q, k, v, softmax_scale), None
        return attention_reference(q, k, v, t_q, t_k, t_v, softmax_scale)


class KernelAttention(TorchAttention):
    """The attention-JVP kernel for 16-bit CUDA tensors with a tangent, the PyTorch path otherwise.
    ``strict`` (backend "triton"): CPU tensors are an error instead of a fallback."""

    name = "triton"

    def __init__(self, kernel, strict: bool):
        self.kernel, self.strict = kernel, strict

    def __call__(self, q, k, v, t_q=None, t_k=None, t_v=None, softmax_scale=None):
        _check(q, k, v, t_q, t_k, t_v)
        if not q.is_cuda:
            if self.strict:
                raise RuntimeError(
                    f"attention backend 'triton' requested but the Triton kernel needs CUDA tensors "
                    f"(got {q.device}); use 'auto' or 'torch' on CPU"
                )
            return super().__call__(q, k, v, t_q, t_k, t_v, softmax_scale)
        if t_q is not None and q.dtype in (torch.float16, torch.bfloat16):
            return self.kernel(q, k, v, t_q, t_k, t_v, softmax_scale=softmax_scale, layout="sbhd")
        return super().__call__(q, k, v, t_q, t_k, t_v, softmax_scale)

    def __repr__(self):
        return f"KernelAttention(strict={self.strict})"


def default_device_type() -> str:
    """The device type models run on when none is given: "cuda" where CUDA is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def attention_op(backend: str, device_type: str | None = None) -> AttentionOp:
    """The attention implementation for a backend name and device type (default: ``default_device_type``):
    "torch" -> PyTorch; "triton" -> the kernel (raises if Triton is not importable); "auto" -> the kernel on
    CUDA when Triton is importable (PyTorch for CPU tensors), PyTorch elsewhere."""
    check_attention_backend(backend)
    device_type = default_device_type() if device_type is None else device_type
    if backend == "torch" or (backend == "auto" and device_type != "cuda"):
        return TorchAttention()
    kernel = _triton_attention_jvp()
    if kernel is None:
        if backend == "triton":
            raise RuntimeError(
                "attention backend 'triton' requested but megatron_rcm.kernels.attention_jvp is not importable "
                "(Triton missing?); use 'auto' or 'torch'"
            )
        return TorchAttention()
    return KernelAttention(kernel, strict=backend == "triton")
