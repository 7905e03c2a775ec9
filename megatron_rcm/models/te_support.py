"""Transformer Engine (TE) as an optional dependency: the implementation switch, the FP8 recipes, the autocast.

Importing this module never imports TE; ``import_te`` does, with one clear error when it is missing.

Config (Megatron's ``TransformerConfig`` fields, checked by ``check_transformer_impl``):

    transformer_impl  "local" (Megatron's tensor-parallel linears) | "transformer_engine" (TE's, through
                      Megatron-Core's wrappers ``megatron.core.extensions.transformer_engine``)
    fp8               None (BF16) | "hybrid" / "e4m3" (the FP8 format), with
    fp8_recipe        "tensorwise" (per-tensor current scaling: TE's ``Float8CurrentScaling``) |
                      "mxfp8" (TE's ``MXFP8BlockScaling``, Blackwell and newer)

The experiment config's ``model.fp8: null | current | mxfp8`` maps onto them (``FP8_MODES``). Delayed scaling
is refused: rCM calls the student several times per step (F_theta with its JVP, the DMD rollout, the critic's
fake-score pass), and delayed scaling keeps an amax history per module whose reduction forbids calling a
module twice in one autocast region; current scaling measures each tensor's amax when it is quantized, so the
tangent of a linear gets its own scale from its own call.
"""

from __future__ import annotations

import contextlib

TE_INSTALL_HINT = 'pip install -e ".[te]"'
"""The install command named by every error about a missing Transformer Engine."""

TRANSFORMER_IMPLS = ("local", "transformer_engine")

FP8_MODES = {
    None: dict(fp8=None),
    "current": dict(fp8="hybrid", fp8_recipe="tensorwise"),
    "mxfp8": dict(fp8="e4m3", fp8_recipe="mxfp8"),
}
"""Experiment-config ``model.fp8`` -> the ``TransformerConfig`` fields it sets (format, recipe). Current scaling
uses HYBRID (E4M3 forward, E5M2 gradients: TE's default for it); MXFP8 uses E4M3 throughout (TE's default)."""

FP8_RECIPES = ("tensorwise", "mxfp8")

DELAYED_REFUSED = (
    "delayed scaling is not supported: rCM calls the student several times per step (F_theta and its JVP "
    "tangent, the DMD rollout) and delayed scaling's amax history and reduction forbid calling a module twice "
    "in one autocast region; use current scaling (model.fp8: current, fp8_recipe='tensorwise') or, on "
    "Blackwell, model.fp8: mxfp8"
)


class TEMissingError(ImportError):
    """Transformer Engine was asked for but cannot be imported."""


def import_te():
    """``transformer_engine.pytorch``, or one clear error with the install command."""
    try:
        import transformer_engine.pytorch as te_pytorch
    except ImportError as err:
        raise TEMissingError(
            f"transformer_impl='transformer_engine' needs Transformer Engine, which cannot be imported ({err}); "
            f"install it on a CUDA machine with `{TE_INSTALL_HINT}` (or set model.transformer_impl: local)"
        ) from err
    return te_pytorch


def fp8_mode_fields(mode, key: str = "model.fp8") -> dict:
    """The ``TransformerConfig`` fields of an experiment-config ``model.fp8`` value (clear errors by name)."""
    if mode == "delayed":
        raise ValueError(f"{key}='delayed': {DELAYED_REFUSED}")
    if mode not in FP8_MODES:
        raise ValueError(f"{key}={mode!r}: expected one of null, current, mxfp8")
    return dict(FP8_MODES[mode])


