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
instead of two (3x), cross-attention four instead of two (2x). A backward costs twice its forward (of the
primal: the tangent carries no graph). Recompute re-runs the recomputed share of the blocks in each backward
as they ran: a forward for a graph of forwards, the JVP pass (primal and tangent together) for the JVP pass's
graph; selective recompute leaves out the self-attention products, kept (4 S^2 D a block, 12 S^2 D in the JVP).

Passes per step (B samples, n rollout steps):
    warm-up sCM student  teacher CFG (2F) + JVP pass J + backward of the primal (2F [+J recompute])
    rCM student          the above + rollout (n F, the last with backward 2F [+F]) + critic F + teacher CFG 2F
    critic               rollout n F (no grad) + critic F + backward 2F [+F]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PassFlops", "model_flops", "recompute_shares", "step_flops"]


@dataclass(frozen=True)
class PassFlops:
    """FLOPs of one sample through the network: linear layers and attention products, split."""

    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention


def _per_layer(cfg, S: int, context: int) -> tuple[PassFlops, PassFlops]:
    """(forward, JVP pass) FLOPs of one block: token linears twice in the JVP, the context's k/v once."""
    D, Fh = cfg.hidden_size, cfg.ffn_hidden_size
    token_lin = 2 * S * (4 * D * D + 2 * D * Fh) + 2 * S * 2 * D * D
    context_lin = 4 * context * D * D
    self_attn, cross_attn = 4 * S * S * D, 4 * S * context * D
    return (PassFlops(token_lin + context_lin, self_attn + cross_attn),
            PassFlops(2 * token_lin + context_lin, 3 * self_attn + 2 * cross_attn))


def _tokens(cfg, latent_CFHW) -> int:
    _, F, H, W = latent_CFHW
    pt, ph, pw = cfg.patch_size
    return (F // pt) * (H // ph) * (W // pw)


def model_flops(cfg, latent_CFHW, text_len: int, image_tokens: int = 0) -> tuple[PassFlops, PassFlops]:
    """(forward, JVP pass) FLOPs of one sample of latent shape [C, F, H, W] through a ``WanConfig``."""
    S, D, L, n = _tokens(cfg, latent_CFHW), cfg.hidden_size, text_len, cfg.num_layers
    p = math.prod(cfg.patch_size)
    blk_fwd, blk_jvp = _per_layer(cfg, S, L + image_tokens)
    token_once = 2 * S * p * D * (cfg.in_channels + cfg.out_channels)  # patch embedding and head: tangent too
    token_once += 2 * (cfg.freq_dim * D + 7 * D * D)  # time embedding, time projection: tangent too
    context_once = 2 * L * (cfg.text_dim * D + D * D)
    forward = PassFlops(n * blk_fwd.linear + token_once + context_once, n * blk_fwd.attention)
    jvp = PassFlops(n * blk_jvp.linear + 2 * token_once + context_once, n * blk_jvp.attention)
    return forward, jvp


def recompute_shares(cfg, fwd: PassFlops, jvp: PassFlops, latent_CFHW, fraction: float, text_len: int,
                     image_tokens: int = 0, granularity: str | None = None) -> tuple[float, float]:
    """(share of a forward ``fwd``, share of a JVP pass ``jvp``) that each backward re-runs (``step_flops``'
    ``recompute`` and ``recompute_jvp``): ``fraction`` of the blocks (``config_fields.recomputed_fraction``),
    as they ran, primal and tangent together in the JVP pass's graph; under ``recompute_granularity``
    (``granularity`` overrides the config's) ``selective`` without their self-attention products, which are
    kept (4 S^2 D a block in a forward, 12 S^2 D in the JVP pass). Embeddings and head are never recomputed."""
    S = _tokens(cfg, latent_CFHW)
    blk_fwd, blk_jvp = _per_layer(cfg, S, text_len + image_tokens)
    if (granularity or getattr(cfg, "recompute_granularity", "full")) == "selective":
        self_attn = 4 * S * S * cfg.hidden_size
        blk_fwd = PassFlops(blk_fwd.linear, blk_fwd.attention - self_attn)
        blk_jvp = PassFlops(blk_jvp.linear, blk_jvp.attention - 3 * self_attn)
    n = fraction * cfg.num_layers
    return n * blk_fwd.total / fwd.total, n * blk_jvp.total / jvp.total


def step_flops(kind: str, fwd: PassFlops, jvp: PassFlops, batch: int, rollout_steps: int = 1,
               recompute: bool | float = False, guidance: bool = True, recompute_jvp: float | None = None) -> float:
    """FLOPs of one training step of ``kind`` ("warmup", "student", "critic") over ``batch`` samples.
    ``recompute``: the share of a forward re-run in each backward of a graph of forwards (True: all; ``block``
    recompute of N of L blocks: N / L, ``config_fields.recomputed_fraction``; selective: ``recompute_shares``);
    ``recompute_jvp``: the share of the JVP pass re-run in the backward of its graph (default: ``recompute``,
    right for full and block recompute)."""
    F = fwd.total
    rj = float(recompute) if recompute_jvp is None else float(recompute_jvp)
    for name, r in (("recompute", float(recompute)), ("recompute_jvp", rj)):
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"{name} is a share of the blocks in [0, 1], got {r:g}")
    bwd = 2 * F + float(recompute) * F
    teacher = (2 if guidance else 1) * F
    scm = teacher + jvp.total + 2 * F + rj * jvp.total
    if kind == "warmup":
        per_sample = scm
    elif kind == "student":
        per_sample = scm + rollout_steps * F + bwd + F + teacher
    elif kind == "critic":
        per_sample = rollout_steps * F + F + bwd
    else:
        raise ValueError(f"step kind must be 'warmup', 'student' or 'critic', got {kind!r}")
    return batch * per_sample
