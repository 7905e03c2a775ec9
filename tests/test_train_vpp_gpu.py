"""The trainer under the interleaved pipeline schedule on 2 GPUs (NCCL): PP=2 x V=2 with Megatron-Core's
DistributedOptimizer over all model chunks' parameters, against PP=1 on one GPU, over the four steps of
``tests/test_train_vpp.py`` (warm-up sCM student steps, an sCM + DMD student step, a critic step): losses,
gradient norms, every parameter gradient, the weights after the optimizer steps (student, critic, EMA) and
samples; its checkpoint (``optim_fully_reshardable``: the per-parameter optimizer state, which resumes at another
PP size) resumes at PP=1 with bit-equal weights.

Run on a 2-GPU machine: ``python -m pytest -m gpu -s tests/test_train_vpp_gpu.py`` (prints the largest errors).
Float32 params: the differences are round-off of sums in another order (micro-batches, chunks, stages) and of
GPU kernels whose reduction order depends on the batch (attention, GEMMs), so the bound is 1e-4 relative
rather than the CPU test's 1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist_helpers import spawn
from tests.test_train_pp import COMPARED, STEPS, _cfg, _rel
from tests.test_train_vpp import PP, _grad_errors, _run, _vcfg, _weight_errors

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]

TOL = 1e-4


def _worker(rank, world, path):
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    if torch.cuda.is_available():  # else a CPU dry run of this test's own logic
        torch.cuda.set_device(rank)
    from megatron_rcm.parallel.state import destroy_parallel

    cfg = _vcfg(path)
    cfg.checkpoint.optim_fully_reshardable = True
    out = _run(cfg)  # on CUDA the trainer takes Megatron's optimizer (distributed: parallel.distributed_optimizer)
    destroy_parallel()
    return out


def test_vpp_trainer_on_gpus_equals_pp1_and_resumes_at_pp1(tmp_path):
    from megatron_rcm.parallel.state import destroy_parallel

    cfg = _cfg(tmp_path / "ref", micro=1)
    cfg.checkpoint.optim_fully_reshardable = True
    ref_hist, ref_grads, ref_w, _ = _run(cfg)
    destroy_parallel()
    hist, grads, w, _ = spawn(_worker, PP, str(tmp_path / "vpp"))
    errs = {}
    for i, (a, b) in enumerate(zip(ref_hist, hist, strict=True)):
        keys = sorted(k for k in a if k.startswith(COMPARED))
        errs.update({f"step {i} {k}": abs(a[k] - b[k]) / max(abs(a[k]), 1e-30) for k in keys})
    gerrs, werrs = _grad_errors(ref_grads, grads), _weight_errors(ref_w, w)
    for name, e in (("metrics", errs), ("gradients", gerrs), ("weights and samples", werrs)):
        worst = max(e, key=e.get)
        print(f"\nPP=2 x V=2 vs PP=1 on GPUs, {name}: largest relative error {e[worst]:.2e} ({worst})")
        assert e[worst] <= TOL, (worst, e[worst])

    cfg = _cfg(tmp_path / "vpp", steps=STEPS, micro=1)
    cfg.checkpoint.optim_fully_reshardable = True
    _, _, _, resumed = _run(cfg)  # at step STEPS already: loads, trains no step
    destroy_parallel()
    w.pop("samples 2-step")
    assert resumed.keys() == w.keys()
    diffs = {k: max(_rel(c, resumed[k][0]) for c in copies) for k, copies in w.items()}
    assert max(diffs.values()) == 0.0, max(diffs.items(), key=lambda kv: kv[1])
