"""Export a Wan model from a Megatron ``dist_checkpointing`` checkpoint to the diffusers, original or rcm layout.

Which checkpoints (the contract, also in docs/conversion.md):

* CKPT is a checkpoint folder (``metadata.json`` + ``.metadata``): one written by ``tools/convert.py
  import``, or one ``step_*`` folder of a training run; or a training run's checkpoint root, or its
  ``latest`` pointer file, which names the checkpoint to use.
* A checkpoint may hold several Wan models, each under a key prefix: its tensors are
  ``{prefix}{parameter name}`` (blocks by global layer number). ``model.``: the converter's output and the
  trainer's ``export_model``; ``student.``, ``ema.student.``, ``critic.`` and ``optimizer.*``: a training
  checkpoint. ``--ema`` picks the one prefix containing ``ema``; otherwise the one model that is not an
  EMA, critic, fake-score, teacher or optimizer copy; ``--prefix`` names one outright (e.g. the student's
  fp32 master weights, ``optimizer.student.fp32_param.student.``).
* The architecture comes from ``wan_config.json`` in the checkpoint folder (or the run root); failing that
  (a training checkpoint) from the run's training config (``--config``/``--set``); failing that from the
  tensor shapes, whose head count is ``--num-heads`` or that of the one preset with these exact shapes
  (none: an error -- guessing hidden / 128 gave a 4-head tiny model 1 head).
* OUT may not be, contain or lie inside CKPT or the checkpoint it designates.

Tensors are read from the checkpoint a few hundred MB at a time and written straight to safetensors
shards: memory stays at that window, whatever the model size. The ``rcm`` layout (the rCM release's and
TurboDiffusion's students) is one ``torch.save`` dict, ``OUT/model.pt``, of the original names under
``net.`` with the linear patch embedding; ``torch.save`` needs the whole dict, so it is held in memory.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_rcm.convert.arch import (
    WanArch,
    from_run_meta,
    from_shapes,
    from_training_config,
    match_preset,
    to_diffusers_config,
    to_original_config,
)
from megatron_rcm.convert.dist_ckpt import (
    load_full_tensors,
    meta_sharded_state_dict,
    read_wan_config,
    resolve_checkpoint,
    sharded_tensors,
    tensor_metadata,
)
from megatron_rcm.convert.errors import ConversionError, KeyMismatchError, ShapeMismatchError
from megatron_rcm.convert.importer import DTYPE_CHOICES, DTYPES, dtype_name, ensure_single_process_parallel
from megatron_rcm.convert.output_dir import (
    atomic_output_dir,
    check_not_source,
    check_output_dir,
    sweep_leftovers,
)
from megatron_rcm.convert.safetensors_io import TensorSpec, write_sharded
from megatron_rcm.convert.wan_keys import external_shape, from_ours

FORMATS = ("diffusers", "original", "rcm")
WEIGHTS_STEM = "diffusion_pytorch_model"  # both releases name their DiT weights this way
RCM_FILE = "model.pt"
_ANCHOR = "patch_embedding.weight"
_NOT_THE_STUDENT = ("ema", "critic", "fake", "teacher", "optimizer")


def model_prefixes(keys) -> list[str]:
    return sorted(k[: -len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR))


def select_prefix(keys, ema: bool, prefix: str | None) -> str:
    found = model_prefixes(keys)
    if prefix is not None:
        if prefix not in found:
            raise ConversionError(f"--prefix {prefix!r}: no Wan model under it; models found under {found}")
        return prefix
    if ema:
        chosen = [p for p in found if "ema" in p.lower() and not p.startswith("optimizer")]
        what = "an EMA model (--ema)"
    else:
        chosen = [p for p in found if not any(w in p.lower() for w in _NOT_THE_STUDENT)]
        what = "the raw model"
    if len(chosen) != 1:
        raise ConversionError(
            f"cannot tell which checkpoint prefix holds {what}: Wan models found under {found}; "
            "name one with --prefix"
        )
    return chosen[0]


def checkpoint_arch(
    ckpt_dir: Path, shapes: dict, num_heads: int | None, train_config: tuple | None = None
) -> tuple[WanArch, str]:
    """The architecture of the model in ``ckpt_dir``, and where it came from: ``wan_config.json`` in the
    checkpoint folder or the run root, or the run's config the trainer stored in ``meta.json``; else the
    training config given here (``train_config``: the YAML path or None, and its overrides; checked against
    a record when there is one); else the tensor shapes (see ``from_shapes`` for the head count)."""
    run_root = [ckpt_dir.parent] if (ckpt_dir.parent / "latest").is_file() else []
    arch = None
    for folder in [ckpt_dir, *run_root]:
        record = read_wan_config(folder)
        if record is not None:
            arch, arch_from = record["arch"], str(folder / "wan_config.json")
            break
    if arch is None:
        recorded = from_run_meta(ckpt_dir)
        if recorded is not None:
            arch, arch_from = recorded, f"the run's config in {ckpt_dir / 'meta.json'}"
    if train_config is not None:
        path, sets = train_config
        from_config = from_training_config(path, sets)
        given = " ".join(([f"--config {path}"] if path is not None else []) + [f"--set {s}" for s in sets])
        if arch is None:
            arch, arch_from = from_config, f"the training config ({given})"
        elif from_config != arch:
            diffs = [
                f"{f.name} {getattr(from_config, f.name)} (config) != {getattr(arch, f.name)}"
                for f in dataclasses.fields(WanArch)
                if getattr(from_config, f.name) != getattr(arch, f.name)
            ]
            raise ConversionError(f"{given} contradicts {arch_from}: {'; '.join(diffs)}")
    if arch is None:
        hint = (
            "a training checkpoint does not record it: pass the run's config (--config RUN.yaml, with the "
            "same --set overrides as the training command), or --num-heads N"
        )
        return from_shapes(shapes, num_heads, heads_hint=hint), "tensor shapes"
    if num_heads is not None and num_heads != arch.num_attention_heads:
        raise ConversionError(
            f"--num-heads {num_heads} contradicts {arch_from} ({arch.num_attention_heads} heads)"
        )
    return arch, arch_from


class _Window:
    """Reads tensors in the order they will be asked for, ``budget`` bytes per checkpoint read."""

    def __init__(self, ckpt_dir: Path, order: list[tuple[str, tuple, torch.dtype]], budget: int):
        self.ckpt_dir, self.order, self.budget = ckpt_dir, order, budget
        self.pos = {key: i for i, (key, _, _) in enumerate(order)}
        self.cache: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor:
        if key not in self.cache:
            batch, size = {}, 0
            for k, shape, dtype in self.order[self.pos[key] :]:
                nbytes = torch.Size(shape).numel() * dtype.itemsize
                if batch and size + nbytes > self.budget:
                    break
                batch[k] = (shape, dtype)
                size += nbytes
            self.cache.update(load_full_tensors(self.ckpt_dir, batch))
        return self.cache.pop(key)


@dataclass
class ExportReport:
    out: str
    ckpt: str
    prefix: str
    fmt: str
    arch: WanArch
    arch_from: str
    preset: str | None
    files: list[str]
    tensors: int
    bytes_written: int
    dtype: str
    seconds: float

    def summary(self) -> str:
        return "\n".join(
            [
                f"read:    {self.ckpt} (models under prefix {self.prefix!r}; architecture from {self.arch_from}; "
                f"preset {self.preset or 'none'})",
                f"wrote:   {self.out}: {self.fmt} layout, {self.tensors} tensors, {self.dtype}, "
                f"{self.bytes_written / 1e9:.2f} GB in {self.seconds:.1f} s: {', '.join(self.files)}",
            ]
        )


def run_export(
    ckpt,
    out,
    *,
    fmt: str,
    ema: bool = False,
    prefix: str | None = None,
    dtype: str = "keep",
    num_heads: int | None = None,
    train_config: str | None = None,
    train_set=(),
    overwrite: bool = False,
    pipeline_from: str | None = None,
    max_shard_bytes: int = 10 * 2**30,
    read_budget_bytes: int = 512 * 2**20,
    progress: bool = True,
    log=print,
) -> ExportReport:
    if fmt not in FORMATS:
        raise ConversionError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    if pipeline_from is not None and fmt != "diffusers":
        raise ConversionError("--pipeline-from writes a diffusers pipeline folder: it needs --format diffusers")
    from megatron_rcm.convert.experts import expert_folders, run_export_experts

    if expert_folders(ckpt) is not None:  # a converted Wan2.2 A14B folder: both experts
        return run_export_experts(ckpt, out, fmt=fmt, ema=ema, prefix=prefix, dtype=dtype, num_heads=num_heads,
                                  train_config=train_config, train_set=train_set, overwrite=overwrite,
                                  pipeline_from=pipeline_from, max_shard_bytes=max_shard_bytes,
                                  read_budget_bytes=read_budget_bytes, progress=progress, log=log)
    t0 = time.time()
    ckpt_dir = resolve_checkpoint(ckpt)
    check_not_source(out, [ckpt, ckpt_dir], "checkpoint")
    if pipeline_from is not None:
        check_not_source(out, [pipeline_from], "pipeline folder")
    check_output_dir(out, overwrite)
    sweep_leftovers(out, log)
    stored = tensor_metadata(ckpt_dir)
    pfx = select_prefix(stored, ema, prefix)
    ours_shapes = {k[len(pfx) :]: shape for k, (shape, _) in stored.items() if k.startswith(pfx)}
    use_config = train_config is not None or bool(train_set)
    arch, arch_from = checkpoint_arch(
        ckpt_dir, ours_shapes, num_heads, (train_config, tuple(train_set)) if use_config else None
    )
    preset = match_preset(arch)
    if pipeline_from is not None:
        from megatron_rcm.pipeline.pipeline_folder import check_pipeline_source

        check_pipeline_source(pipeline_from, arch)
    log(
        f"checkpoint: {ckpt_dir}, model prefix {pfx!r}, architecture from {arch_from}, preset {preset or 'none'}"
    )

    ensure_single_process_parallel()
    expected = {k: tuple(sh.global_shape) for k, sh in sharded_tensors(meta_sharded_state_dict(arch)).items()}
    wan_names = set()
    for key in ours_shapes:
        try:
            from_ours(key, fmt)
            wan_names.add(key)
        except KeyError:
            pass  # not a Wan parameter (e.g. an optimizer's state under the same prefix)
    what = f"{ckpt_dir} (prefix {pfx!r}, architecture from {arch_from})"
    missing = sorted(pfx + k for k in expected if k not in ours_shapes)
    unexpected = sorted(pfx + k for k in wan_names if k not in expected)
    if missing or unexpected:
        raise KeyMismatchError(what, missing, unexpected)
    bad = [(pfx + k, ours_shapes[k], shape) for k, shape in expected.items() if ours_shapes[k] != shape]
    if bad:
        raise ShapeMismatchError(what, bad)

    specs, source_of, order = [], {}, []
    for key, shape in expected.items():
        stored_dtype = stored[pfx + key][1]
        name = from_ours(key, fmt)
        out_dtype = stored_dtype if dtype == "keep" else DTYPES[dtype]
        specs.append(
            TensorSpec(name, external_shape(key, shape, arch.in_channels, arch.patch_size, fmt), out_dtype)
        )
        source_of[name] = pfx + key
        order.append((pfx + key, shape, stored_dtype))
    window = _Window(ckpt_dir, order, read_budget_bytes)

    def produce(name: str) -> torch.Tensor:
        spec = specs_by_name[name]
        return window.get(source_of[name]).reshape(spec.shape).to(spec.dtype)

    specs_by_name = {s.name: s for s in specs}
    config = (
        to_diffusers_config(arch, _diffusers_version()) if fmt == "diffusers" else to_original_config(arch)
    )
    bar = tqdm(total=len(specs), unit="tensor", desc=f"export {fmt}", disable=not progress)
    with atomic_output_dir(out, overwrite) as tmp:
        dit_dir = tmp if pipeline_from is None else tmp / "transformer"  # a pipeline: the student's folder
        dit_dir.mkdir(exist_ok=True)
        if fmt == "rcm":
            state = {}
            for spec in specs:
                state[spec.name] = produce(spec.name).contiguous()
                bar.update(1)
            torch.save(state, dit_dir / RCM_FILE)
            files = [RCM_FILE]
        else:
            files = write_sharded(
                dit_dir, WEIGHTS_STEM, specs, produce, max_shard_bytes, on_tensor=lambda s: bar.update(1)
            )
        bar.close()
        (dit_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files.append("config.json")
        if pipeline_from is not None:
            from megatron_rcm.pipeline.pipeline_folder import copy_components

            files = [f"transformer/{f}" for f in files] + copy_components(Path(pipeline_from), tmp)
        nbytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    kept = sorted({dtype_name(s.dtype) for s in specs})
    return ExportReport(
        out=str(out),
        ckpt=str(ckpt_dir),
        prefix=pfx,
        fmt=fmt,
        arch=arch,
        arch_from=arch_from,
        preset=preset,
        files=files,
        tensors=len(specs),
        bytes_written=nbytes,
        dtype="+".join(kept),
        seconds=time.time() - t0,
    )


def _diffusers_version() -> str:
    try:
        import diffusers

        return re.sub(r"(\.dev\d*|\+.*)$", "", diffusers.__version__)
    except ImportError:
        return "0.35.0"
