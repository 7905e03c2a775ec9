"""Transformer Engine linears with a tangent path, on CUDA (skipped where TE cannot import):
BF16 TE vs local at TP=1 and TP=2 (outputs, tangents, every parameter gradient), JVP vs the float64 local
model, FP8 (current scaling) vs BF16, the real TE key set, a checkpoint resumed across implementations, and
the errors (MXFP8 on Hopper, delayed scaling). Run on the GPU machine:
``python -m pytest -m gpu -s tests/test_te_gpu.py``; every test prints its measured errors.

Tolerances: bf16 unit round-off is 2^-9 = 2e-3; two tiny blocks compound it to ~1e-2 (tests/test_wan_gpu.py
measured 8e-3 .. 1e-2 against float64); TE and local differ only in GEMM/LayerNorm kernels and rounding order,
so their bound is the same 3e-2. FP8 E4M3 has 3 mantissa bits (round-off 2^-4 = 6e-2 per element); errors
of max-normalized outputs of two blocks are bounded by 0.25.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.models.wan import impl_keys
from megatron_rcm.parallel.sharding import load_full_state_dict
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.dist_helpers import spawn
from tests.wan_helpers import make_inputs, make_ours, rel_err

te_pytorch = pytest.importorskip("transformer_engine.pytorch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BF16_TOL = 3e-2
FP8_TOL = 0.25
TEXT = 16  # context tokens: FP8 GEMMs need token counts divisible by 16


def _inputs():
    inp = make_inputs("t2v", frames=5, size=16)  # 5 x 8 x 8 = 320 tokens per sample
    inp["context"] = torch.randn(2, TEXT, 32, generator=torch.Generator().manual_seed(5))
    return inp


def _cuda(inp, dtype):
    out = {k: (None if v is None else v.to("cuda", dtype)) for k, v in inp.items()}
    for k in ("timestep", "t_timestep"):
        out[k] = inp[k].cuda().to(torch.float64 if dtype == torch.float64 else torch.float32)
    return out


def _build(impl, full_sd, dtype=torch.bfloat16, **overrides):
    from megatron_rcm.models.wan import WanModel, wan_config

    cfg = wan_config("wan-tiny-t2v", transformer_impl=impl, params_dtype=dtype, **overrides)
    model = WanModel(cfg).cuda()
    load_full_state_dict(model, impl_keys.adapt_state_dict(full_sd, [n for n, _ in model.named_parameters()]))
    return model


def _run(model, inp, ctx=None):
    """(v, t_v, {canonical name: grad}) of forward_jvp with grad on, loss = <v, g>; and t_v under no_grad."""
    import contextlib

    ctx = ctx or contextlib.nullcontext
    d = _cuda(inp, next(model.parameters()).dtype)
    model.zero_grad(set_to_none=True)
    with ctx():
        v, t_v = model.forward_jvp(d["x"], d["t_x"], d["timestep"], d["t_timestep"], d["context"])
    g = torch.randn(v.shape, generator=torch.Generator().manual_seed(9)).to(v.device, v.dtype)
    (v.float() * g.float()).sum().backward()
    grads = {impl_keys.to_local_name(n): p.grad.float().cpu() for n, p in model.named_parameters()}
    with torch.no_grad(), ctx():
        _, t_v_nograd = model.forward_jvp(d["x"], d["t_x"], d["timestep"], d["t_timestep"], d["context"])
    return v.float().cpu(), t_v.float().cpu(), t_v_nograd.float().cpu(), grads


def _full_sd_worker(rank, world, seed):
    initialize_parallel(tensor_parallel=1)  # the model needs Megatron's parallel state, also at TP=1
    sd = {k: v.cpu() for k, v in make_ours("t2v", seed=seed).state_dict().items() if torch.is_tensor(v)}
    destroy_parallel()
    return sd


def _full_state_dict(seed=3):
    """The unsharded float32 weights of the tiny t2v model, every parameter random (built in a worker)."""
    return spawn(_full_sd_worker, 1, seed)


def _te_vs_local_worker(rank, world, full_sd, inp):
    initialize_parallel(tensor_parallel=world)
    out = {impl: _run(_build(impl, full_sd), inp) for impl in ("local", "transformer_engine")}
    destroy_parallel()
    return out


def _compare(out, world):
    (v0, t0, tn0, g0), (v1, t1, tn1, g1) = out["local"], out["transformer_engine"]
    errs = {"primal": rel_err(v1, v0), "tangent": rel_err(t1, t0), "tangent_nograd": rel_err(tn1, tn0)}
    assert set(g0) == set(g1)
    grad_errs = {k: rel_err(g1[k], g0[k]) for k in g0}
    worst = max(grad_errs, key=grad_errs.get)
    print(f"TP={world} TE bf16 vs local bf16: " + ", ".join(f"{k} {e:.2e}" for k, e in errs.items())
          + f", worst grad {worst} {grad_errs[worst]:.2e} (bound {BF16_TOL})")
    assert max(errs.values()) <= BF16_TOL and grad_errs[worst] <= BF16_TOL


def test_te_bf16_matches_local_tp1():
    full_sd = _full_state_dict()
    _compare(spawn(_te_vs_local_worker, 1, full_sd, _inputs()), 1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_te_bf16_matches_local_tp2():
    full_sd = _full_state_dict()
    _compare(spawn(_te_vs_local_worker, 2, full_sd, _inputs()), 2)


def _fp8_worker(rank, world, full_sd, inp):
    from megatron_rcm.models.te_support import fp8_autocast

    initialize_parallel(tensor_parallel=world)
    ref = _run(_build("local", full_sd, torch.float64), inp)
    bf16 = _run(_build("transformer_engine", full_sd), inp)
    fp8_model = _build("transformer_engine", full_sd, fp8="hybrid", fp8_recipe="tensorwise")
    fp8 = _run(fp8_model, inp, lambda: fp8_autocast(fp8_model.config))
    destroy_parallel()
    return ref, bf16, fp8


def test_jvp_vs_float64_and_fp8_vs_bf16():
    ref, bf16, fp8 = spawn(_fp8_worker, 1, _full_state_dict(), _inputs())
    e16 = (rel_err(bf16[0], ref[0]), rel_err(bf16[1], ref[1]), rel_err(bf16[2], ref[2]))
    print(f"TE bf16 vs local float64: primal {e16[0]:.2e}, tangent {e16[1]:.2e}, tangent (no grad) {e16[2]:.2e}")
    assert max(e16) <= BF16_TOL
    e8 = (rel_err(fp8[0], bf16[0]), rel_err(fp8[1], bf16[1]), rel_err(fp8[2], bf16[2]))
    e8_64 = (rel_err(fp8[0], ref[0]), rel_err(fp8[1], ref[1]))
    g_err = max(rel_err(fp8[3][k], bf16[3][k]) for k in bf16[3])
    print(f"TE fp8 (current) vs TE bf16: primal {e8[0]:.2e}, tangent {e8[1]:.2e}, tangent (no grad) {e8[2]:.2e}, "
          f"worst grad {g_err:.2e}; vs float64: primal {e8_64[0]:.2e}, tangent {e8_64[1]:.2e} (bound {FP8_TOL})")
    assert max(e8) <= FP8_TOL and max(e8_64) <= FP8_TOL and g_err <= 2 * FP8_TOL


def _keys_worker(rank, world):
    initialize_parallel(tensor_parallel=world)
    from tests.test_te_keys import fake_te_keys

    full_sd = make_ours("i2v").state_dict()
    from megatron_rcm.models.wan import WanModel, wan_config

    te = WanModel(wan_config("wan-tiny-i2v", transformer_impl="transformer_engine")).cuda()
    te_keys, fake = sorted(te.state_dict()), sorted(fake_te_keys(full_sd))
    local_ckpt = {v.key for v in make_ours("i2v").sharded_state_dict().values() if hasattr(v, "key")}
    te_ckpt = {v.key for v in te.sharded_state_dict().values() if hasattr(v, "key")}
    te.load_state_dict(full_sd, strict=True)  # a local state dict loads into the TE model
    destroy_parallel()
    return te_keys, fake, local_ckpt, te_ckpt


def test_real_te_key_set_matches_the_description():
    te_keys, fake, local_ckpt, te_ckpt = spawn(_keys_worker, 1)
    print(f"TE state dict: {len(te_keys)} keys; description: {len(fake)}; checkpoint keys {len(te_ckpt)}")
    assert te_keys == fake
    assert te_ckpt == local_ckpt  # one canonical checkpoint layout for both implementations


def test_fp8_errors():
    from megatron_rcm.config import ConfigError, load_config
    from megatron_rcm.models.te_support import check_fp8_device
    from megatron_rcm.models.wan import wan_config

    with pytest.raises(ConfigError, match="delayed scaling is not supported"):
        load_config(None, ["data.source=mock", "model.transformer_impl=transformer_engine", "model.fp8=delayed"])
    cap = torch.cuda.get_device_capability()
    if cap >= (10, 0):
        pytest.skip(f"compute capability {cap}: MXFP8 is supported here")
    cfg = wan_config("wan-tiny-t2v", tensor_model_parallel_size=1, transformer_impl="transformer_engine",
                     fp8="e4m3", fp8_recipe="mxfp8")
    with pytest.raises(RuntimeError) as err:
        check_fp8_device(cfg)
    print(f"mxfp8 on {torch.cuda.get_device_name()}: {err.value}")
    assert f"compute capability {cap[0]}.{cap[1]}" in str(err.value) and "mxfp8" in str(err.value)


# -- trainer: a checkpoint saved with one implementation resumes with the other --------------------------
def _train_cfg(tmp_path, impl, max_steps, *extra):
    from megatron_rcm.config import load_config
    from tests.test_ckpt_resume import TINY

    return load_config(None, [*TINY, "model.params_dtype=bf16", f"model.transformer_impl={impl}",
                              "model.overrides.hidden_size=64", "model.overrides.ffn_hidden_size=128",
                              "data.text_len=16", "data.micro_batch_size=16", "data.latent_shape=[1,1,8,8]",
                              f"training.max_steps={max_steps}", f"training.output_dir={tmp_path}",
                              f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_every=2", *extra])


@pytest.mark.parametrize("first, second", [("local", "transformer_engine"), ("transformer_engine", "local")])
def test_checkpoint_resumes_across_implementations(tmp_path, first, second):
    from megatron_rcm.training import Trainer

    a = Trainer(_train_cfg(tmp_path, first, 2))
    a.train()
    saved = {impl_keys.to_local_name(n): p.detach().float().cpu() for n, p in a.student.module.named_parameters()}
    ema = {impl_keys.to_local_name(n): t.float().cpu() for n, t in a.ema.shadow.items()}
    a.close()
    del a
    b = Trainer(_train_cfg(tmp_path, second, 4))
    assert b.step == 2
    got = {impl_keys.to_local_name(n): p.detach().float().cpu() for n, p in b.student.module.named_parameters()}
    got_ema = {impl_keys.to_local_name(n): t.float().cpu() for n, t in b.ema.shadow.items()}
    assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)
    assert all(torch.equal(got_ema[k], ema[k]) for k in ema)
    history = b.train()
    print(f"{first} -> {second}: resumed at step 2, losses after resume "
          f"{[{k: round(v, 4) for k, v in m.items() if k.startswith('loss/')} for m in history]}")
    assert all(torch.isfinite(torch.tensor(v)) for m in history for k, v in m.items() if k.startswith("loss/"))
    b.close()


def test_fp8_training_with_block_recompute(tmp_path):
    """FP8 with activation recompute: the recompute runs in the backward and must re-enter the forward's FP8
    recipe (``te_support.recompute_context_fn``); before that fix torch's checkpoint stopped with "A different
    number of tensors was saved during the original forward and recomputation" (105 vs 75, 14B shapes)."""
    from megatron_rcm.training import Trainer

    t = Trainer(_train_cfg(tmp_path, "transformer_engine", 3, "model.fp8=current", "model.recompute=true",
                           "checkpoint.save_every=0"))
    history = t.train()
    t.close()
    losses = [v for m in history for k, v in m.items() if k.startswith("loss/")]
    print(f"fp8 + recompute: losses {[round(v, 4) for v in losses]}")
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
