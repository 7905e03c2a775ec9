"""The embedded quickstart data set: scikit-learn's 8x8 handwritten digits as 1-frame "videos".

No download: the 1,797 images ship inside scikit-learn. Each image becomes a latent [1, 1, 8, 8] in
[-1, 1]; its class label picks a fixed random "text embedding" [text_len, text_dim] (a stand-in for a
prompt such as "a handwritten 3"), and an eleventh random embedding plays the negative prompt of CFG.
The embeddings come from a fixed generator (seed 0), independent of the training seed, so teacher,
students and the evaluation all see the same "prompts".
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_rcm.data.batch import Batch
from megatron_rcm.data.order import EpochOrder

NUM_CLASSES = 10
LATENT_SHAPE = (1, 1, 8, 8)
EMBEDDING_SEED = 0


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (images [N, 1, 1, 8, 8] float32 in [-1, 1], labels [N] int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the quickstart data set ships with scikit-learn: pip install scikit-learn") from err

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)  # pixel values are 0..16
    return x[:, None, None], torch.from_numpy(d.target.astype(np.int64))


def train_test_split(num: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed split of sample indices (the classifier is scored on the held-out part)."""
    perm = np.random.default_rng(seed).permutation(num)
    n_test = int(round(num * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def class_embeddings(text_len: int, text_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-class prompt embeddings [10, L, D], negative-prompt embedding [1, L, D]), unit-variance entries."""
    g = torch.Generator().manual_seed(EMBEDDING_SEED)
    table = torch.randn(NUM_CLASSES + 1, text_len, text_dim, generator=g)
    return table[:NUM_CLASSES], table[NUM_CLASSES:]


class DigitsSource:
    """Batches of digits with their class embeddings, in the seeded order of ``EpochOrder``."""

    def __init__(self, micro_batch_size: int, text_len: int, text_dim: int, seed: int, dp_rank: int = 0,
                 dp_size: int = 1, shuffle: bool = True, split: str = "all"):
        images, labels = load_digits_images()
        if split != "all":
            train, test = train_test_split(len(labels))
            idx = torch.from_numpy(train if split == "train" else test)
            images, labels = images[idx], labels[idx]
        self.images, self.labels = images, labels
        self.micro_batch_size = micro_batch_size
        self.class_emb_KLD, self.negative_1LD = class_embeddings(text_len, text_dim)
        self.order = EpochOrder(len(labels), seed, dp_rank, dp_size, shuffle, name="digits")

    def next_batch(self) -> Batch:
        idx = torch.tensor([self.order.next_index() for _ in range(self.micro_batch_size)])
        labels = self.labels[idx]
        return Batch(self.images[idx].clone(), self.class_emb_KLD[labels].clone(), self.negative_1LD,
                     [f"digit{int(i)}" for i in idx], labels)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)

    def close(self) -> None:
        pass
