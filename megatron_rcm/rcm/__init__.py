"""rCM distillation algorithms: TrigFlow wrapping, time sampling, losses, EMA, schedule, samplers.

The trainer needs ``DistillConfig``, ``RCMEngine``, ``DistillBatch``, ``Conditioning`` and
``PowerEMA``; ``docs/rcm.md`` maps every piece to its formula in ``rcm_math.md``.
"""

from megatron_rcm.rcm.ema import PowerEMA, power_ema_beta, power_ema_gamma
from megatron_rcm.rcm.engine import ALGORITHMS, DistillBatch, DistillConfig, RCMEngine
from megatron_rcm.rcm.samplers import (
    euler_sample,
    flow_shift_sigmas,
    student_sample,
    student_times,
    unipc_sample,
)
from megatron_rcm.rcm.schedule import StudentCriticSchedule
from megatron_rcm.rcm.time_sampling import TimeDistribution
from megatron_rcm.rcm.trigflow import Conditioning, TrigFlowDenoiser, TrigFlowOutput, rf_to_trig, trig_to_rf

__all__ = [
    "ALGORITHMS",
    "Conditioning",
    "DistillBatch",
    "DistillConfig",
    "PowerEMA",
    "RCMEngine",
    "StudentCriticSchedule",
    "TimeDistribution",
    "TrigFlowDenoiser",
    "TrigFlowOutput",
    "euler_sample",
    "flow_shift_sigmas",
    "power_ema_beta",
    "power_ema_gamma",
    "rf_to_trig",
    "student_sample",
    "student_times",
    "trig_to_rf",
    "unipc_sample",
]
