"""Pruning off the critical path (issue 13): a checkpoint beyond ``keep_last`` is renamed to ``.trash-step_N``
and deleted by a background thread, so a slow delete (4.8 s for Wan 1.3B's 45 GB) no longer stalls the
finalize; ``close`` waits for it; a ``.trash-*`` left by a crash is never listed nor resumed from, and the
manager's construction and the next save delete it."""

import shutil
import threading

import pytest

import megatron_rcm.training.checkpoint as ck
from megatron_rcm.config import load_config
from megatron_rcm.training import CheckpointManager, Trainer
from tests.test_ckpt_resume import TINY


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, "training.max_steps=1", f"training.output_dir={tmp_path / 'out'}",
                              f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.keep_last=1", *extra])


@pytest.fixture
def gated_rmtree(monkeypatch):
    """``shutil.rmtree`` that, for checkpoints (``step_N`` or ``.trash-step_N``, not ``.tmp-`` ones), records
    its thread and waits until ``release`` is set (at most 20 s): a delete that lasts as long as the test
    wants. On the training thread it fails at once (the delete would stall training)."""
    original, release, threads = shutil.rmtree, threading.Event(), []

    def gated(path, *args, **kwargs):
        if "step_" in str(path) and ".tmp-" not in str(path):
            threads.append(threading.current_thread())
            assert threading.current_thread() is not threading.main_thread(), \
                f"a pruned checkpoint ({path}) is deleted on the training thread"
            release.wait(20)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(ck.shutil, "rmtree", gated)
    return release, threads


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_slow_delete_does_not_delay_finalize_and_close_waits(tmp_path, gated_rmtree, async_save):
    release, threads = gated_rmtree
    trainer = Trainer(_cfg(tmp_path, f"checkpoint.async_save={str(async_save).lower()}"))
    root = tmp_path / "ckpt"
    trainer.save_checkpoint()
    trainer.finalize_checkpoints(blocking=True)
    trainer.train_step()
    trainer.save_checkpoint()
    done = trainer.finalize_checkpoints(blocking=True)  # publishes step 1, prunes step 0: returns at once
    assert [r.step for r in done] == [1]
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert [p.name for p in trainer.ckpt.list_checkpoints()] == ["step_00000001"]
    assert (root / ".trash-step_00000000").is_dir()  # still being deleted (the gate is closed)
    assert threads and threads[0].name == "checkpoint-deleter"
    release.set()
    trainer.close()  # waits for the deleter
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]


def test_resaving_a_step_replaces_it_through_the_trash(tmp_path, gated_rmtree):
    release, _ = gated_rmtree
    trainer = Trainer(_cfg(tmp_path, "checkpoint.async_save=false", "checkpoint.keep_last=3"))
    root = tmp_path / "ckpt"
    trainer.save_checkpoint()
    trainer.save_checkpoint()  # same step 0 again
    assert (root / ".trash-step_00000000").is_dir() and ck.check_intact(root / "step_00000000") is None
    trainer.save_checkpoint()  # and again, while the first copy is still being deleted: a fresh trash name
    assert (root / ".trash-step_00000000.1").is_dir()
    release.set()
    trainer.close()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000000"]


def test_stale_trash_is_never_resumed_and_is_deleted(tmp_path):
    cfg = _cfg(tmp_path, "checkpoint.async_save=false", "checkpoint.keep_last=3")
    trainer = Trainer(cfg)
    trainer.save_checkpoint()
    trainer.close()
    root = tmp_path / "ckpt"
    # a crash left a complete, newer checkpoint under a trash name (between the rename and its deletion)
    shutil.copytree(root / "step_00000000", root / ".trash-step_00000007")
    (root / "latest").unlink()  # and no pointer: resume must pick among the step_* folders
    listing = CheckpointManager.__new__(CheckpointManager)  # a manager that has not swept (no constructor)
    listing.root = root
    assert [p.name for p in listing.list_checkpoints()] == ["step_00000000"]
    assert listing.newest_intact() == root / "step_00000000"
    # construction deletes it (in the background; close waits)
    manager = CheckpointManager(root)
    manager.close()
    assert not (root / ".trash-step_00000007").exists()
    # a trash left after construction is deleted by the next save
    resumed = Trainer(cfg)
    assert resumed.resumed_from == root / "step_00000000"
    shutil.copytree(root / "step_00000000", root / ".trash-step_00000009")
    resumed.train_step()
    resumed.save_checkpoint()
    resumed.close()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000000", "step_00000001"]
