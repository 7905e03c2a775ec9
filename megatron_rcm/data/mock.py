"""Random latents and text embeddings of the configured shapes, for throughput runs (no I/O).

Sample i is drawn from its own generator seeded with (seed, i), so a batch depends only on the position
(``EpochOrder``): resuming is exact like for real data.
"""

from __future__ import annotations

import torch

from megatron_rcm.data.batch import Batch
from megatron_rcm.data.order import EpochOrder


class MockSource:
    def __init__(self, micro_batch_size: int, latent_shape_CFHW, text_len: int, text_dim: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, num_samples: int = 1 << 20):
        self.micro_batch_size = micro_batch_size
        self.latent_shape = tuple(int(s) for s in latent_shape_CFHW)
        self.text_len, self.text_dim, self.seed = text_len, text_dim, seed
        self.order = EpochOrder(num_samples, seed, dp_rank, dp_size, shuffle=False, name="mock data")
        g = torch.Generator().manual_seed(seed + 7919)
        self.negative_1LD = torch.randn(1, text_len, text_dim, generator=g)

    def _sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(self.latent_shape, generator=g), torch.randn(self.text_len, self.text_dim, generator=g)

    def next_batch(self) -> Batch:
        idx = [self.order.next_index() for _ in range(self.micro_batch_size)]
        lat, ctx = zip(*(self._sample(i) for i in idx))
        return Batch(torch.stack(lat), torch.stack(ctx), self.negative_1LD, [f"mock{i}" for i in idx])

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)

    def close(self) -> None:
        pass