def check_transformer_impl(cfg) -> None:
    """Refuse implementation / FP8 settings the models do not implement, naming the field (no TE needed)."""
    name = type(cfg).__name__
    if cfg.transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"{name}.transformer_impl={cfg.transformer_impl!r}: expected one of "
                         f"{', '.join(TRANSFORMER_IMPLS)}")
    if not cfg.fp8:
        return
    if cfg.transformer_impl != "transformer_engine":
        raise ValueError(f"{name}.fp8={cfg.fp8!r} needs transformer_impl='transformer_engine' (FP8 GEMMs are "
                         f"Transformer Engine's), got transformer_impl={cfg.transformer_impl!r}")
    if cfg.fp8_recipe == "delayed":
        raise ValueError(f"{name}.fp8_recipe='delayed': {DELAYED_REFUSED}")
    if cfg.fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"{name}.fp8_recipe={cfg.fp8_recipe!r} is not implemented; expected one of "
                         f"{', '.join(FP8_RECIPES)}")
    if cfg.fp8_param:
        raise ValueError(f"{name}.fp8_param=True (FP8 parameters) is not implemented: the tangent GEMM and the "
                         "checkpoints expect high-precision weights")


def fp8_recipe(cfg):
    """The TE recipe object of ``cfg`` (None without FP8)."""
    if not cfg.fp8:
        return None
    import_te()
    from transformer_engine.common import recipe

    fmt = {"hybrid": recipe.Format.HYBRID, "e4m3": recipe.Format.E4M3}[cfg.fp8]
    if cfg.fp8_recipe == "tensorwise":
        return recipe.Float8CurrentScaling(fp8_format=fmt)
    if cfg.fp8_recipe == "mxfp8":
        return recipe.MXFP8BlockScaling(fp8_format=fmt)
    raise ValueError(f"fp8_recipe={cfg.fp8_recipe!r}: expected one of {', '.join(FP8_RECIPES)}")


def check_fp8_device(cfg) -> None:
    """Before any network is built: the GPU can run the recipe, else one error naming the device capability."""
    if not cfg.fp8:
        return
    import_te()
    import torch
    from transformer_engine.pytorch.quantization import check_fp8_support, check_mxfp8_support

    if not torch.cuda.is_available():
        raise RuntimeError(f"fp8={cfg.fp8!r} (recipe {cfg.fp8_recipe!r}) needs a CUDA GPU; none is visible")
    ok, reason = (check_mxfp8_support if cfg.fp8_recipe == "mxfp8" else check_fp8_support)()
    if not ok:
        major, minor = torch.cuda.get_device_capability()
        mode = "mxfp8" if cfg.fp8_recipe == "mxfp8" else "current"
        raise RuntimeError(
            f"model.fp8: {mode} (fp8_recipe={cfg.fp8_recipe!r}) is not supported on "
            f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}): {reason}"
            + (" Use model.fp8: current on Hopper." if mode == "mxfp8" else "")
        )


def fp8_autocast(cfg):
    """The context one network call runs in: TE's FP8 autocast with ``cfg``'s recipe, or a null context.

    The trainer enters it around each call of the student, teacher and critic (never inside a block); the
    backward runs outside it (TE keeps the recipe with the saved tensors)."""
    if not cfg.fp8:
        return contextlib.nullcontext()
    te_pytorch = import_te()
    return te_pytorch.autocast(enabled=True, recipe=fp8_recipe(cfg))


def recompute_context_fn(cfg):
    """``context_fn`` for ``torch.utils.checkpoint`` around a recomputed block: the recompute runs in the
    backward, outside the FP8 region the forward ran in, so it re-enters the same recipe (otherwise TE's
    layers recompute in BF16 and save other tensors than the forward did). Current and block scaling
    quantize from the tensors themselves, so the recompute reproduces the forward's FP8 values.
    ``torch.utils.checkpoint``'s default when the forward ran without FP8."""
    from torch.utils.checkpoint import noop_context_fn

    if not (cfg.fp8 and fp8_active()):
        return noop_context_fn
    return lambda: (contextlib.nullcontext(), fp8_autocast(cfg))


def fp8_active() -> bool:
    """True inside an FP8 autocast region (False whenever TE was never imported)."""
    import sys

    if "transformer_engine.pytorch" not in sys.modules:
        return False
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    return FP8GlobalStateManager.is_fp8_enabled()
