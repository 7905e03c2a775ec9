"""Predicted step times of a layout: compute at a calibrated rate, communication over named links, overheads.

Per step of kind k on one GPU (docs/throughput.md, Planner):
    t_k = FLOPs_k / (TP CP PP) / R_k * (m + p - 1) / m       FLOP model over the rate, pipeline bubble
        + t_TP + t_CP + t_PP                                  activation collectives, not overlapped
        + t_DP                                                grad reduce-scatter + param all-gather, not overlapped
        + t_opt * (P_loc / (DP CP)) / P_cal + t_ema * P_loc / P_cal + t_fixed    optimizer, EMA, data, other
R_k = FLOPs_k / (step time - optimizer - EMA - grad reduce - data - other) of the 1-GPU calibration run.
A ring all-gather / reduce-scatter of V bytes over n GPUs moves V (n - 1) / n per GPU; so does an all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rcm.planner.memory import param_counts
from megatron_rcm.training.flops import model_flops, recompute_shares, step_flops

__all__ = ["TimingModel", "PASSES", "GPUS_PER_NODE", "NVLINK_GBPS", "IB_GBPS"]

GPUS_PER_NODE = 8
NVLINK_GBPS = 450.0
"""NVLink 4 (H100/H200 SXM): 900 GB/s bidirectional per GPU = 450 GB/s per direction, within a node of 8."""
IB_GBPS = 50.0
"""InfiniBand NDR 400 Gb/s = 50 GB/s per GPU (one ConnectX-7 per GPU), across nodes."""
EFF_RING = 0.75
"""All-gather / reduce-scatter: achieved over link bandwidth (NCCL bus bandwidth, an assumption)."""
EFF_A2A = 0.6
"""All-to-all (Ulysses CP): achieved over link bandwidth (an assumption; a2a is less efficient than rings)."""
EFF_P2P = 0.8
"""Send/recv (ring CP, pipeline stages): achieved over link bandwidth (an assumption)."""
BYTES_ACT, BYTES_GRAD, BYTES_PARAM = 2, 4, 2
"""bf16 activations; fp32 gradient reduction (``grad_reduce_in_fp32``); bf16 parameter all-gather."""

TP_COLLECTIVES = {"fwd": 8, "jvp": 16, "bwd": 13}
"""Sequence-parallel collectives of [S/CP, b, D] per layer. Forward: all-gathers before q, k, v (self), q
(cross), fc1 = 5, reduce-scatters after the two output projections and fc2 = 3. The JVP pass does each twice
(primal, tangent). Backward: each column-parallel linear all-gathers its input again and reduce-scatters its
input grad (10), each row-parallel one all-gathers its output grad (3)."""
CP_A2A = {"fwd": 4, "jvp": 8, "bwd": 4}
"""Ulysses all-to-alls of [S/CP, b, D/TP] per self-attention: q, k, v in and o out; tangents too in the JVP pass."""
CP_RING = {"fwd": 2, "jvp": 4, "bwd": 4}
"""Ring CP: [S/CP, b, D/TP] tensors passed to the next rank per ring step (k, v; + t_k, t_v; backward k, v, dk, dv)."""
CP_ATTN_FLOPS = {"fwd": 4, "jvp": 12, "bwd": 8}
"""Self-attention FLOPs per (query token x key token x hidden unit) of one ring step (rcm_math.md sec. 9:
the JVP pass has 3x the forward's products; a backward 2x)."""
PASSES = {
    "warmup": lambda n, g, rc: {"fwd": g + rc, "jvp": 1, "bwd": 1},
    "student": lambda n, g, rc: {"fwd": 2 * g + n + 1 + 2 * rc, "jvp": 1, "bwd": 2},
    "critic": lambda n, g, rc: {"fwd": n + 1 + rc, "jvp": 0, "bwd": 1},
}
"""Passes of one network per sample and step kind (the FLOP model's list, docs/throughput.md): g teacher
forwards (2 with CFG), n rollout forwards, rc recompute forwards per backward (rc: the share of the blocks
recomputed, 1 with every block). Under selective recompute the FLOPs count the recompute without the
self-attention products (``flops.recompute_shares``), and the CP collectives no recompute forward."""
OVERHEAD_PHASES = ("optimizer", "ema", "grad_reduce", "data", "other")


def _bandwidth(group_span: int) -> float:
    """GB/s per GPU of a group whose ranks span ``group_span`` consecutive GPUs (Megatron's tp-cp-dp-pp order)."""
    return NVLINK_GBPS if group_span <= GPUS_PER_NODE else IB_GBPS


def _collective_s(nbytes: float, n: int, span: int, eff: float) -> float:
    return 0.0 if n == 1 else nbytes * (n - 1) / n / (_bandwidth(span) * eff * 1e9)


@dataclass(frozen=True)
class StepTime:
    compute: float
    tp: float
    cp: float
    pp: float
    dp: float
    overhead: float

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.cp + self.pp + self.dp + self.overhead


@dataclass(frozen=True)
class TimingModel:
    """Rates R_k (FLOP/s per GPU) and overhead phases (s) per step kind, from a 1-GPU calibration run of
    ``cal_params`` parameters per network."""

    rate: dict
    overhead: dict
    cal_params: float

    @classmethod
    def calibrate(cls, problem, layout, kinds: dict) -> TimingModel:
        """``kinds``: step kind -> {"step_time_s", "phases_s", "rollout_mean"} of a one-GPU bench_step run."""
        if layout.gpus != 1:
            raise ValueError(f"the timing calibration needs a 1-GPU run, got {layout.gpus} GPUs")
        rate, overhead = {}, {}
        for kind, m in kinds.items():
            over = {p: float(m["phases_s"].get(p, 0.0)) for p in OVERHEAD_PHASES}
            net = m["step_time_s"] - sum(over.values())
            if net <= 0:
                raise ValueError(f"calibration {kind}: step time {m['step_time_s']} s is not above its overheads")
            rate[kind] = cls._flops(problem, layout, kind, m["rollout_mean"]) / net
            overhead[kind] = over
        return cls(rate, overhead, float(sum(param_counts(problem.wan_cfg))))

    @staticmethod
    def _flops(problem, layout, kind: str, rollout: float) -> float:
        fwd, jvp = model_flops(problem.wan_cfg, problem.latent_CFHW, problem.text_len)
        samples = layout.micro_batch * layout.num_micro_batches
        share, share_jvp = recompute_shares(problem.wan_cfg, fwd, jvp, problem.latent_CFHW,
                                            layout.recompute_fraction(problem.wan_cfg.num_layers), problem.text_len,
                                            granularity=layout.recompute_granularity)
        return step_flops(kind, fwd, jvp, samples, rollout, share, problem.guidance, share_jvp)

    def flops_per_gpu(self, problem, layout, kind: str, rollout: float | None = None) -> float:
        """The FLOP model's step FLOPs of one data-parallel rank's samples, split over TP x CP x PP."""
        n = problem.rollout_mean if rollout is None else rollout
        return self._flops(problem, layout, kind, n) / (layout.tp * layout.cp * layout.pp)

    def step(self, problem, layout, kind: str, rollout: float | None = None) -> StepTime:
        cfg, L = problem.wan_cfg, layout
        n = problem.rollout_mean if rollout is None else rollout
        rc = L.recompute_fraction(cfg.num_layers)
        passes = PASSES[kind](n, 2 if problem.guidance else 1, rc)
        # selective recompute re-runs the linears (their TP collectives) but not the attention core (CP's)
        passes_cp = PASSES[kind](n, 2 if problem.guidance else 1, 0.0) if L.recompute_granularity == "selective" \
            else passes
        bubble = (L.num_micro_batches + L.pp - 1) / L.num_micro_batches
        rate = self.rate[kind]
        compute = self.flops_per_gpu(problem, L, kind, n) / rate * bubble
        samples = L.micro_batch * L.num_micro_batches
        S_cp, D, layers = problem.tokens / L.cp, cfg.hidden_size, cfg.num_layers / L.pp
        # TP: sequence-parallel all-gathers / reduce-scatters of [S/CP, b, D] per layer
        v_tp = L.micro_batch * S_cp * D * BYTES_ACT
        n_tp = sum(TP_COLLECTIVES[p] * c for p, c in passes.items()) * layers * L.num_micro_batches
        t_tp = n_tp * _collective_s(v_tp, L.tp, L.tp, EFF_RING)
        # CP: a2a of [S/CP, b, D/TP] (4 per self-attention), or ring steps overlapped with a chunk's attention
        v_cp = L.micro_batch * S_cp * D / L.tp * BYTES_ACT
        t_cp = 0.0
        if L.cp > 1 and L.cp_comm == "a2a":
            n_a2a = sum(CP_A2A[p] * c for p, c in passes_cp.items()) * layers * L.num_micro_batches
            t_cp = n_a2a * _collective_s(v_cp, L.cp, L.tp * L.cp, EFF_A2A)
        elif L.cp > 1:
            bw = _bandwidth(L.tp * L.cp) * EFF_P2P * 1e9
            for p, c in passes_cp.items():
                xfer = CP_RING[p] * v_cp / bw
                chunk = CP_ATTN_FLOPS[p] * L.micro_batch * S_cp * S_cp * D / L.tp / rate
                t_cp += c * layers * L.num_micro_batches * (L.cp - 1) * max(0.0, xfer - chunk)
        # PP: [S/(CP TP), b, D] (and its tangent) to the next stage per micro-batch and pass, on the critical path
        t_pp = 0.0
        if L.pp > 1:
            v_pp = v_tp / L.tp
            n_pp = sum(c * (2 if p == "jvp" else 1) for p, c in passes.items()) * (L.num_micro_batches + L.pp - 2)
            t_pp = n_pp * v_pp / (_bandwidth(L.gpus) * EFF_P2P * 1e9)
        # DP (x CP): reduce-scatter of fp32 grads, all-gather of bf16 params (distributed optimizer)
        blocks, other = param_counts(cfg)
        P_loc = blocks / (L.tp * L.pp) + other
        n_dp, span = L.dp * L.cp, L.tp * L.cp * L.dp
        t_dp = (_collective_s(BYTES_GRAD * P_loc, n_dp, span, EFF_RING)
                + _collective_s(BYTES_PARAM * P_loc, n_dp, span, EFF_RING))
        o = self.overhead[kind]
        over = (o["optimizer"] * P_loc / n_dp / self.cal_params + o["ema"] * P_loc / self.cal_params
                + o["grad_reduce"] + o["data"] * samples + o["other"])
        return StepTime(compute, t_tp, t_cp, t_pp, t_dp, over)
