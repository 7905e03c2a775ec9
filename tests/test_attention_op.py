"""The attention implementation is picked once (``ops.attention.attention_op``) from the config's backend
name; its PyTorch path and ring attention's PyTorch chunks are the one reference
(``kernels/attention_jvp_reference.py``), checked here against ``torch.func.jvp`` over math attention."""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.kernels.attention_jvp_reference import attention_jvp_torch
from megatron_rcm.ops.attention import (
    ATTENTION_BACKENDS,
    KernelAttention,
    TorchAttention,
    attention_op,
    check_attention_backend,
)
from megatron_rcm.ops.attention_chunks import TorchChunkOps, chunk_ops


def _inputs(dtype, S=7, L=5, B=2, N=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, t_q = (torch.randn(S, B, N, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    k, v, t_k, t_v = (torch.randn(L, B, N, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(4))
    return q, k, v, t_q, t_k, t_v


def _math_attention(q, k, v):
    """Independent reference: softmax(Q K^T / sqrt(d)) V on [S, B, N, d]."""
    s = torch.einsum("sbnd,lbnd->bnsl", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bnsl,lbnd->sbnd", torch.softmax(s, -1), v)


def test_backend_names_are_validated_by_the_configs():
    from megatron_rcm.models.cosmos.config import cosmos_config
    from megatron_rcm.models.wan.config import wan_config

    assert ATTENTION_BACKENDS == ("auto", "torch", "triton")
    with pytest.raises(ValueError, match=r"WanConfig.attention_backend_name.*'torch_reference'.*'auto', 'torch'"):
        wan_config("wan-tiny-t2v", attention_backend_name="torch_reference")
    with pytest.raises(ValueError, match=r"CosmosConfig.attention_backend_name.*'flash'"):
        cosmos_config("cosmos-tiny-t2i", attention_backend_name="flash")
    for name in ATTENTION_BACKENDS:
        assert wan_config("wan-tiny-t2v", attention_backend_name=name).attention_backend_name == name
    with pytest.raises(ValueError, match="unknown attention backend 'sdpa'"):
        chunk_ops("sdpa", torch.device("cpu"))
    with pytest.raises(ValueError, match="where: unknown attention backend"):
        check_attention_backend("x", "where")


def test_attention_op_is_picked_from_backend_and_device():
    assert type(attention_op("auto", "cpu")) is TorchAttention
    assert type(attention_op("torch", "cuda")) is TorchAttention
    triton_op = attention_op("triton", "cpu")
    assert isinstance(triton_op, KernelAttention) and triton_op.strict
    auto_cuda = attention_op("auto", "cuda")
    assert isinstance(auto_cuda, KernelAttention) and not auto_cuda.strict
    q, k, v, t_q, t_k, t_v = _inputs(torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        triton_op(q, k, v, t_q, t_k, t_v)
    # "auto" built for CUDA falls back to PyTorch for CPU tensors (models built on CPU, run there).
    o, t_o = auto_cuda(q, k, v, t_q, t_k, t_v)
    o_ref, t_o_ref = TorchAttention()(q, k, v, t_q, t_k, t_v)
    assert torch.equal(o, o_ref) and torch.equal(t_o, t_o_ref)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention_op("torch_reference", "cpu")


def test_models_hold_the_attention_op_picked_at_construction():
    from megatron_rcm.models.cosmos.config import cosmos_config
    from megatron_rcm.models.cosmos.model import CosmosModel
    from megatron_rcm.models.wan.config import wan_config
    from megatron_rcm.models.wan.model import WanModel
    from megatron_rcm.parallel.state import initialize_parallel

    initialize_parallel(tensor_parallel=1)
    wan = WanModel(wan_config("wan-tiny-t2v", attention_backend_name="torch"))
    cosmos = CosmosModel(cosmos_config("cosmos-tiny-t2i", attention_backend_name="torch"))
    ops = [m.attention for m in (*wan.modules(), *cosmos.modules()) if hasattr(m, "attention")]
    assert len(ops) == 2 * 2 + 2 * 2 and all(type(op) is TorchAttention for op in ops)


def test_torch_attention_matches_an_independent_jvp():
    q, k, v, t_q, t_k, t_v = _inputs(torch.float64)
    o_ref, t_o_ref = torch.func.jvp(_math_attention, (q, k, v), (t_q, t_k, t_v))
    op = TorchAttention()
    o, t_o = op(q, k, v, t_q, t_k, t_v)
    assert torch.allclose(o, o_ref, atol=1e-12) and torch.allclose(t_o, t_o_ref, atol=1e-12)  # float64
    # Constant keys/values (cross-attention): the tangent through q only.
    _, t_o_q = torch.func.jvp(lambda q_: _math_attention(q_, k, v), (q,), (t_q,))
    assert torch.allclose(op(q, k, v, t_q)[1], t_o_q, atol=1e-12)
    # Plain float32 attention goes through SDPA: float32 rounding.
    q32, k32, v32 = (x.float() for x in (q, k, v))
    o32, none = op(q32, k32, v32)
    assert none is None and torch.allclose(o32.double(), o_ref, atol=1e-5)


def test_torch_chunks_use_the_one_reference():
    q, k, v, t_q, t_k, t_v = _inputs(torch.bfloat16)
    part = TorchChunkOps().forward(q, k, v, t_q, t_k, t_v, 0.3)
    o, t_o, lse, t_lse = attention_jvp_torch(q, k, v, t_q, t_k, t_v, softmax_scale=0.3, return_lse=True)
    assert part.o.dtype == torch.float32  # kept in float32 for the merges (the reference rounds to bf16)
    assert torch.equal(part.o.to(torch.bfloat16), o) and torch.equal(part.t_o.to(torch.bfloat16), t_o)
    assert torch.equal(part.lse, lse) and torch.equal(part.t_lse, t_lse)
    primal = TorchChunkOps().forward(q, k, v, None, None, None, 0.3)
    assert primal.t_o is None and torch.equal(primal.o, part.o) and torch.equal(primal.lse, lse)
