"""Layout planner: memory per GPU and predicted step times of parallel layouts (docs/throughput.md, Planner)."""

from megatron_rcm.planner.layouts import Layout, Problem, enumerate_layouts, video_tokens
from megatron_rcm.planner.memory import MemoryModel, param_counts
from megatron_rcm.planner.timing import TimingModel

__all__ = ["Layout", "MemoryModel", "Problem", "TimingModel", "enumerate_layouts", "param_counts",
           "video_tokens"]
