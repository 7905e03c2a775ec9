"""Diffusion transformers built from Megatron-Core parts, each with a forward-mode tangent (JVP) path."""
