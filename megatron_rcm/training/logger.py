"""Metric logging on rank 0: a tqdm progress bar, periodic console lines, ``metrics.jsonl`` and wandb.

wandb is imported only when enabled (``logging.wandb_mode`` or the WANDB_MODE environment variable),
and runs offline unless configured online. Memory: CUDA peak allocated, else the process's peak RSS.

Step numbers: ``step`` N is the N-th optimizer update (1-based), the number the console prints and the
checkpoint written after it carries (``step_0000000N``). A run resumed at step S first drops the records
of steps > S that an earlier run wrote to ``metrics.jsonl`` (atomic rewrite), so each step appears once.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from pathlib import Path

import torch

from megatron_rcm.atomic import write_atomic

logger = logging.getLogger("megatron_rcm.train")


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 2**20


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite ``metrics.jsonl`` at ``path`` without the records of steps > ``step`` (left by a run that went
    further than the checkpoint resumed from), through a temporary file and a rename."""
    if not path.is_file():
        return
    keep, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            record_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            record_step = None  # a torn line (the last of a killed run): dropped
        if isinstance(record_step, int) and record_step <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
        else:
            dropped += 1
    if not dropped:
        return
    write_atomic(path, "".join(keep))
    logger.info("%s: dropped %d records after step %d (re-run from the checkpoint)", path, dropped, step)


class MetricLogger:
    def __init__(self, output_dir: str | Path, total_steps: int, initial_step: int, log_every: int,
                 progress_bar: bool, wandb_mode: str, wandb_project: str, run_name: str, config: dict,
                 enabled: bool = True):
        self.enabled = enabled
        self.log_every = log_every
        self.output_dir = Path(output_dir)
        self._bar = None
        self._wandb = None
        self._jsonl = None
        self._window: dict[str, list[float]] = {}
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "metrics.jsonl"
        drop_records_after(path, initial_step)
        self._jsonl = open(path, "a")  # noqa: SIM115 (closed in close())
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=run_name, dynamic_ncols=True,
                             file=sys.stderr)
        mode = os.environ.get("WANDB_MODE", wandb_mode)
        if mode != "disabled":
            try:
                import wandb
            except ImportError:
                logger.warning("wandb_mode=%s but wandb is not installed; logging to metrics.jsonl only", mode)
            else:
                self._wandb = wandb.init(project=wandb_project, name=run_name, mode=mode, config=config,
                                         dir=str(self.output_dir), resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of optimizer update ``step`` (1-based: the trainer's step after the update)."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._bar is not None:
            self._bar.update(1)
            short = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("loss/")}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in short.items()}, refresh=False)
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._window.setdefault(k, []).append(float(v))
        if step % self.log_every == 0:
            # means over the steps since the last line (student and critic steps alternate, so a single
            # step would show only one network's terms)
            line = " ".join(f"{k}={sum(v) / len(v):.4g}" for k, v in self._window.items())
            msg = f"step {step} (mean of last {self.log_every}): {line}"
            self._window = {}
            if self._bar is not None:
                self._bar.write(msg)
            else:
                print(msg, flush=True)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
