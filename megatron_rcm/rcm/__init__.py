"""rCM distillation algorithms: TrigFlow wrapping, time sampling, losses, EMA, schedule, samplers."""

from megatron_rcm.rcm.time_sampling import TimeDistribution
from megatron_rcm.rcm.trigflow import Conditioning, TrigFlowDenoiser, TrigFlowOutput, rf_to_trig, trig_to_rf

__all__ = ["Conditioning", "TimeDistribution", "TrigFlowDenoiser", "TrigFlowOutput", "rf_to_trig", "trig_to_rf"]
