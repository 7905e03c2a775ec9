"""Numerical ops shared by the models (attention dispatch)."""
