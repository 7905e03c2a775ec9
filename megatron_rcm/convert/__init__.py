"""Checkpoint key tables and converters between Wan2.1 layouts and megatron_rcm."""
