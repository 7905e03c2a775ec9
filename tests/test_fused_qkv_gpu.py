"""Fused QKV projection on CUDA: fused vs unfused with the same weights (every parameter random), local linears
in fp32 and bf16, Transformer Engine linears in bf16 (skipped where TE cannot import), TP=2 + SP over NCCL; and
a TE checkpoint saved fused loaded unfused. Run on the GPU machine:
``python -m pytest -m gpu -s tests/test_fused_qkv_gpu.py``; every test prints its measured errors.

Tolerances: fp32 on CUDA (TF32 off) differs only in GEMM blocking: 1e-5. bf16 (unit round-off 2^-9 = 2e-3)
rounds the fused and the separate GEMMs' outputs alike but their kernels may accumulate in another order:
bounded by 3e-2 as the other bf16 parity tests (tests/test_te_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.models.wan import impl_keys
from megatron_rcm.parallel.sharding import gather_full_state_dict, load_full_state_dict
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.dist_helpers import reduced_full_grads, spawn
from tests.wan_helpers import make_inputs, randomize_, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _full_sd():
    from megatron_rcm.models.wan import WanModel, wan_config

    initialize_parallel(tensor_parallel=1)
    model = WanModel(wan_config("wan-tiny-t2v"))
    randomize_(model, 0)
    return gather_full_state_dict(model)


def _for(model, full_sd):
    """``full_sd`` (local names) renamed for ``model``'s implementation (TE fuses norm3 into the cross-attention
    query linear: ``layer_norm_weight``), as tests/test_te_gpu.py loads it."""
    return impl_keys.adapt_state_dict(full_sd, [n for n, _ in model.named_parameters()])


def _run(fused, full_sd, inp, dtype, impl):
    from megatron_rcm.models.wan import WanModel, wan_config

    model = WanModel(wan_config("wan-tiny-t2v", fused_qkv=fused, transformer_impl=impl))
    load_full_state_dict(model, _for(model, full_sd))
    model = model.to("cuda", dtype)
    b = {k: None if v is None else v.to("cuda", dtype) for k, v in inp.items()}
    b["timestep"] = inp["timestep"].cuda()
    v, t_v = model.forward_jvp(b["x"], b["t_x"], b["timestep"], b["t_timestep"].float(), b["context"], None)
    (v.float() * inp["w"].cuda()).sum().backward()
    g = reduced_full_grads(model)
    return v.float().cpu(), t_v.float().cpu(), {k: x.float().cpu() for k, x in g.items()}


def _errors(impl, dtype, full_sd, inp):
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = _run(True, full_sd, inp, dtype, impl), _run(False, full_sd, inp, dtype, impl)
    errs = {"v": rel_err(a[0], b[0]), "t_v": rel_err(a[1], b[1])}
    errs["grad"] = max(rel_err(a[2][k], b[2][k]) for k in b[2])
    return errs


def _inputs():
    inp = make_inputs("t2v", frames=5, size=16)
    inp["w"] = torch.randn(inp["x"].shape[0], 4, *inp["x"].shape[2:])
    return inp


@pytest.mark.parametrize("impl,dtype,tol", [("local", torch.float32, 1e-5), ("local", torch.bfloat16, 3e-2),
                                            ("transformer_engine", torch.bfloat16, 3e-2)])
def test_fused_matches_unfused_cuda(impl, dtype, tol):
    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine.pytorch")
    full_sd, inp = _full_sd(), _inputs()
    errs = _errors(impl, dtype, full_sd, inp)
    print(f"fused vs unfused {impl} {dtype}: {errs}")
    assert max(errs.values()) <= tol, errs


def _tp2_worker(rank, world, full_sd, inp):
    torch.cuda.set_device(rank)
    initialize_parallel(tensor_parallel=world, backend="nccl")
    try:
        return _errors("local", torch.float32, full_sd, inp)
    finally:
        destroy_parallel()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fused_matches_unfused_tp2_nccl():
    full_sd, inp = _full_sd(), _inputs()
    errs = spawn(_tp2_worker, 2, full_sd, inp)
    print(f"fused vs unfused TP=2 NCCL fp32: {errs}")
    assert max(errs.values()) <= 1e-5, errs


def test_te_fused_checkpoint_loads_unfused(tmp_path):
    pytest.importorskip("transformer_engine.pytorch")
    from megatron.core import dist_checkpointing

    from megatron_rcm.convert.dist_ckpt import load_model
    from megatron_rcm.models.wan import WanModel, wan_config

    full_sd = _full_sd()
    src = WanModel(wan_config("wan-tiny-t2v", fused_qkv=True, transformer_impl="transformer_engine")).cuda()
    load_full_state_dict(src, _for(src, {k: v.cuda() for k, v in full_sd.items()}))
    dist_checkpointing.save(src.sharded_state_dict(prefix="m."), str(tmp_path))
    dst = WanModel(wan_config("wan-tiny-t2v")).cuda()
    load_model(dst, tmp_path, prefix="m.")
    got = gather_full_state_dict(dst)
    bad = [k for k in full_sd if not torch.equal(got[k].cpu(), full_sd[k])]
    print(f"TE fused -> local unfused checkpoint: {len(full_sd) - len(bad)}/{len(full_sd)} tensors equal")
    assert not bad, bad[:5]
