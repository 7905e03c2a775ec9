"""Attention over one chunk of keys, with the log-sum-exp, its tangent and an explicit backward: the pieces
that ring context parallelism (``megatron_rcm.parallel.cp_attention``) assembles.

Legend (Megatron layout): q, t_q [Sq, B, N, d]; k, v, t_k, t_v [Skv, B, N, d]; o, t_o [Sq, B, N, d];
lse, t_lse [B, N, Sq] float32 (float64 for float64 inputs).

    forward(q, k, v, t_q, t_k, t_v) -> (o, t_o, lse, t_lse)     no autograd graph (t_* None: no tangent)
    backward(q, k, v, o, lse, do)   -> (dq, dk, dv)             FlashAttention-2 backward given O and LSE
    merge_partials(a, b)            -> partial result over the union of two disjoint key sets
    PartialSum().add(p) ... .result() -> the same over any number of chunks, folded in place into float32
                                       accumulators and normalized once (what the ring uses)

Two implementations, chosen once from the attention backend (``chunk_ops``): the PyTorch one (float-exact,
materializes the Sq x Skv matrix; CPU and checks) and the kernel one (``megatron_rcm.kernels``: the
Triton/Gluon attention JVP forward, the Triton or cuDNN backward; CUDA, or the Triton interpreter on CPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from megatron_rcm.kernels.attention_jvp_reference import attention_jvp_bhsd
from megatron_rcm.ops.attention import check_attention_backend, sdpa_preference

__all__ = ["ChunkOps", "Partial", "PartialSum", "chunk_ops", "merge_partials", "sdpa_with_lse"]


class Partial(NamedTuple):
    """Attention of the queries over a subset of the keys, normalized over that subset. lse, t_lse float32
    (float64 for float64 inputs); o, t_o in the chunk implementation's output dtype (the kernels: q's 16-bit
    dtype, no float32 copy; the merges compute in float32)."""

    o: torch.Tensor
    t_o: torch.Tensor | None
    lse: torch.Tensor
    t_lse: torch.Tensor | None


def _bhsd(x):
    return x.permute(1, 2, 0, 3)


def _sbhd(x):
    return x.permute(2, 0, 1, 3)


def _cdt(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def merge_partials(a: Partial, b: Partial) -> Partial:
    """Attention over the union of two disjoint key sets from the partial results over each (float32).

        lse = log(e^lse_a + e^lse_b),  w_a = e^(lse_a - lse),  w_b = e^(lse_b - lse)
        o   = w_a o_a + w_b o_b
    and their tangents (d w_a = w_a (t_lse_a - t_lse), since d lse = w_a t_lse_a + w_b t_lse_b):
        t_lse = w_a t_lse_a + w_b t_lse_b
        t_o   = w_a (t_o_a + (t_lse_a - t_lse) o_a) + w_b (t_o_b + (t_lse_b - t_lse) o_b)
    o, t_o are [Sq, B, N, d]; lse, t_lse [B, N, Sq].
    """
    lse = torch.logaddexp(a.lse, b.lse)
    w_a = _sbhd(torch.exp(a.lse - lse)[..., None])  # [Sq, B, N, 1]
    w_b = _sbhd(torch.exp(b.lse - lse)[..., None])
    o = w_a * a.o + w_b * b.o
    if a.t_o is None:
        return Partial(o, None, lse, None)
    t_lse = _bhsd(w_a)[..., 0] * a.t_lse + _bhsd(w_b)[..., 0] * b.t_lse
    d_a = _sbhd((a.t_lse - t_lse)[..., None])
    d_b = _sbhd((b.t_lse - t_lse)[..., None])
    t_o = w_a * (a.t_o + d_a * a.o) + w_b * (b.t_o + d_b * b.o)
    return Partial(o, t_o, lse, t_lse)


class PartialSum:
    """Partial results of disjoint key chunks folded into unnormalized float32 accumulators, normalized once.

    ``merge_partials`` applied chunk after chunk, rewritten so that each chunk costs a few in-place passes over
    [Sq, B, N, d] and no new tensors: with m the running maximum of the chunks' lse and w_i = e^(lse_i - m),

        l = sum_i w_i,   O~ = sum_i w_i o_i,   L~ = sum_i w_i t_lse_i,   T~ = sum_i w_i (t_o_i + t_lse_i o_i)
        lse = m + log l,   o = O~ / l,   t_lse = L~ / l,   t_o = T~ / l - t_lse o

    (t_o = sum_i (w_i / l) (t_o_i + (t_lse_i - t_lse) o_i), merge_partials' formula over all chunks at once).
    A chunk that raises m rescales the accumulators by e^(m_old - m_new) <= 1, so nothing overflows.
    """

    def __init__(self):
        self.m = None

    def add(self, part: Partial) -> None:
        cdt = torch.float64 if part.lse.dtype == torch.float64 else torch.float32
        lse = part.lse.to(cdt)
        if self.m is None:
            self.m, self.l = lse.clone(), torch.ones_like(lse)
            self.acc_o = part.o.to(cdt, copy=True)
            if part.t_o is not None:
                self.acc_tl = part.t_lse.to(cdt, copy=True)
                self.acc_t = part.t_o.to(cdt, copy=True).addcmul_(_sbhd(self.acc_tl[..., None]), part.o)
            return
        m_new = torch.maximum(self.m, lse)
        alpha, beta = torch.exp(self.m - m_new), torch.exp(lse - m_new)  # [B, N, Sq]
        alpha_o, beta_o = _sbhd(alpha[..., None]), _sbhd(beta[..., None])  # [Sq, B, N, 1] views
        self.l.mul_(alpha).add_(beta)
        self.acc_o.mul_(alpha_o).addcmul_(beta_o, part.o)
        if part.t_o is not None:
            self.acc_tl.mul_(alpha).addcmul_(beta, part.t_lse)
            self.acc_t.mul_(alpha_o).addcmul_(beta_o, part.t_o)
            self.acc_t.addcmul_(_sbhd((beta * part.t_lse)[..., None]), part.o)
        self.m = m_new

    def result(self) -> Partial:
        """The attention over all chunks added (float32; the accumulators are reused, call once)."""
        if self.m is None:
            raise ValueError("PartialSum.result: no chunk was added")
        r = 1.0 / self.l
        lse = self.m + torch.log(self.l)
        o = self.acc_o.mul_(_sbhd(r[..., None]))
        if not hasattr(self, "acc_t"):
            return Partial(o, None, lse, None)
        t_lse = self.acc_tl.mul_(r)
        t_o = self.acc_t.mul_(_sbhd(r[..., None])).addcmul_(_sbhd(t_lse[..., None]), o, value=-1.0)
        return Partial(o, t_o, lse, t_lse)


class ChunkOps:
    """Interface: ``forward`` and ``backward`` of attention over one key chunk (see the module docstring)."""

    name = "abstract"

    def forward(self, q, k, v, t_q, t_k, t_v, scale: float) -> Partial:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, q, k, v, o, lse, do, scale: float):
        raise NotImplementedError(f"{type(self).__name__}.backward")


class TorchChunkOps(ChunkOps):
    """Float-exact PyTorch chunks (float32; float64 for float64 inputs)."""

    name = "torch"

    @torch.no_grad()
    def forward(self, q, k, v, t_q, t_k, t_v, scale):
        # The one PyTorch reference (rcm_math.md sec. 9), kept in the compute dtype for the merges.
        cdt = _cdt(q)
        to_c = lambda x: None if x is None else _bhsd(x).to(cdt)
        o, t_o, lse, t_lse = attention_jvp_bhsd(to_c(q), to_c(k), to_c(v), to_c(t_q), to_c(t_k), to_c(t_v), scale)
        return Partial(_sbhd(o), None if t_o is None else _sbhd(t_o), lse, t_lse)

    @torch.no_grad()
    def backward(self, q, k, v, o, lse, do, scale):
        """FlashAttention-2 backward with the *global* O and LSE of the rows of q:
        P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO o)), dQ = dS K scale,
        dK = dS^T Q scale."""
        cdt = _cdt(q)
        qb, kb, vb, ob, dob = (_bhsd(x).to(cdt) for x in (q, k, v, o, do))
        p = torch.exp(qb @ kb.transpose(-1, -2) * scale - lse.to(cdt)[..., None])
        dv = p.transpose(-1, -2) @ dob
        dp = dob @ vb.transpose(-1, -2)
        ds = p * (dp - (dob * ob).sum(-1, keepdim=True))
        dq = ds @ kb * scale
        dk = ds.transpose(-1, -2) @ qb * scale
        return _sbhd(dq), _sbhd(dk), _sbhd(dv)


@functools.cache
def _kernel_module():
    from megatron_rcm.kernels import attention_jvp as module

    return module


class KernelChunkOps(ChunkOps):
    """The attention-JVP kernels (CUDA; the Triton interpreter on CPU for checks).

    Forward with tangents: the JVP kernel with ``return_lse`` (O, dO, LSE, dLSE in one pass; the Gluon kernel
    on Hopper, ``kernels/attention_jvp_fwd_sm90.py``, writes both). Forward without: on CUDA for 16-bit inputs,
    the fused SDPA kernel that ``F.scaled_dot_product_attention`` itself would pick for these tensors
    (``sdpa_with_lse``: cuDNN, FlashAttention-2 or memory-efficient, each asked for its LSE), so a ring chunk
    runs the kernel the one-GPU and Ulysses paths run; else the JVP kernel with a zero query tangent.
    o, t_o are returned in q's dtype (the merge computes in float32). Backward: cuDNN's fused attention
    backward where it applies, else the Triton FlashAttention-2 backward; both take the global O and LSE.
    """

    name = "kernel"

    @torch.no_grad()
    def forward(self, q, k, v, t_q, t_k, t_v, scale):
        m = _kernel_module()
        if t_q is None:
            if _sdpa_applies(q):
                found = sdpa_with_lse(q, k, v, scale)
                if found is not None:
                    return Partial(found[0], None, found[1], None)
            o, _, lse, _ = m.attention_jvp(q, k, v, torch.zeros_like(q), softmax_scale=scale, return_lse=True)
            return Partial(o, None, lse, None)
        o, t_o, lse, t_lse = m.attention_jvp(q, k, v, t_q, t_k, t_v, softmax_scale=scale, return_lse=True)
        return Partial(o, t_o, lse, t_lse)

    @torch.no_grad()
    def backward(self, q, k, v, o, lse, do, scale):
        from megatron_rcm.kernels.attention_jvp_reference import check_inputs

        m = _kernel_module()
        o, do = o.to(q.dtype), do.to(q.dtype)
        dims = check_inputs(q, k, v, q, None, None, scale, "sbhd")
        lse = lse.float().contiguous()
        if m.cudnn_bwd_supported(q, dims, False):
            return m.cudnn_attn_bwd(q, k, v, o, do, lse, dims, "sbhd")
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        tensors = {"q": q, "k": k, "v": v, "o": o, "do": do, "dq": dq, "dk": dk, "dv": dv}
        strides = {name: m._strides(x, "sbhd") for name, x in tensors.items()}
        m.attn_bwd_launch(q, k, v, o, do, lse, None, dq, dk, dv, dims, strides)
        return dq, dk, dv


def _sdpa_applies(q) -> bool:
    d = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256


def sdpa_with_lse(q, k, v, scale: float):
    """(o [Sq, B, N, d], lse [B, N, Sq] float32) from the fused kernel that ``F.scaled_dot_product_attention``
    picks for these tensors (``torch._fused_sdp_choice``, which honours ``torch.nn.attention.sdpa_kernel``),
    or None when its choice is not one of cuDNN, FlashAttention-2 or memory-efficient attention."""
    from torch.nn.attention import SDPBackend

    qb, kb, vb = _bhsd(q), _bhsd(k), _bhsd(v)
    Sq = q.shape[0]
    with sdpa_preference():  # the same kernel order as the one-GPU path (ops/attention.set_sdpa_preference)
        choice = torch._fused_sdp_choice(qb, kb, vb, None, 0.0, False, scale=scale)
    if choice == SDPBackend.CUDNN_ATTENTION.value:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, 0.0, False, False, scale=scale)
    elif choice == SDPBackend.FLASH_ATTENTION.value:
        out = torch.ops.aten._scaled_dot_product_flash_attention(qb, kb, vb, 0.0, False, False, scale=scale)
    elif choice == SDPBackend.EFFICIENT_ATTENTION.value:
        out = torch.ops.aten._scaled_dot_product_efficient_attention(qb, kb, vb, None, True, 0.0, False, scale=scale)
    else:
        return None
    B, N = qb.shape[:2]
    # cuDNN's LSE is [B, N, Sq, 1]; memory-efficient attention pads Sq to a multiple of 32
    lse = out[1].reshape(B, N, -1)[..., :Sq].float()
    return _sbhd(out[0]), lse


def chunk_ops(backend: str, device: torch.device) -> ChunkOps:
    """The chunk implementation for an attention backend name (``ops.attention.ATTENTION_BACKENDS``):
    "torch" -> PyTorch, "triton" -> kernels, "auto" -> kernels on CUDA, PyTorch elsewhere."""
    check_attention_backend(backend)
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        return KernelChunkOps()
    return TorchChunkOps()
