"""Wan2.2 A14B two-expert folders: import both experts at once, export both at once.

Sources (``find_source_experts``):

    diffusers pipeline root   transformer/ (high-noise expert)  transformer_2/ (low-noise expert)
    original release folder   high_noise_model/                 low_noise_model/

Converted output (what ``model.teacher_checkpoint`` of a two-expert preset takes, ``expert_folders``)::

    OUT/high_noise_model/   a Megatron checkpoint of the high-noise expert (as ``run_import`` writes one)
    OUT/low_noise_model/    the low-noise expert
    OUT/experts.json        {"boundary_ratio": 0.875, "high": "high_noise_model", "low": "low_noise_model", ...}

The boundary ratio comes from the pipeline's ``model_index.json`` (diffusers' ``WanPipeline`` registers
``boundary_ratio``) when it is there, else from the preset of the converted architecture (``WAN22_BOUNDARY``).
Export writes the source's layout back: ``transformer/`` + ``transformer_2/`` (diffusers), or
``high_noise_model/`` + ``low_noise_model/`` (original, rcm); the boundary ratio is the pipeline's
(``WanPipeline(boundary_ratio=...)``), not written there. OUT is written atomically, as a whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_rcm.convert.errors import UnknownLayoutError
from megatron_rcm.convert.output_dir import atomic_output_dir, check_not_source, check_output_dir

EXPERTS_FILE = "experts.json"
EXPERT_DIRS = {"diffusers": ("transformer", "transformer_2"), "original": ("high_noise_model", "low_noise_model")}
"""Layout -> (high-noise folder, low-noise folder)."""
OUT_DIRS = EXPERT_DIRS["original"]


def find_source_experts(src) -> dict | None:
    """{"layout", "high", "low"} when SRC is a folder holding both experts (module docstring), else None."""
    src = Path(src)
    if not src.is_dir():
        return None
    for layout, (high, low) in EXPERT_DIRS.items():
        if (src / high).is_dir() and (src / low).is_dir():
            return {"layout": layout, "high": src / high, "low": src / low}
    return None


def expert_folders(path) -> dict | None:
    """{"high", "low"} checkpoint folders of a converted two-expert folder, or None when PATH is not one."""
    path = Path(path)
    if not (path / EXPERTS_FILE).is_file():
        return None
    meta = json.loads((path / EXPERTS_FILE).read_text())
    return {k: path / meta[k] for k in ("high", "low")}


def read_boundary_ratio(path) -> float:
    """The boundary ratio recorded in a converted two-expert folder's ``experts.json``."""
    return float(json.loads((Path(path) / EXPERTS_FILE).read_text())["boundary_ratio"])


def boundary_ratio_of(path, config, given: float | None = None) -> float:
    """The boundary of a converted two-expert folder (experts.json) or of a source folder (model_index.json,
    else the preset whose architecture ``config``, a ``WanConfig``, has)."""
    path = Path(path)
    if given is None and (path / EXPERTS_FILE).is_file():
        return read_boundary_ratio(path)
    from megatron_rcm.convert.arch import arch_of_config, presets_with_shapes
    from megatron_rcm.models.wan.config import WAN22_BOUNDARY

    presets = [p for p in presets_with_shapes(arch_of_config(config)) if p in WAN22_BOUNDARY]
    return _boundary_ratio(path, presets[0] if len(presets) == 1 else None, given)


def _boundary_ratio(src: Path, preset: str | None, given: float | None) -> float:
    from megatron_rcm.models.wan.config import WAN22_BOUNDARY

    if given is not None:
        if not 0.0 < given < 1.0:
            raise UnknownLayoutError(f"--boundary-ratio {given}: must lie in (0, 1)")
        return float(given)
    index = src / "model_index.json"
    if index.is_file():
        ratio = json.loads(index.read_text()).get("boundary_ratio")
        if ratio is not None:
            return float(ratio)
    if preset not in WAN22_BOUNDARY:
        raise UnknownLayoutError(
            f"{src}: two expert folders, but the experts' architecture (preset {preset or 'none'}) is none of the "
            f"two-expert presets {sorted(WAN22_BOUNDARY)} and {index} gives no boundary_ratio; pass --preset or "
            "--boundary-ratio"
        )
    return WAN22_BOUNDARY[preset]


@dataclass
class ExpertsReport:
    """Both experts' reports (``ImportReport`` or ``ExportReport``) and where they went."""

    out: str
    boundary_ratio: float
    high: object
    low: object

    @property
    def tensors(self) -> int:
        return self.high.tensors + self.low.tensors

    def summary(self) -> str:
        return "\n".join([f"two experts (boundary ratio {self.boundary_ratio}) -> {self.out}",
                          "high-noise expert:", self.high.summary(), "low-noise expert:", self.low.summary()])


def run_import_experts(src, out, *, overwrite: bool = False, boundary_ratio: float | None = None, log=print,
                       **kwargs) -> ExpertsReport:
    """``run_import`` of each expert of SRC into OUT/high_noise_model and OUT/low_noise_model, plus
    OUT/experts.json; ``kwargs`` go to ``run_import`` (tp, dtype, preset, verify, ...). ``boundary_ratio``
    overrides the one of model_index.json / the preset."""
    from megatron_rcm.convert.importer import run_import

    src = Path(src)
    found = find_source_experts(src)
    if found is None:
        raise UnknownLayoutError(f"{src}: no expert folders ({' / '.join(' + '.join(d) for d in EXPERT_DIRS.values())})")
    check_not_source(out, [src])
    check_output_dir(out, overwrite)
    if boundary_ratio is not None:
        _boundary_ratio(src, None, boundary_ratio)  # a bad value fails before any tensor is read
    with atomic_output_dir(out, overwrite) as tmp:
        tmp = Path(tmp)
        reports = {}
        for which, name in zip(("high", "low"), OUT_DIRS):
            log(f"{which}-noise expert: {found[which]}")
            reports[which] = run_import(found[which], tmp / name, log=log, **kwargs)
        ratio = _boundary_ratio(src, reports["high"].plan.preset, boundary_ratio)
        meta = {"boundary_ratio": ratio, "high": OUT_DIRS[0], "low": OUT_DIRS[1], "source": str(src),
                "source_layout": found["layout"]}
        (tmp / EXPERTS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    for r in reports.values():  # the experts' paths as they are now (the temporary folder was renamed)
        r.out = str(Path(out) / Path(r.out).name)
    return ExpertsReport(str(out), ratio, reports["high"], reports["low"])


def run_export_experts(ckpt, out, *, fmt: str, overwrite: bool = False, log=print, **kwargs) -> ExpertsReport:
    """``run_export`` of each expert of a converted two-expert folder CKPT into OUT's layout folders
    (diffusers: transformer/ + transformer_2/; original, rcm: high_noise_model/ + low_noise_model/)."""
    from megatron_rcm.convert.exporter import run_export

    folders = expert_folders(ckpt)
    if folders is None:
        raise UnknownLayoutError(f"{ckpt}: no {EXPERTS_FILE} (not a converted two-expert folder)")
    check_not_source(out, [ckpt], "checkpoint")
    check_output_dir(out, overwrite)
    names = EXPERT_DIRS["diffusers" if fmt == "diffusers" else "original"]
    with atomic_output_dir(out, overwrite) as tmp:
        reports = {which: run_export(folders[which], Path(tmp) / name, fmt=fmt, log=log, **kwargs)
                   for which, name in zip(("high", "low"), names)}
    for r in reports.values():
        r.out = str(Path(out) / Path(r.out).name)
    return ExpertsReport(str(out), read_boundary_ratio(ckpt), reports["high"], reports["low"])
