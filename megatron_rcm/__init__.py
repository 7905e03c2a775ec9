"""megatron_rcm: rCM (score-regularized continuous-time consistency) distillation on Megatron-Core.

Importing this package needs neither a GPU, Transformer Engine nor apex.
"""

__version__ = "0.1.0"
