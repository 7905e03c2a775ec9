"""Parallel layouts of a training problem: which (TP, CP, PP, DP, recompute, micro-batch) exist and which are valid.

Rules (docs/throughput.md, Planner):
    TP * CP * PP * DP = gpus
    TP divides the attention heads (Megatron splits heads over TP ranks)
    a2a (Ulysses) CP divides the heads per TP rank (each CP rank takes whole heads)
    PP divides the layers
Every listed layout runs in the trainer (PP x CP included); a layout's ``status`` would name a dimension the
trainer lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Layout", "Problem", "Rejected", "enumerate_layouts", "latent_grid", "video_tokens"]

def latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent (frames, rows, cols) of a video through Wan's VAE: 4x temporal (1 + (frames - 1) / 4), 8x spatial."""
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"--frames {frames}: Wan's VAE needs frames = 1 + 4k (e.g. 77, 81)")
    if height % 8 or width % 8:
        raise ValueError(f"--size {width}x{height}: width and height must be multiples of 8 (the VAE's stride)")
    return 1 + (frames - 1) // 4, height // 8, width // 8


def video_tokens(latent_FHW: tuple[int, int, int], patch_size=(1, 2, 2)) -> int:
    """Tokens of one sample: latent frames x rows x cols over the patch (81 x 1280x720 -> 21 x 45 x 80 = 75,600)."""
    (F, H, W), (pt, ph, pw) = latent_FHW, patch_size
    if F % pt or H % ph or W % pw:
        raise ValueError(f"latent grid {F}x{H}x{W} is not divisible by the patch {pt}x{ph}x{pw}")
    return (F // pt) * (H // ph) * (W // pw)


@dataclass(frozen=True)
class Problem:
    """What is trained: a Wan config (``WanConfig``) on samples of ``latent_CFHW`` with ``text_len`` text tokens."""

    wan_cfg: object
    latent_CFHW: tuple[int, int, int, int]
    text_len: int = 512
    guidance: bool = True
    """Teacher CFG on (two teacher forwards per sample)."""
    rollout_mean: float = 2.5
    """Mean DMD/critic rollout length n: (N_max + 1) / 2 with N_max = 4, rollouts cycle 1..N_max."""
    student_update_freq: int = 5

    @property
    def tokens(self) -> int:
        return video_tokens(self.latent_CFHW[1:], self.wan_cfg.patch_size)


@dataclass(frozen=True)
class Layout:
    """One way to spread the training over ``tp * cp * pp * dp`` GPUs."""

    tp: int
    cp: int
    pp: int
    dp: int
    recompute: bool = True
    micro_batch: int = 1
    """Samples per micro-batch per data-parallel rank."""
    num_micro_batches: int = 1
    """Micro-batches per step (gradient accumulation; the pipeline's m)."""
    cp_comm: str | None = None
    """"p2p" (ring) or "a2a" (Ulysses) when cp > 1."""
    status: str = "ok"
    """"ok", or why the trainer cannot run it yet (its prediction is still made)."""
    recompute_layers: int | None = None
    """With ``recompute``: blocks recomputed per pipeline stage (Megatron's ``block`` method: the first N of
    the stage); None recomputes every block (``uniform``)."""
    recompute_granularity: str = "full"
    """With ``recompute``: "full" re-runs the recomputed blocks whole; "selective" re-runs them less their
    self-attention core, whose q, k, v, o stay stored (``model.recompute_granularity``)."""

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def samples_per_step(self) -> int:
        return self.dp * self.micro_batch * self.num_micro_batches

    @property
    def implemented(self) -> bool:
        return self.status == "ok"

    def recompute_fraction(self, num_layers: int) -> float:
        """Share of a stage's ``num_layers / pp`` blocks that are re-run in each backward."""
        if not self.recompute:
            return 0.0
        per_stage = num_layers / self.pp
        return 1.0 if self.recompute_layers is None else min(self.recompute_layers, per_stage) / per_stage

    def name(self) -> str:
        cp = f"CP{self.cp}" + (f"-{self.cp_comm}" if self.cp > 1 else "")
        rc = "no-rc" if not self.recompute else "rc" if self.recompute_layers is None else f"rc{self.recompute_layers}"
        rc += "-sel" if self.recompute and self.recompute_granularity == "selective" else ""
        return (f"TP{self.tp} {cp} PP{self.pp} DP{self.dp} {rc} mb{self.micro_batch}"
                + (f"x{self.num_micro_batches}" if self.num_micro_batches > 1 else ""))


@dataclass(frozen=True)
class Rejected:
    """A layout that breaks a rule, with the rule it breaks."""

    desc: str
    reason: str


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Enumeration:
    layouts: list[Layout] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def enumerate_layouts(gpus: int, heads: int, layers: int, micro_batches=(1,), pp_micro_batches=(4, 8, 16),
                      recompute=(True, False), cp_comms=("p2p", "a2a"),
                      granularities=("full", "selective")) -> Enumeration:
    """Every layout of ``gpus`` GPUs that satisfies the rules, and the factorizations that do not (with why).

    PP = 1 layouts run one micro-batch per step; PP > 1 layouts try each of ``pp_micro_batches`` (m) to
    amortize the pipeline bubble (p - 1) / (m + p - 1). Recompute on comes in each of ``granularities``.
    """
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    out = Enumeration()
    for tp in _divisors(gpus):
        if heads % tp:
            out.rejected.append(Rejected(f"TP{tp}", f"TP={tp} does not divide the {heads} attention heads"))
            continue
        for cp in _divisors(gpus // tp):
            comms = cp_comms if cp > 1 else (None,)
            for comm in comms:
                if comm == "a2a" and (heads // tp) % cp:
                    out.rejected.append(Rejected(
                        f"TP{tp} CP{cp}-a2a",
                        f"a2a CP={cp} does not divide the {heads // tp} heads per TP rank (TP={tp})"))
                    continue
                for pp in _divisors(gpus // (tp * cp)):
                    if layers % pp:
                        out.rejected.append(Rejected(
                            f"TP{tp} CP{cp} PP{pp}", f"PP={pp} does not divide the {layers} layers"))
                        continue
                    dp = gpus // (tp * cp * pp)
                    status = "ok"
                    for m in ((1,) if pp == 1 else pp_micro_batches):
                        for b in micro_batches:
                            for rc in recompute:
                                for g in (granularities if rc else ("full",)):
                                    out.layouts.append(Layout(tp, cp, pp, dp, rc, b, m, comm, status,
                                                              recompute_granularity=g))
    return out
