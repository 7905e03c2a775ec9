"""Import / export Cosmos-Predict2 weights: the original release (``net.``-prefixed ``model.pt``) and
diffusers ``CosmosTransformer3DModel`` folders <-> a Megatron ``dist_checkpointing`` checkpoint.

    import_cosmos(SRC, OUT, preset)          SRC: a .pt/.pth/.safetensors file or a diffusers folder/pipeline
    export_cosmos(CKPT, OUT, preset, fmt)    fmt: "original" (OUT/model.pt) or "diffusers" (OUT/config.json +
                                             OUT/diffusion_pytorch_model.safetensors)

The preset is required (RoPE scales and fps are not in the weights); a diffusers ``config.json`` that
disagrees with it is refused naming the fields. Every key and shape is checked before anything is
written (the same ``KeyMismatchError`` / ``ShapeMismatchError`` as the Wan converter), the output
appears atomically and never inside its source, and the checkpoint loads at any TP size (Megatron
reshards on load). The conversion is bit-exact: tensors are copied, never recomputed (dtype "keep").
``verify`` re-reads OUT into a fresh model and compares it with a model loaded straight from SRC on
random inputs, and (diffusers installed) with ``CosmosTransformer3DModel`` itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_rcm.convert.cosmos_keys import (
    detect_layout_of_keys,
    from_ours,
    map_key,
    strip_original,
    to_external,
)
from megatron_rcm.convert.dist_ckpt import MODEL_PREFIX, resolve_checkpoint
from megatron_rcm.convert.errors import (
    ConversionError,
    KeyMismatchError,
    ShapeMismatchError,
    UnknownLayoutError,
    VerificationError,
)
from megatron_rcm.convert.importer import DTYPES, ensure_single_process_parallel
from megatron_rcm.convert.output_dir import (
    atomic_output_dir,
    check_not_source,
    check_output_dir,
    sweep_leftovers,
)
from megatron_rcm.convert.sources import open_source
from megatron_rcm.models.cosmos import PRESETS, CosmosModel, cosmos_config

CONFIG_NAME = "cosmos_config.json"
DEFAULT_TOL = 1e-4  # relative; float32 models agree to ~1e-6, bf16 sources are compared in float32


def detect_layout(keys) -> str:
    layout = detect_layout_of_keys(keys)
    if layout is not None:
        return layout
    raise UnknownLayoutError(
        f"not a Cosmos-Predict2 checkpoint: no 'net.'/'net_ema.' (original) or 'transformer_blocks.' "
        f"(diffusers) keys; first keys {sorted(keys)[:3]}"
    )


def diffusers_config(preset: str) -> dict:
    """The ``CosmosTransformer3DModel`` config of a preset (diffusers' in_channels excludes the padding
    mask, as ours does; the Video2World condition mask is counted in both)."""
    cfg = cosmos_config(preset, tensor_model_parallel_size=1)
    return {
        "_class_name": "CosmosTransformer3DModel",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.head_dim,
        "num_layers": cfg.num_layers,
        "mlp_ratio": cfg.ffn_hidden_size / cfg.hidden_size,
        "text_embed_dim": cfg.text_dim,
        "adaln_lora_dim": cfg.adaln_lora_dim,
        "max_size": list(cfg.max_size),
        "patch_size": list(cfg.patch_size),
        "rope_scale": list(cfg.rope_scale),
        "concat_padding_mask": cfg.concat_padding_mask,
        "extra_pos_embed_type": "learnable" if cfg.pos_embedding == "learnable" else None,
    }


def _check_diffusers_config(found: dict, preset: str, where) -> None:
    want = diffusers_config(preset)
    bad = []
    for k, v in want.items():
        if k.startswith("_") or k not in found:
            continue
        f = found[k]
        same = [float(a) for a in f] == [float(b) for b in v] if isinstance(v, list) else f == v
        if not same:
            bad.append(f"{k}: {f!r} (preset {preset!r}: {v!r})")
    if bad:
        raise ConversionError(f"{where}/config.json does not describe preset {preset!r}: " + "; ".join(bad))


def _expected_shapes(cfg) -> dict[str, tuple]:
    with torch.device("meta"):
        model = CosmosModel(cfg)
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


def plan(source, preset: str) -> tuple[str, dict[str, str], list[str]]:
    """(layout, {our key: source key}, dropped source keys); every key and shape checked against the preset."""
    if preset not in PRESETS:
        raise ConversionError(f"--preset {preset!r}: not a Cosmos preset; known: {', '.join(PRESETS)}")
    keys = source.keys()
    layout = detect_layout(keys)
    dropped: list[str] = []
    if layout == "original":
        names, prefix, dropped = strip_original({k: None for k in keys})
        pairs = {k: prefix + k for k in names}
    else:
        pairs = {k: k for k in keys}
        if source.config is not None:
            _check_diffusers_config(source.config, preset, source.root)
    ours_of, unexpected = {}, []
    for ext, src_key in pairs.items():
        try:
            ours_of[map_key(ext, layout)] = src_key
        except KeyError:
            unexpected.append(src_key)
    expected = _expected_shapes(cosmos_config(preset, tensor_model_parallel_size=1))
    missing = sorted(set(expected) - set(ours_of))
    unexpected += [ours_of.pop(k) for k in sorted(set(ours_of) - set(expected))]
    if missing or unexpected:
        raise KeyMismatchError(
            f"{source.root} ({layout} layout) against preset {preset!r}",
            [from_ours(k, layout) for k in missing],
            sorted(unexpected),
        )
    wrong = [
        (ours_of[k], source.shape(ours_of[k]), expected[k])
        for k in expected
        if source.shape(ours_of[k]) != expected[k]
    ]
    if wrong:
        raise ShapeMismatchError(f"{source.root} against preset {preset!r}", wrong)
    return layout, dict(sorted(ours_of.items())), dropped


def _build(preset: str, dtype: torch.dtype, full: dict | None = None) -> CosmosModel:
    from megatron_rcm.parallel.sharding import load_full_state_dict

    model = CosmosModel(cosmos_config(preset, params_dtype=dtype, tensor_model_parallel_size=1)).eval()
    if full is not None:
        load_full_state_dict(model, full, strict=True)
    return model


def _save_dist(model, out_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    from megatron_rcm.parallel.mcore_compat import patch_psutil

    patch_psutil()
    dist_checkpointing.save(model.sharded_state_dict(prefix=MODEL_PREFIX), str(out_dir))


def _load_dist(preset: str, ckpt: Path, dtype: torch.dtype, prefix: str) -> CosmosModel:
    from megatron.core import dist_checkpointing

    model = _build(preset, dtype)
    loaded = dist_checkpointing.load(model.sharded_state_dict(prefix=prefix), str(ckpt))
    model.load_state_dict({k[len(prefix) :]: v for k, v in loaded.items()}, strict=True)
    return model


def import_cosmos(
    src,
    out,
    preset: str,
    *,
    dtype: str = "keep",
    overwrite: bool = False,
    verify: bool = False,
    tol: float = DEFAULT_TOL,
    log=print,
) -> dict:
    """SRC -> Megatron checkpoint OUT (see the module docstring). Returns a report dict."""
    if dtype not in ("keep", *DTYPES):
        raise ConversionError(f"--dtype {dtype!r}: choose one of keep, {', '.join(DTYPES)}")
    check_not_source(out, [src])
    check_output_dir(out, overwrite)
    sweep_leftovers(out, log)
    ensure_single_process_parallel()
    source = open_source(src)
    try:
        check_not_source(out, source.files)
        layout, ours_of, dropped = plan(source, preset)
        dtypes = {source.dtype(k) for k in ours_of.values()}
        if dtype == "keep" and len(dtypes) != 1:
            raise ConversionError(
                f"{src}: tensors of several dtypes {sorted(map(str, dtypes))}; choose --dtype"
            )
        target = DTYPES[dtype] if dtype != "keep" else dtypes.pop()
        full = {o: source.read(k).to(target) for o, k in ours_of.items()}
    finally:
        source.close()
    nonfinite = [ours_of[k] for k, t in full.items() if not torch.isfinite(t).all()]
    if nonfinite:
        log(
            f"warning: {len(nonfinite)} tensor(s) of {src} hold NaN/inf values (converted as they are): "
            + ", ".join(nonfinite)
        )
    log(
        f"{src}: {layout} layout, preset {preset}, {len(full)} tensors ({len(dropped)} non-parameter entries dropped)"
    )
    model = _build(preset, target, full)
    report = {
        "layout": layout,
        "preset": preset,
        "tensors": len(full),
        "dropped": dropped,
        "dtype": str(target),
    }
    with atomic_output_dir(out, overwrite) as tmp:
        _save_dist(model, tmp)
        (tmp / CONFIG_NAME).write_text(
            json.dumps(
                {
                    "family": "cosmos",
                    "preset": preset,
                    "dtype": str(target).removeprefix("torch."),
                    "source": {"path": str(src), "layout": layout},
                },
                indent=2,
            )
        )
        if verify:
            source_sd = {ours_of[k]: v for k, v in full.items()}
            report["verify"] = verify_checkpoint(tmp, preset, full, tol, (layout, source_sd))
    return report


def _random_inputs(cfg, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    F_ = 2 if cfg.model_type == "v2w" else 1
    x = torch.randn(1, cfg.in_channels, F_, 8, 8, generator=gen)
    return dict(
        x=x, timestep=torch.rand(1, generator=gen), context=torch.randn(1, 5, cfg.text_dim, generator=gen)
    )


def verify_checkpoint(ckpt: Path, preset: str, full: dict, tol: float = DEFAULT_TOL, source=None) -> dict:
    """The written checkpoint holds exactly ``full`` (bit-exact) and its model's output equals that of
    a model loaded from ``full`` and, when diffusers is importable and ``source = (layout, its state
    dict)`` is given, that of diffusers' own model loaded from the source through diffusers' own key
    conversion (an oracle independent of our key tables), within ``tol`` (relative)."""
    dtype = next(iter(full.values())).dtype
    reloaded = _load_dist(preset, ckpt, dtype, MODEL_PREFIX)
    differ = [k for k, v in _params(reloaded).items() if not torch.equal(v, full[k])]
    if differ:
        raise VerificationError(f"{len(differ)} tensor(s) differ after the round trip: {differ[:5]}")
    fp32 = {k: v.float() for k, v in full.items()}
    ours = _build(preset, torch.float32, {k: v.float() for k, v in _params(reloaded).items()})
    inp = _random_inputs(ours.config)
    with torch.no_grad():
        v = ours(inp["x"], inp["timestep"], inp["context"])
        v_ref = _build(preset, torch.float32, fp32)(inp["x"], inp["timestep"], inp["context"])
    result = {"tensors_bit_exact": len(full), "rel_err_reload": _rel(v, v_ref)}
    v_diff = None if source is None else _diffusers_output(preset, *source, inp, ours.config)
    if v_diff is not None:
        result["rel_err_diffusers"] = _rel(v, v_diff)
    bad = {k: e for k, e in result.items() if k.startswith("rel_err") and not (e <= tol)}
    if bad or not torch.isfinite(v).all():
        raise VerificationError(f"--verify: output differs beyond tol {tol:g} or is not finite: {result}")
    return result


def _params(model) -> dict:
    """Parameter tensors by name (``state_dict`` also holds the linears' ``_extra_state`` entries)."""
    return {k: v.detach() for k, v in model.named_parameters()}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _diffusers_output(preset, layout: str, source_sd: dict, inp: dict, cfg):
    """diffusers' model on the source's weights, or None when diffusers is not installed. An original
    checkpoint goes through diffusers' ``convert_cosmos_transformer_checkpoint_to_diffusers``. The
    padding-mask resize (torchvision) is skipped: the mask is given at the latent size (identity)."""
    try:
        import diffusers.models.transformers.transformer_cosmos as tc
        from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers
    except ImportError:
        return None
    sd = {k: v.float() for k, v in source_sd.items()}
    if layout == "original":
        sd = convert_cosmos_transformer_checkpoint_to_diffusers(
            {"net." + k.split(".", 1)[1]: v for k, v in sd.items()}
        )
        # diffusers' Cosmos-2.0 table has no rule for the (Predict2-unused) learnable position embedding
        sd = {k.replace("extra_pos_embedder.", "learnable_pos_embed."): v for k, v in sd.items()}
    config = {k: v for k, v in diffusers_config(preset).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = tc.CosmosTransformer3DModel(**config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.float().eval()
    for mod in model.modules():  # diffusers' q/k norm eps is 1e-5; ours (the original's) 1e-6
        if type(mod).__name__ == "RMSNorm" and getattr(mod, "eps", None) == 1e-5:
            mod.eps = cfg.qk_norm_eps
    x, kwargs = inp["x"], {}
    if cfg.model_type == "v2w":
        x, kwargs["condition_mask"], kwargs["fps"] = x[:, :-1], x[:, -1:], cfg.rope_fps
    saved = getattr(tc, "transforms", None)
    tc.transforms = _IdentityResize
    try:
        with torch.no_grad():
            pad = torch.zeros(1, 1, *x.shape[-2:])
            return model(x, inp["timestep"], inp["context"], padding_mask=pad, return_dict=False, **kwargs)[0]
    finally:
        if saved is None:
            del tc.transforms
        else:
            tc.transforms = saved


class _IdentityResize:
    """Stands in for torchvision.transforms where the padding mask already has the target size."""

    class InterpolationMode:
        NEAREST = "nearest"

    class functional:  # noqa: N801  (mirrors torchvision.transforms.functional)
        @staticmethod
        def resize(img, size, interpolation):
            if list(img.shape[-2:]) != list(size):
                raise ValueError("the padding mask must be given at the latent size here")
            return img


def read_cosmos_config(ckpt: Path) -> dict | None:
    path = Path(ckpt) / CONFIG_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def export_cosmos(
    ckpt,
    out,
    fmt: str,
    preset: str | None = None,
    *,
    prefix: str = MODEL_PREFIX,
    dtype: str = "keep",
    overwrite: bool = False,
    original_prefix: str = "net.",
    log=print,
) -> dict:
    """Megatron checkpoint -> original ``model.pt`` or diffusers folder (see the module docstring)."""
    if fmt not in ("original", "diffusers"):
        raise ConversionError(f"--format {fmt!r}: choose original or diffusers")
    ckpt = resolve_checkpoint(ckpt)
    check_not_source(out, [ckpt])
    check_output_dir(out, overwrite)
    recorded = read_cosmos_config(ckpt) or {}
    preset = preset or recorded.get("preset")
    if preset is None:
        raise ConversionError(f"{ckpt}: no {CONFIG_NAME} recording the preset; pass --preset")
    if preset not in PRESETS:
        raise ConversionError(f"--preset {preset!r}: not a Cosmos preset; known: {', '.join(PRESETS)}")
    ensure_single_process_parallel()
    from megatron_rcm.convert.dist_ckpt import tensor_metadata

    meta = tensor_metadata(ckpt)
    stored = {d for k, (_, d) in meta.items() if k.startswith(prefix)}
    if not stored:
        raise ConversionError(
            f"{ckpt}: no tensors under prefix {prefix!r}; prefixes found: "
            f"{sorted({k.split('.')[0] + '.' for k in meta})}"
        )
    target = DTYPES[dtype] if dtype != "keep" else stored.pop()
    model = _load_dist(preset, ckpt, target, prefix)
    ext = to_external({k: v.contiguous() for k, v in _params(model).items()}, fmt, original_prefix)
    with atomic_output_dir(out, overwrite) as tmp:
        if fmt == "original":
            torch.save(ext, tmp / "model.pt")
        else:
            from safetensors.torch import save_file

            save_file(ext, str(tmp / "diffusion_pytorch_model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(diffusers_config(preset), indent=2))
    log(f"{ckpt} -> {out} ({fmt}, preset {preset}, {len(ext)} tensors)")
    return {"format": fmt, "preset": preset, "tensors": len(ext)}


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_rcm.convert.cosmos {import,export} ...``; conversion errors exit with 2
    (``--verify`` failures with 3), as ``tools/convert.py`` does for Wan."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(
        prog="python -m megatron_rcm.convert.cosmos", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="original model.pt or diffusers folder -> Megatron checkpoint")
    imp.add_argument("src")
    imp.add_argument("out")
    imp.add_argument("--preset", required=True, choices=PRESETS)
    imp.add_argument("--dtype", default="keep", choices=("keep", *DTYPES))
    imp.add_argument(
        "--verify", action="store_true", help="compare OUT with the source (and diffusers) numerically"
    )
    imp.add_argument("--verify-tol", type=float, default=DEFAULT_TOL)
    exp = sub.add_parser("export", help="Megatron checkpoint -> original model.pt or diffusers folder")
    exp.add_argument("ckpt", help="checkpoint folder, a run's checkpoint root or its 'latest' file")
    exp.add_argument("out")
    exp.add_argument("--format", required=True, choices=("original", "diffusers"), dest="fmt")
    exp.add_argument("--preset", choices=PRESETS, help="default: the one recorded in cosmos_config.json")
    exp.add_argument(
        "--prefix", default=MODEL_PREFIX, help="checkpoint key prefix of the model (e.g. 'ema.student.')"
    )
    exp.add_argument("--original-prefix", default="net.", choices=("net.", "net_ema."))
    exp.add_argument("--dtype", default="keep", choices=("keep", *DTYPES))
    for p in (imp, exp):
        p.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.command == "import":
            import_cosmos(
                args.src,
                args.out,
                args.preset,
                dtype=args.dtype,
                overwrite=args.overwrite,
                verify=args.verify,
                tol=args.verify_tol,
            )
        else:
            export_cosmos(
                args.ckpt,
                args.out,
                args.fmt,
                args.preset,
                prefix=args.prefix,
                dtype=args.dtype,
                overwrite=args.overwrite,
                original_prefix=args.original_prefix,
            )
    except VerificationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
