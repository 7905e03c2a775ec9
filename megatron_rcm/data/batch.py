"""A training micro-batch and the collation of samples into one (text zero-padded to ``text_len``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    latent_BCFHW: torch.Tensor
    """Clean VAE latents x0, float32."""
    context_BLD: torch.Tensor
    """Prompt embeddings, zero-padded to ``text_len`` tokens (as Wan pads umT5 output), float32."""
    neg_context_BLD: torch.Tensor | None = None
    """Negative-prompt embeddings for the unconditional CFG branch ([1, L, D] when shared), or None."""
    keys: list[str] | None = None
    """Sample keys (for error messages and debugging)."""
    labels_B: torch.Tensor | None = None
    """Class labels (the quickstart's digits only)."""
    clip_fea_BND: torch.Tensor | None = None
    """I2V: CLIP image features of the first frame, float32, or None."""
    y_BCFHW: torch.Tensor | None = None
    """I2V: condition channels (first-frame mask + first-frame latent), float32, or None."""

    @property
    def batch_size(self) -> int:
        return self.latent_BCFHW.shape[0]

    def to(self, device) -> Batch:
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(mv(self.latent_BCFHW), mv(self.context_BLD), mv(self.neg_context_BLD), self.keys,
                     mv(self.labels_B), mv(self.clip_fea_BND), mv(self.y_BCFHW))

    def num_tokens(self, patch_size=(1, 2, 2)) -> int:
        """Video tokens the DiT sees for this batch (for tokens/s)."""
        _, _, F, H, W = self.latent_BCFHW.shape
        return self.batch_size * (F // patch_size[0]) * (H // patch_size[1]) * (W // patch_size[2])


def pad_text(t5_LD: torch.Tensor, text_len: int, where: str) -> torch.Tensor:
    """Zero-pad [L, D] to [text_len, D]; longer embeddings are an error (never truncated silently)."""
    L, D = t5_LD.shape
    if L > text_len:
        raise ValueError(f"{where}: text embedding has {L} tokens, more than data.text_len={text_len}")
    if L == text_len:
        return t5_LD.float()
    return torch.cat([t5_LD.float(), t5_LD.new_zeros(text_len - L, D, dtype=torch.float32)])
