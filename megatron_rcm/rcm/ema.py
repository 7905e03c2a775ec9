"""Power-function EMA of the student (EDM2; rcm_math.md section 7).

    gamma = largest real root of g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2)   (relative std s = 0.1 -> ~6.94)
    beta(n) = (1 - 1/(n + 1))^(gamma + 1),   n = number of earlier EMA updates (student steps)
    theta_ema <- beta(n) theta_ema + (1 - beta(n)) theta

beta(0) = 0, so the first update copies the student. Shadow weights are fp32 whatever the model's
dtype. With Megatron's distributed optimizer, pass the module whose (local, possibly TP-sharded)
parameters you want averaged; the shadow has the same local shapes and names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["PowerEMA", "power_ema_beta", "power_ema_gamma"]


def power_ema_gamma(std: float) -> float:
    """Exponent gamma of a power EMA with relative standard deviation ``std`` (EDM2 Eq. 3 inverted)."""
    roots = np.roots([1.0, 7.0, 16.0 - std**-2, 12.0 - std**-2])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return float(real.max())


def power_ema_beta(n: int, gamma: float) -> float:
    """beta(n) = (1 - 1/(n + 1))^(gamma + 1) (sec. 7)."""
    return (1.0 - 1.0 / (n + 1)) ** (gamma + 1.0)


class PowerEMA:
    """fp32 power-EMA shadow of a module's parameters.

    Call ``update(model)`` after each student optimizer step (not after critic steps). The number of
    updates is part of ``state_dict`` so a resumed run continues the same beta(n) sequence.
    """

    def __init__(self, model: torch.nn.Module, std: float = 0.1):
        self.std = float(std)
        self.gamma = power_ema_gamma(self.std)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32, copy=True) for name, p in model.named_parameters()
        }

    def beta(self) -> float:
        """beta of the next update."""
        return power_ema_beta(self.num_updates, self.gamma)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> float:
        """theta_ema <- beta theta_ema + (1 - beta) theta; returns the beta used."""
        beta = self.beta()
        names, ema, new = [], [], []
        for name, p in model.named_parameters():
            names.append(name)
            ema.append(self.shadow[name])
            new.append(p.detach().to(torch.float32))
        if len(names) != len(self.shadow):
            raise KeyError(f"model has {len(names)} parameters, the EMA shadow {len(self.shadow)}")
        torch._foreach_lerp_(ema, new, 1.0 - beta)
        self.num_updates += 1
        return beta

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Load the EMA weights into ``model`` (cast to its parameter dtypes)."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name])

    @contextmanager
    def swapped_into(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily run ``model`` with the EMA weights (e.g. to sample), restoring its weights after."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(backup[name])

    def state_dict(self) -> dict:
        return {"std": self.std, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            missing = set(self.shadow) ^ set(state["shadow"])
            raise KeyError(f"EMA state does not match the model; differing names: {sorted(missing)[:5]}")
        self.std = float(state["std"])
        self.gamma = power_ema_gamma(self.std)
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
