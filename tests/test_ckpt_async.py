"""Asynchronous checkpoints: training goes on while a forked writer persists the state; ``latest`` only ever
names finalized checkpoints (checked between steps, with a slowed writer); a run resumed from a checkpoint
written in the background is bit-identical to an uninterrupted one; a trainer SIGKILLed while a write is in
flight leaves no writer behind and resumes from the previous checkpoint; a failed finalization leaves
``latest`` where it was."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_rcm.config import load_config
from megatron_rcm.training import CheckpointManager, Trainer
from megatron_rcm.training.checkpoint import check_intact
from tests.dist_helpers import free_port
from tests.test_ckpt_atomic import REPO, _wait_for_group_to_exit
from tests.test_ckpt_resume import TINY, _assert_same_history


def _cfg(tmp_path, name, max_steps, *extra):
    return load_config(None, [*TINY, f"training.max_steps={max_steps}", f"training.output_dir={tmp_path / name}",
                              f"checkpoint.dir={tmp_path / name / 'ckpt'}", "checkpoint.save_every=2", *extra])


@pytest.fixture
def slow_writer(monkeypatch):
    """Each bucket writer (forked: it inherits the patch) waits 1.5 s before writing, so that steps run while
    the write is in flight."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.write_preloaded_data

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(FileSystemWriterAsync, "write_preloaded_data", staticmethod(slow))


def test_latest_never_names_an_unfinalized_checkpoint_and_resume_is_bit_exact(tmp_path, slow_writer):
    ref = Trainer(_cfg(tmp_path, "ref", 6, "checkpoint.async_save=false"))
    ref_history = ref.train()

    seen = []  # (step, save in flight, checkpoint latest names) between steps

    def check_between_steps(trainer, _metrics):
        root = tmp_path / "run" / "ckpt"
        latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
        seen.append((trainer.step, trainer.ckpt.pending_step, latest))
        if latest is not None:
            assert check_intact(root / latest) is None, (trainer.step, latest)
            assert int(latest.split("_")[1]) != trainer.ckpt.pending_step

    run = Trainer(_cfg(tmp_path, "run", 4))
    assert run.ckpt.async_save  # the default
    first = run.train(on_step=check_between_steps)
    assert (2, 2, None) in seen or (3, 2, None) in seen, seen  # steps ran while step 2's write was in flight
    assert CheckpointManager(tmp_path / "run" / "ckpt").latest().name == "step_00000004"  # train() finalized
    resumed = Trainer(_cfg(tmp_path, "run", 6))
    assert resumed.step == 4
    second = resumed.train(on_step=check_between_steps)
    _assert_same_history(ref_history, first + second)
    for a, b in zip(ref.student.module.parameters(), resumed.student.module.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ref.critic.module.parameters(), resumed.critic.module.parameters()):
        assert torch.equal(a, b)
    for name, t in ref.ema.shadow.items():
        assert torch.equal(t, resumed.ema.shadow[name])


def test_failed_finalization_keeps_latest_on_previous(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "run", 2)
    trainer = Trainer(cfg)
    trainer.train()
    first = CheckpointManager(tmp_path / "run" / "ckpt").latest()
    assert first.name == "step_00000002"
    import megatron_rcm.training.checkpoint as ck

    def fail(_path):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ck, "fsync_tree", fail)
    trainer.train_step()
    path = trainer.save_checkpoint()  # returns while the write goes on
    assert path.name == "step_00000003" and trainer.ckpt.pending_step == 3
    with pytest.raises(OSError, match="injected"):
        trainer.finalize_checkpoints(blocking=True)
    assert trainer.ckpt.pending_step is None
    assert CheckpointManager(tmp_path / "run" / "ckpt").latest() == first
    monkeypatch.undo()
    assert Trainer(cfg).step == 2


DRIVER = r'''
import os, signal, sys, time
from pathlib import Path
import megatron.core.dist_checkpointing as dc
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron_rcm.config import load_config
from megatron_rcm.training import Trainer

MARKER = Path(sys.argv[1])
_orig_save, _orig_write, _calls = dc.save, FileSystemWriterAsync.write_preloaded_data, [0]

def counting_save(*args, **kwargs):
    _calls[0] += 1
    return _orig_save(*args, **kwargs)

def stuck_write(transform_list, local_proc_idx, write_bucket, *args, **kwargs):
    # runs in a bucket writer forked by the background writer process
    if _calls[0] != 2:
        return _orig_write(transform_list, local_proc_idx, write_bucket, *args, **kwargs)
    with open(write_bucket[0], "wb") as f:  # second save: half a file, then a writer stuck on a large bucket
        f.write(b"\0" * 16)
    MARKER.write_text(str(os.getpid()))
    time.sleep(600)

_orig_step = Trainer.train_step

def step_then_die_once_writer_is_busy(self):
    metrics = _orig_step(self)
    if _calls[0] == 2 and self.ckpt.pending_step is not None:  # a step ran while the write is in flight
        deadline = time.monotonic() + 120
        while not MARKER.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        MARKER.with_name("killed_after_step").write_text(str(self.step))
        os.kill(os.getpid(), signal.SIGKILL)
    return metrics

dc.save = counting_save
FileSystemWriterAsync.write_preloaded_data = staticmethod(stuck_write)
Trainer.train_step = step_then_die_once_writer_is_busy

def main():
    Trainer(load_config(None, sys.argv[2:])).train()

if __name__ == "__main__":
    main()
'''


def test_sigkill_during_async_write_then_resume(tmp_path):
    driver, marker, log = tmp_path / "driver.py", tmp_path / "writer_busy", tmp_path / "driver.log"
    driver.write_text(DRIVER)
    args = [*TINY, "training.max_steps=8", f"training.output_dir={tmp_path / 'out'}",
            f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_every=2", "checkpoint.async_save=true"]
    with open(log, "w") as f:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["MASTER_PORT"] = str(free_port())
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        proc = subprocess.Popen([sys.executable, str(driver), str(marker), *args], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            returncode = proc.wait(timeout=240)
            survivors = _wait_for_group_to_exit(proc.pid, timeout=5.0)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert marker.is_file(), log.read_text()[-3000:]  # the kill came while a bucket writer was writing
    # the background writer and its bucket writers die with the trainer
    assert not survivors, f"processes of the killed trainer still alive: {survivors}"
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert (ckpt / ".tmp-step_00000004").is_dir() and not (ckpt / "step_00000004").exists()
    killed = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in killed] == [1, 2, 3, 4]
    assert (tmp_path / "killed_after_step").read_text() == "5"  # step 5 ran while step 4 was being written

    trainer = Trainer(load_config(None, args[:-1] + ["checkpoint.async_save=false"]))
    assert trainer.step == 2 and trainer.resumed_from.name == "step_00000002"
