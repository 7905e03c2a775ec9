"""A FLOP model of the Wan DiT and of each kind of distillation step (docs/throughput.md).

Legend: S video tokens of one sample, L text tokens (plus N CLIP image tokens for I2V), D hidden, Fh FFN
hidden, P patch features in (C_in * pt*ph*pw) and out, f frequency dim, T text width, Lay layers. A
multiply-add counts 2 FLOPs; only matrix products are counted (norms, modulation, RoPE and the softmax are
elementwise; the I2V image embedder's MLP is left out).

One forward of one sample, F = lin + attn:
    lin  = 2 S (4 D^2 + 2 D Fh)            self-attn q/k/v/o + FFN, per layer
         + 4 S D^2 + 4 L D^2 (+ 4 N D^2)   cross-attn q/o on tokens, k/v on the context, per layer
         + 2 S P_in D + 2 S D P_out         patch embedding and head (once)
         + 2 (f D + 7 D^2) + 2 L (T D + D^2)   time embedding + projection, text embedding (once)
    attn = 4 S^2 D + 4 S L D (+ 4 S N D)   Q K^T and P V, self- and cross-attention, per layer
The JVP pass (primal and tangent in one pass, rcm_math.md sec. 9): every linear runs twice (W x, W t_x;
the context's k/v and the text embedding once: they have no tangent), self-attention six products
instead of two (3x), cross-attention four instead of two (2x). A backward costs twice its forward; recompute adds one forward (of the recomputed share of the blocks).

Passes per step (B samples, n rollout steps):
    warm-up sCM student  teacher CFG (2F) + JVP pass + backward of the primal (2F [+F recompute])
    rCM student          the above + rollout (n F, the last with backward 2F [+F]) + critic F + teacher CFG 2F
    critic               rollout n F (no grad) + critic F + backward 2F [+F]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PassFlops", "model_flops", "recompute_share", "step_flops"]


@dataclass(frozen=True)
class PassFlops:
    """FLOPs of one sample through the network: linear layers and attention products, split."""

    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention


def model_flops(cfg, latent_CFHW, text_len: int, image_tokens: int = 0) -> tuple[PassFlops, PassFlops]:
    """(forward, JVP pass) FLOPs of one sample of latent shape [C, F, H, W] through a ``WanConfig``."""
    _, F, H, W = latent_CFHW
    pt, ph, pw = cfg.patch_size
    S = (F // pt) * (H // ph) * (W // pw)
    D, Fh, L, N, n = cfg.hidden_size, cfg.ffn_hidden_size, text_len, image_tokens, cfg.num_layers
    p = math.prod(cfg.patch_size)
    token_lin = n * (2 * S * (4 * D * D + 2 * D * Fh) + 2 * S * 2 * D * D) + 2 * S * p * D * (
        cfg.in_channels + cfg.out_channels
    )
    token_lin += 2 * (cfg.freq_dim * D + 7 * D * D)  # time embedding, time projection: tangent too
    context_lin = n * 4 * (L + N) * D * D + 2 * L * (cfg.text_dim * D + D * D)
    self_attn, cross_attn = n * 4 * S * S * D, n * 4 * S * (L + N) * D
    forward = PassFlops(token_lin + context_lin, self_attn + cross_attn)
    jvp = PassFlops(2 * token_lin + context_lin, 3 * self_attn + 2 * cross_attn)
    return forward, jvp


def recompute_share(cfg, fwd: PassFlops, latent_CFHW, fraction: float) -> float:
    """The share of a forward's FLOPs ``fwd`` that each backward re-runs (``step_flops``' ``recompute``):
    ``fraction`` of the blocks (``config_fields.recomputed_fraction``), whole under ``recompute_granularity``
    ``full``; under ``selective`` without their self-attention products (4 S^2 D per block), which are kept."""
    if cfg.recompute_granularity != "selective":
        return fraction
    _, F, H, W = latent_CFHW
    pt, ph, pw = cfg.patch_size
    S = (F // pt) * (H // ph) * (W // pw)
    self_attn = cfg.num_layers * 4 * S * S * cfg.hidden_size
    return fraction * (1.0 - self_attn / fwd.total)


def step_flops(kind: str, fwd: PassFlops, jvp: PassFlops, batch: int, rollout_steps: int = 1,
               recompute: bool | float = False, guidance: bool = True) -> float:
    """FLOPs of one training step of ``kind`` ("warmup", "student", "critic") over ``batch`` samples.
    ``recompute``: the share of the blocks re-run in each backward (True: all; ``block`` recompute of N of L
    blocks: N / L, ``config_fields.recomputed_fraction``)."""
    F = fwd.total
    if not 0.0 <= float(recompute) <= 1.0:
        raise ValueError(f"recompute is a share of the blocks in [0, 1], got {recompute}")
    bwd = 2 * F + float(recompute) * F
    teacher = (2 if guidance else 1) * F
    scm = teacher + jvp.total + bwd
    if kind == "warmup":
        per_sample = scm
    elif kind == "student":
        per_sample = scm + rollout_steps * F + bwd + F + teacher
    elif kind == "critic":
        per_sample = rollout_steps * F + F + bwd
    else:
        raise ValueError(f"step kind must be 'warmup', 'student' or 'critic', got {kind!r}")
    return batch * per_sample
