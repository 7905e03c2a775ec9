"""Atomic checkpoints: a process SIGKILLed in the middle of a save (data written and partly truncated,
before the rename) leaves the previous checkpoint intact and ``latest`` on it; resuming from it continues
exactly (the re-run steps log the same losses as the killed run did); only the last N are kept."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_rcm.config import load_config
from megatron_rcm.training import CheckpointManager, Trainer
from tests.dist_helpers import free_port
from tests.test_ckpt_resume import COMPARED, TINY

REPO = Path(__file__).resolve().parents[1]

DRIVER = r'''
import os, signal, sys, time
import megatron.core.dist_checkpointing as dc
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron_rcm.config import load_config
from megatron_rcm.training import Trainer

_orig_save, _orig_write, _calls = dc.save, FileSystemWriterAsync.write_preloaded_data, [0]

def counting_save(*args, **kwargs):
    _calls[0] += 1
    return _orig_save(*args, **kwargs)

def killing_write(transform_list, local_proc_idx, write_bucket, *args, **kwargs):
    # runs in Megatron's forked writer process
    if _calls[0] != 2:
        return _orig_write(transform_list, local_proc_idx, write_bucket, *args, **kwargs)
    # second save: leave a half-written file behind, kill the trainer in the middle of the save (before
    # the rename) and stay busy like a writer stuck on a large bucket
    with open(write_bucket[0], "wb") as f:
        f.write(b"\0" * 16)
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(600)

dc.save = counting_save
FileSystemWriterAsync.write_preloaded_data = staticmethod(killing_write)

def main():
    Trainer(load_config(None, sys.argv[1:])).train()

if __name__ == "__main__":
    main()
'''


def _args(tmp_path, max_steps, extra=("checkpoint.async_save=false",)):
    return [*TINY, f"training.max_steps={max_steps}", f"training.output_dir={tmp_path / 'out'}",
            f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_every=2", "checkpoint.keep_last=2", *extra]


def _wait_for_group_to_exit(pgid: int, timeout: float) -> list[str]:
    """Poll until no process of group ``pgid`` is left; return the survivors' command lines."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:200]}")
            except (ProcessLookupError, psutil.Error):
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_sigkill_during_save_then_resume(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    log = tmp_path / "driver.log"
    # Own session, so that whatever the trainer started can be found (and, if the test fails, ended) through
    # the group id. Output goes to a file (a pipe would stay open while a writer lives).
    with open(log, "w") as f:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["MASTER_PORT"] = str(free_port())  # this process may hold the default port already
        # the driver imports this checkout's megatron_rcm (its own folder comes first on sys.path otherwise)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        proc = subprocess.Popen([sys.executable, str(driver), *_args(tmp_path, 6)], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        try:
            returncode = proc.wait(timeout=240)
            survivors = _wait_for_group_to_exit(proc.pid, timeout=5.0)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # Megatron's forked checkpoint writers (and any helper process) die with the killed trainer
    assert not survivors, f"processes of the killed trainer still alive: {survivors}"
    assert returncode == -signal.SIGKILL, log.read_text()[-3000:]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert (ckpt / ".tmp-step_00000004").is_dir()  # the interrupted save, never renamed
    assert not (ckpt / "step_00000004").exists()
    killed = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in killed] == [1, 2, 3, 4]  # 1-based, like the checkpoint names

    trainer = Trainer(load_config(None, _args(tmp_path, 6)))
    assert trainer.step == 2
    history = trainer.train()
    for i, step in enumerate((3, 4)):  # steps the killed run had already logged
        for k, v in history[i].items():
            if k.startswith(COMPARED):
                assert killed[step - 1][k] == v, (step, k)
    final = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in final] == [1, 2, 3, 4, 5, 6]  # the killed run's 3 and 4 replaced, not repeated
    trainer.close()  # waits for the background deletion of the pruned step_00000002
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["latest", "step_00000004", "step_00000006"]  # tmp dir cleaned, keep_last=2


def test_failed_save_keeps_latest_on_previous(tmp_path, monkeypatch):
    cfg = load_config(None, [*TINY, "training.max_steps=1", f"training.output_dir={tmp_path / 'out'}",
                             f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_every=1",
                             "checkpoint.async_save=false"])
    trainer = Trainer(cfg)
    trainer.train()
    first = CheckpointManager(tmp_path / "ckpt").latest()
    assert first.name == "step_00000001"
    import megatron_rcm.training.checkpoint as ck

    def fail(_path):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ck, "fsync_tree", fail)
    trainer.train_step()
    with pytest.raises(OSError, match="injected"):
        trainer.save_checkpoint()
    assert CheckpointManager(tmp_path / "ckpt").latest() == first
    monkeypatch.undo()
    resumed = Trainer(cfg)  # loads the intact previous checkpoint
    assert resumed.step == 1
