"""Pinned host memory warmed before the first checkpoint save, on a GPU (issue 13): after the warm-up the
first asynchronous save's device-to-host copy makes no new pinned allocation (``num_host_alloc`` of
``torch.cuda.host_memory_stats`` does not move), training ran while the warm-up allocated, and the schedule
phase (Megatron's preload) is printed beside the warm-up's time.

Run on a GPU machine: ``python -m pytest -m gpu -s tests/test_ckpt_prewarm_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.training.host_prewarm import pinned_block_counts, preload_sizes
from tests.test_train_gpu import _cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def test_first_save_finds_warmed_pinned_blocks(tmp_path):
    from megatron_rcm.training import Trainer

    trainer = Trainer(_cfg(tmp_path, "run", 4, "checkpoint.save_every=0", "checkpoint.async_save=true",
                           "checkpoint.prewarm_host_memory=true", "checkpoint.keep_last=1"))
    assert trainer.prewarm is not None
    for _ in range(4):  # as train() does: poll the trigger, then step (TINY: the student at steps 0-2, the
        # critic's first step at 3, after the tangent warm-up)
        trainer.prewarm.step()
        trainer.train_step()
    trainer.prewarm.step()
    pw = trainer.prewarm.prewarmer
    pw.wait()
    assert pw.error is None, pw.error
    assert trainer.prewarm.builds == 3  # the networks at step 0, then each optimizer after its first step
    expected = pinned_block_counts(preload_sizes(trainer.sharded_state_dict()))
    assert pw.warmed == expected
    before = torch.cuda.host_memory_stats()
    trainer.save_checkpoint()
    after = torch.cuda.host_memory_stats()
    phases = trainer.ckpt.last_save_phases
    print(f"\nwarm-up {pw.seconds:.2f} s for {sum(b * n for b, n in expected.items()) / 1e9:.3f} GB in "
          f"{sum(expected.values())} blocks; first save phases {phases}; num_host_alloc "
          f"{before['num_host_alloc']} -> {after['num_host_alloc']}")
    assert after["num_host_alloc"] == before["num_host_alloc"], (before, after)
    trainer.close()
