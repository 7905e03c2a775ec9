"""The sample order shared by every indexed data source, and its exact-resume position.

Epoch e visits a permutation of all N samples drawn from ``numpy.random.default_rng([seed, e])``; DP rank
r takes positions r, r + W, ... of it (N // W samples per rank and epoch, the remainder dropped so every
rank has the same count). The state is ``{"epoch", "cursor"}``: restoring it replays exactly the samples
an uninterrupted run would have read next.
"""

from __future__ import annotations

import numpy as np


class EpochOrder:
    def __init__(self, num_samples: int, seed: int, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True,
                 name: str = "data"):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.dp_rank, self.dp_size, self.name = dp_rank, dp_size, name
        self.per_rank = num_samples // dp_size
        if self.per_rank == 0:
            raise ValueError(f"{name}: {num_samples} samples cannot feed {dp_size} data-parallel ranks")
        self.epoch, self.cursor = 0, 0
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            n = self.num_samples
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = perm[self.dp_rank :: self.dp_size][: self.per_rank]
        return self._order

    def next_index(self) -> int:
        i = int(self._epoch_order()[self.cursor])
        self.cursor += 1
        if self.cursor == self.per_rank:
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return i

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "num_samples": self.num_samples,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        for k in ("num_samples", "dp_size"):
            if int(state.get(k, getattr(self, k))) != getattr(self, k):
                raise ValueError(f"{self.name}: the checkpoint's data position was taken with {k}={state[k]}, "
                                 f"this run has {k}={getattr(self, k)}; exact resume is impossible")
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None
