"""Shared plumbing of the fused primal+tangent elementwise kernels (``elementwise_*.py``).

Every fused kernel reads 16-bit (or float32) activations, does its math in float32 registers and writes the
activation dtype back: no float32 copies of bf16 activations in global memory. Tangents ride in the same
kernel as their primal; the primal keeps an autograd graph through a ``torch.autograd.Function`` whose
backward differentiates the primal only (the tangent is returned detached, rcm_math.md section 3).
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def check_device(name: str, *tensors: torch.Tensor | None) -> None:
    """The kernels run on CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``)."""
    for t in tensors:
        if t is not None and not t.is_cuda and not INTERPRET:
            raise ValueError(
                f"{name}: the fused Triton kernel needs CUDA tensors (got {t.device}; CPU tensors run only "
                "under TRITON_INTERPRET=1); use model.fused_elementwise=false or auto off CUDA"
            )


def check_same_shape(name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for key, t in others.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(f"{name}: {key} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")


def block_d(D: int) -> int:
    """One row per program: the whole feature dim in registers."""
    return triton.next_power_of_2(D)


def num_warps_for(block: int) -> int:
    return 1 if INTERPRET else min(16, max(4, block // 512))


def row_chunks(rows: int, programs: int = 264) -> tuple[int, int]:
    """(rows per program, programs) for the backward reductions: ~2 waves of 132 SMs, each program
    accumulating its share of the parameter gradients in registers."""
    per = triton.cdiv(rows, min(rows, programs))
    return per, triton.cdiv(rows, per)


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def check_bias(name: str, x: torch.Tensor, bias: torch.Tensor | None) -> None:
    """A fused linear bias is one value per feature: [D] for x [..., D]."""
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(
            f"{name}: bias has shape {tuple(bias.shape)}, expected ({x.shape[-1]},) (x's last dim, x "
            f"{tuple(x.shape)})"
        )
