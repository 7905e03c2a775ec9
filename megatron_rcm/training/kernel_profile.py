"""GPU-time shares of a step by kernel class: GEMM, attention, elementwise (+ reduction + copy), NCCL.

Issue 13's target: elementwise + copy kernels at most 12% of the rCM student step's GPU time. ``classify_kernel``
sorts a CUDA kernel by its name alone (a pure function, tested on CPU with real names); ``kernel_shares``
sums the kernels of one profiled step per class; ``device_kernels`` takes them out of a ``torch.profiler``
run. The order of the checks matters: FlashAttention kernels carry ``cutlass`` in their template arguments,
so attention is recognized before GEMM; everything that is neither (PyTorch's elementwise, reduction and
norm kernels, our fused Triton elementwise kernels, optimizer kernels, memcpy / memset) is "elementwise".
Nothing here needs CUDA to import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["KERNEL_CLASSES", "PROJECT_ATTENTION_KERNELS", "classify_kernel", "device_kernels", "format_shares",
           "kernel_shares"]

KERNEL_CLASSES = ("gemm", "attention", "elementwise", "nccl")

PROJECT_ATTENTION_KERNELS = frozenset({
    "_attn_jvp_fwd", "_attn_jvp_fwd_sm90",  # kernels/attention_jvp_fwd.py (Triton), attention_jvp_fwd_sm90.py (Gluon)
    "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq",  # kernels/attention_jvp_bwd.py
})
"""The project's attention kernels (``kernels/*.py``); its other Triton kernels are elementwise chains."""

_ATTENTION = re.compile(r"flash|fmha|sdpa|attention|_attn_|attn_fwd|attn_bwd", re.IGNORECASE)
"""FlashAttention 2/3 (``flash_fwd_kernel``, ``FlashAttnFwdSm90``), memory-efficient SDPA (``fmha_cutlassF``,
``PyTorchMemEffAttention``), cuDNN SDPA (``cudnn_generated_fort_native_sdpa_*``), the project's kernels."""
_GEMM = re.compile(r"gemm|gemv|xmma|nvjet|cutlass|cublas|s16816|s1688|hmma", re.IGNORECASE)
"""cuBLAS / cuBLASLt (``sm90_xmma_gemm_*``, ``nvjet_*``, ``ampere_bf16_s16816gemm_*``, ``splitKreduce`` of
``cublasLt``), CUTLASS GEMMs (``cutlass::Kernel2<cutlass_80_wmma_tensorop_*gemm*>``)."""


def classify_kernel(name: str) -> str:
    """The class of a CUDA kernel (one of ``KERNEL_CLASSES``) from its (demangled) name."""
    if "nccl" in name.lower():
        return "nccl"
    if name in PROJECT_ATTENTION_KERNELS or _ATTENTION.search(name):
        return "attention"
    if _GEMM.search(name):
        return "gemm"
    return "elementwise"


def kernel_shares(kernels: Iterable[tuple[str, float]], top: int = 15) -> dict:
    """Per class: GPU time (ms) and share of the total; the ``top`` kernels by time. ``kernels``: (name, time
    in microseconds) per launch. Shares are of the summed kernel time (gaps between kernels are not in it)."""
    by_class = dict.fromkeys(KERNEL_CLASSES, 0.0)
    by_name: dict[str, float] = {}
    launches = 0
    for name, us in kernels:
        if us < 0:
            raise ValueError(f"kernel {name!r} has a negative time {us} us")
        by_class[classify_kernel(name)] += us
        by_name[name] = by_name.get(name, 0.0) + us
        launches += 1
    total = sum(by_class.values())
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        "kernel_ms": total / 1e3, "launches": launches,
        "ms": {k: v / 1e3 for k, v in by_class.items()},
        "share": {k: (v / total if total else 0.0) for k, v in by_class.items()},
        "top": [{"name": n, "class": classify_kernel(n), "ms": us / 1e3, "share": us / total if total else 0.0}
                for n, us in ranked],
    }


def device_kernels(events) -> list[tuple[str, float]]:
    """(name, microseconds) of each device-side event (kernel, memcpy, memset) of ``prof.events()``."""
    from torch.autograd import DeviceType

    return [(e.name, float(e.time_range.elapsed_us())) for e in events if e.device_type == DeviceType.CUDA]


def format_shares(kind: str, shares: dict, name_width: int = 90) -> str:
    """A table of one profiled step: the classes, then the top kernels."""
    lines = [f"GPU kernel time of one {kind} step: {shares['kernel_ms']:.1f} ms in {shares['launches']} launches",
             f"{'class':<14}{'ms':>12}{'share':>9}"]
    for k in KERNEL_CLASSES:
        lines.append(f"{k:<14}{shares['ms'][k]:>12.1f}{100 * shares['share'][k]:>8.1f}%")
    lines.append(f"top {len(shares['top'])} kernels:")
    for row in shares["top"]:
        name = row["name"] if len(row["name"]) <= name_width else row["name"][: name_width - 3] + "..."
        lines.append(f"  {row['ms']:>10.1f} ms {100 * row['share']:>5.1f}% {row['class']:<12}{name}")
    return "\n".join(lines)
