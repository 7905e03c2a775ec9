"""Import Wan2.1 weights (original, diffusers, or rCM/TurboDiffusion student layout) into a Megatron ``dist_checkpointing`` checkpoint.

    plan_import(SRC)  -> ImportPlan: files, layout, architecture, preset; every key and shape checked
    run_import(SRC, OUT, ...) -> ImportReport: the checkpoint written (streaming), optionally verified

Nothing is written until the whole source has been checked, and OUT appears only once complete.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from megatron_rcm.convert.arch import (
    WanArch,
    from_config_json,
    from_shapes,
    match_preset,
    preset_arch,
    shape_differences,
)
from megatron_rcm.convert.dist_ckpt import (
    MODEL_PREFIX,
    meta_sharded_state_dict,
    save_streaming,
    sharded_tensors,
    write_wan_config,
)
from megatron_rcm.convert.errors import (
    ConversionError,
    KeyMismatchError,
    ShapeMismatchError,
    VerificationError,
)
from megatron_rcm.convert.output_dir import (
    atomic_output_dir,
    check_not_source,
    check_output_dir,
    sweep_leftovers,
)
from megatron_rcm.convert.sources import Source, detect_layout, open_source
from megatron_rcm.convert.wan_keys import (
    RCM_PREFIXES,
    external_shape,
    from_ours,
    map_key,
    patch_weight_to_ours,
    rcm_prefix,
)

_LAYOUT_NAMES = {
    "diffusers": "WanTransformer3DModel keys",
    "original": "original WanModel keys",
    "rcm": "rCM/TurboDiffusion student: original WanModel keys under {prefix}, linear patch embedding",
}


def config_layout(layout: str) -> str:
    """The layout of a ``config.json`` beside weights in ``layout`` (an rCM student uses WanModel's)."""
    return "original" if layout == "rcm" else layout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_CHOICES = ("keep", *DTYPES)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def check_tp(arch: WanArch, tp: int) -> None:
    """The model splits over ``tp`` ranks: heads (and so hidden) and the FFN width divide by it."""
    bad = [
        f"{name} {value}"
        for name, value in (
            ("num_attention_heads", arch.num_attention_heads),
            ("ffn_hidden_size", arch.ffn_hidden_size),
        )
        if value % tp
    ]
    if tp < 1 or bad:
        raise ConversionError(f"--tp {tp}: {', '.join(bad) or 'must be >= 1'} not divisible by {tp}")


def ensure_single_process_parallel() -> None:
    """The converter is one process: a gloo group of one, TP=1 (dist_checkpointing needs a group). Its
    rendezvous gets a fresh port: a MASTER_PORT inherited from a parent process may be taken."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_rcm.parallel.state import free_port, initialize_parallel

    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise ConversionError(
                "run the converter as a single process (not under torchrun): it writes every shard"
            )
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        initialize_parallel(tensor_parallel=1)
    elif dist.get_world_size() != 1 or parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ConversionError(
            "run the converter as a single process (not under torchrun): it writes every shard"
        )


@dataclass
class ImportPlan:
    source: Source
    layout: str
    arch: WanArch
    arch_from: str
    preset: str | None
    ours_of: dict[str, str]
    """source key -> our key"""
    shapes: dict[str, tuple] = field(default_factory=dict)
    """our key -> global shape in the checkpoint"""
    rcm_prefix: str | None = None
    """rcm layout: the prefix read (``net_ema.`` when the file has it, else ``net.``)."""
    skipped: list[str] = field(default_factory=list)
    """rcm layout: the keys under the other prefix (not read)."""

    def describe(self) -> str:
        s = self.source
        where = str(s.index or (s.files[0] if len(s.files) == 1 else s.root))
        if s.pipeline_root is not None:
            where += f" (transformer/ of the pipeline at {s.pipeline_root})"
        a = self.arch
        return "\n".join(
            [
                f"source:  {where}: {len(s.files)} file(s), {len(self.ours_of)} tensors, {s.total_bytes() / 1e9:.2f} GB",
                f"layout:  {self.layout} ({_LAYOUT_NAMES[self.layout].format(prefix=self.rcm_prefix)})"
                + (f"; {len(self.skipped)} tensors under {self.skipped[0].split('.')[0]}. not read" if self.skipped else ""),
                f"preset:  {self.preset or 'none (architecture taken from ' + self.arch_from + ')'}",
                f"arch:    {a.model_type}, {a.num_layers} layers, hidden {a.hidden_size}, ffn {a.ffn_hidden_size}, "
                f"{a.num_attention_heads} heads, in/out channels {a.in_channels}/{a.out_channels}, patch "
                f"{a.patch_size}, text {a.text_dim}, freq {a.freq_dim}"
                + (f", image {a.image_dim}" if a.model_type == "i2v" else "")
                + f" (from {self.arch_from})",
            ]
        )


def source_paths(src, source: Source) -> list:
    """Everything an import reads: SRC itself, the weight files, the index and config.json."""
    paths = [src, *source.files, source.index, source.root / "config.json", source.pipeline_root]
    return [p for p in paths if p is not None and os.path.lexists(p)]


def check_preset_fits(
    src, source: Source, layout: str, ours_of_key: dict, preset: str, arch: WanArch
) -> None:
    """``--preset`` against the source: when the shapes say another architecture, one line per differing
    field (layers, widths, channels, ...) instead of hundreds of missing/unexpected keys."""
    shapes = {o: source.shape(k) for o, k in ours_of_key.items()}
    try:
        found = from_shapes(shapes, num_heads=1, patch_size=arch.patch_size)  # heads: in no shape
    except ConversionError:
        return  # too few known tensors to tell: the key and shape checks report what is wrong
    diffs = shape_differences(found, arch)
    heads = []
    if source.config is not None:
        try:
            cfg_heads = from_config_json(source.config, config_layout(layout)).num_attention_heads
        except ConversionError:
            cfg_heads = None
        if cfg_heads is not None and cfg_heads != arch.num_attention_heads:
            heads = [("num_attention_heads (config.json)", cfg_heads, arch.num_attention_heads)]
    if diffs or heads:
        rows = [f"  {name:<24} {str(a):>14} {str(b):>14}" for name, a, b in diffs + heads]
        raise ConversionError(
            "\n".join(
                [
                    f"--preset {preset} does not describe {src} ({len(diffs) + len(heads)} field(s) differ):",
                    f"  {'field':<24} {'source':>14} {'preset':>14}",
                    *rows,
                    f"  drop --preset to take the architecture from {'config.json' if source.config else 'the shapes'}",
                ]
            )
        )


def plan_import(src, preset: str | None = None, num_heads: int | None = None) -> ImportPlan:
    """Open SRC, detect its layout and architecture, and check every key and shape against the model."""
    source = open_source(src)
    try:
        layout = detect_layout(source.keys(), source.config)
        prefix = rcm_prefix(source.keys()) if layout == "rcm" else None
        ours_of, unexpected, seen, skipped = {}, [], {}, []
        for key in source.keys():
            if prefix is not None and key.startswith(RCM_PREFIXES) and not key.startswith(prefix):
                skipped.append(key)  # the other copy (raw student beside its EMA): the EMA is read
                continue
            try:
                ours = map_key(key, layout)
            except KeyError:
                unexpected.append(key)
                continue
            if ours in seen:
                raise ConversionError(f"{key!r} and {seen[ours]!r} both map to {ours!r}")
            seen[ours] = key
            ours_of[key] = ours
        if preset is not None:
            arch, arch_from = preset_arch(preset), f"--preset {preset}"
            check_preset_fits(src, source, layout, seen, preset, arch)
        elif source.config is not None:
            arch, arch_from = (
                from_config_json(source.config, config_layout(layout)),
                f"{source.root / 'config.json'}",
            )
            clip_norm = seen.get("img_emb.norm1.weight")
            if layout in ("original", "rcm") and arch.model_type == "i2v" and clip_norm is not None:
                # the original config has no CLIP width (WanModel hard-codes 1280): the tensor says it
                arch = dataclasses.replace(arch, image_dim=source.shape(clip_norm)[0])
        else:
            shapes = {o: source.shape(k) for k, o in ours_of.items()}
            hint = f"give it with --num-heads, or put the model's config.json beside the weights in {source.root}"
            arch, arch_from = from_shapes(shapes, num_heads, heads_hint=hint), "tensor shapes"
        if num_heads is not None and num_heads != arch.num_attention_heads:
            raise ConversionError(
                f"--num-heads {num_heads} contradicts {arch_from} ({arch.num_attention_heads} heads)"
            )
        matched = preset or match_preset(arch)
        expected = {
            k: tuple(sh.global_shape) for k, sh in sharded_tensors(meta_sharded_state_dict(arch)).items()
        }
        what = (
            f"{src} ({layout} layout, {'preset ' + matched if matched else 'architecture from ' + arch_from})"
        )
        missing = sorted(from_ours(k, layout) for k in expected if k not in seen)
        unexpected += [k for k, o in ours_of.items() if o not in expected]
        if missing or unexpected:
            raise KeyMismatchError(what, missing, sorted(unexpected))
        mismatches = []
        for key, ours in ours_of.items():
            want = external_shape(ours, expected[ours], arch.in_channels, arch.patch_size, layout)
            # TurboDiffusion's un-prefixed files keep original names with the linear patch embedding
            flat_ok = layout == "original" and ours == "patch_embedding.weight"
            if source.shape(key) != want and not (flat_ok and source.shape(key) == expected[ours]):
                mismatches.append((key, source.shape(key), want))
        if mismatches:
            raise ShapeMismatchError(what, mismatches)
        return ImportPlan(source, layout, arch, arch_from, matched, ours_of, expected, prefix, sorted(skipped))
    except BaseException:
        source.close()
        raise


@dataclass
class ImportReport:
    out: str
    plan: ImportPlan
    dtype: str
    tensors: int
    params: int
    bytes_written: int
    seconds: float
    verify: dict | None = None
    nonfinite: list[str] = field(default_factory=list)
    """Source tensors holding NaN/inf, as "key (count of numel)"."""

    def summary(self) -> str:
        lines = [
            f"wrote:   {self.out}: Megatron dist_checkpointing (torch_dist), {self.tensors} tensors, "
            f"{_count(self.params)} parameters, {self.dtype}, {self.bytes_written / 1e9:.2f} GB in "
            f"{self.seconds:.1f} s",
            f"         model config in {self.out}/wan_config.json; loads at any TP size (resharded on load)",
        ]
        if self.verify is not None:
            v = self.verify
            lines.append(
                f"verify:  max |ours - source| = {v['max_abs']:.3e} (max |source| = {v['max_ref']:.3e}, "
                f"relative {v['rel']:.3e} <= tolerance {v['tol']:.1e}) on input {v['input']}: passed"
            )
        if self.nonfinite:
            lines.append(
                f"warning: {len(self.nonfinite)} source tensor(s) hold NaN/inf: {', '.join(self.nonfinite)}"
            )
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_import(
    src,
    out,
    *,
    tp: int = 1,
    dtype: str = "keep",
    preset: str | None = None,
    num_heads: int | None = None,
    overwrite: bool = False,
    verify: bool = False,
    verify_tol: float | None = None,
    progress: bool = True,
    boundary_ratio: float | None = None,
    log=print,
) -> ImportReport:
    """Convert SRC to a Megatron checkpoint at OUT (see the module docstring). With ``verify``, OUT
    appears only if the verification passes (``VerificationError`` otherwise). A Wan2.2 A14B folder (both
    experts) converts into one folder per expert (``megatron_rcm.convert.experts``, ``boundary_ratio``)."""
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    if tp < 1:
        raise ConversionError(f"--tp {tp}: must be >= 1")
    from megatron_rcm.convert.experts import find_source_experts, run_import_experts

    if find_source_experts(src) is not None:  # a Wan2.2 A14B folder: both experts, one folder each
        return run_import_experts(src, out, tp=tp, dtype=dtype, preset=preset, num_heads=num_heads,
                                  overwrite=overwrite, verify=verify, verify_tol=verify_tol, progress=progress,
                                  boundary_ratio=boundary_ratio, log=log)
    t0 = time.time()
    check_not_source(out, [src])  # fail before reading anything large
    check_output_dir(out, overwrite)
    sweep_leftovers(out, log)
    ensure_single_process_parallel()
    plan = plan_import(src, preset, num_heads)
    source = plan.source
    try:
        check_not_source(out, source_paths(src, source))
        log(plan.describe())
        check_tp(plan.arch, tp)
        if verify:
            from megatron_rcm.convert import verify as verifier

            verifier.preflight(plan)
        src_key_of = {o: k for k, o in plan.ours_of.items()}
        target = {o: source.dtype(k) if dtype == "keep" else DTYPES[dtype] for k, o in plan.ours_of.items()}
        sharded_sd = meta_sharded_state_dict(plan.arch, prefix=MODEL_PREFIX)
        for key, sh in sharded_tensors(sharded_sd).items():
            sh.data = torch.empty(sh.local_shape, dtype=target[key.removeprefix(MODEL_PREFIX)], device="meta")
        kept = sorted({dtype_name(d) for d in target.values()})
        recorded_dtype = "+".join(kept) if dtype == "keep" else dtype
        bar = tqdm(total=len(target), unit="tensor", desc="import", disable=not progress)
        nonfinite: list[str] = []

        def fetch(key: str) -> torch.Tensor:
            ours = key.removeprefix(MODEL_PREFIX)
            t = patch_weight_to_ours(source.read(src_key_of[ours]), ours).to(target[ours])
            bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
            if bad:
                nonfinite.append(f"{src_key_of[ours]} ({bad} of {t.numel()})")
            bar.update(1)
            return t

        with atomic_output_dir(out, overwrite) as tmp:
            save_streaming(sharded_sd, tmp, fetch)
            bar.close()
            if nonfinite:
                log(
                    f"warning: {len(nonfinite)} tensor(s) of {src} hold NaN/inf values (converted as they are): "
                    + ", ".join(sorted(nonfinite))
                )
            write_wan_config(
                tmp,
                plan.arch,
                plan.preset,
                recorded_dtype,
                source={
                    "path": str(src),
                    "layout": plan.layout,
                    "files": [str(p) for p in source.files],
                    "arch_from": plan.arch_from,
                },
                tp_checked=tp,
            )
            nbytes = _dir_bytes(tmp)
            verified = None
            if verify:
                tol = verifier.DEFAULT_TOL if verify_tol is None else verify_tol
                try:
                    verified = verifier.verify_import(plan, tmp, target, tol)
                except VerificationError as e:
                    raise VerificationError(f"{e}; {out} was not written") from None
        return ImportReport(
            out=str(out),
            plan=plan,
            dtype=recorded_dtype,
            tensors=len(target),
            params=sum(torch.Size(s).numel() for s in plan.shapes.values()),
            bytes_written=nbytes,
            seconds=time.time() - t0,
            verify=verified,
            nonfinite=sorted(nonfinite),
        )
    finally:
        source.close()
