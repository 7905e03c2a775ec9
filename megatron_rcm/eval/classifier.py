"""A small digits classifier trained on the real training split; its penultimate layer is the feature
space of the Frechet distance, precision/recall and diversity scores (``megatron_rcm.eval.metrics``)."""

from __future__ import annotations

import torch
from torch import nn


class DigitsClassifier(nn.Module):
    """MLP 64 -> 256 -> 64 (features) -> 10 on [B, 1, 1, 8, 8] images in [-1, 1]."""

    def __init__(self, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(256, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        return self.body(x_BCFHW.float().reshape(x_BCFHW.shape[0], -1))

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_BCFHW))


def train_classifier(images_BCFHW: torch.Tensor, labels_B: torch.Tensor, epochs: int = 60, seed: int = 0,
                     batch_size: int = 64, noise_std: float = 0.1) -> DigitsClassifier:
    """Adam, cross entropy; light Gaussian input noise so generated samples are not out of distribution
    merely for being slightly noisy. Deterministic given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
        n = len(labels_B)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                x = images_BCFHW[idx] + noise_std * torch.randn(images_BCFHW[idx].shape, generator=g)
                loss = nn.functional.cross_entropy(model(x), labels_B[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    return model


@torch.no_grad()
def predict(model: DigitsClassifier, images_BCFHW: torch.Tensor, batch_size: int = 1024):
    """(probabilities [N, 10], features [N, D])."""
    probs, feats = [], []
    for i in range(0, images_BCFHW.shape[0], batch_size):
        f = model.features(images_BCFHW[i : i + batch_size].cpu())
        feats.append(f)
        probs.append(model.head(f).softmax(-1))
    return torch.cat(probs), torch.cat(feats)
