"""Evaluation: Frechet distance, a real-data classifier and the quickstart's sample metrics."""

from megatron_rcm.eval.frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats
from megatron_rcm.eval.metrics import (
    format_table,
    manifold_coverage,
    paired_mse,
    sample_metrics,
    teacher_metrics,
)

__all__ = [
    "format_table",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "manifold_coverage",
    "paired_mse",
    "sample_metrics",
    "teacher_metrics",
]
