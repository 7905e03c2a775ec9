"""Triton kernels, installed as ``megatron_rcm.kernels``. Importing this never needs a GPU."""
