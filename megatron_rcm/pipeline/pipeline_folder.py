"""A full diffusers pipeline folder around an exported student (``tools/convert.py export --format diffusers
--pipeline-from WEIGHTS``): the student's ``transformer/`` beside every other component of the teacher's
pipeline folder WEIGHTS (``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``, and
for I2V ``image_encoder/``, ``image_processor/``), so that ``WanPipeline.from_pretrained(OUT)`` loads it.

Component files are hard-linked when OUT and WEIGHTS share a file system (weights files are never modified
in place), copied otherwise, and fsynced either way. The scheduler is the teacher's: ``WanPipeline`` then
runs the student as an ordinary flow model with its own multi-step sampler; the few-step rCM sampler is
``megatron-rcm sample``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megatron_rcm.convert.errors import ConversionError

REQUIRED = ("vae", "text_encoder", "tokenizer", "scheduler")
INDEX = "model_index.json"


def check_pipeline_source(weights: str | Path, arch) -> Path:
    """WEIGHTS holds ``model_index.json`` and the components in ``REQUIRED``, and its text encoder width and
    VAE latent channels fit the exported model ``arch`` (a ``WanArch``). Raises ``ConversionError``."""
    weights = Path(weights)
    if not (weights / INDEX).is_file():
        raise ConversionError(f"--pipeline-from {weights}: no {INDEX} (expected a diffusers Wan pipeline folder "
                              f"such as Wan2.1-T2V-1.3B-Diffusers)")
    for name in REQUIRED:
        if not (weights / name).is_dir():
            raise ConversionError(f"--pipeline-from {weights}: no {name}/ folder")
    try:
        text_dim = json.loads((weights / "text_encoder" / "config.json").read_text())["d_model"]
        z_dim = json.loads((weights / "vae" / "config.json").read_text())["z_dim"]
    except (OSError, ValueError, KeyError) as err:
        raise ConversionError(f"--pipeline-from {weights}: cannot read the text encoder / VAE config ({err})") from err
    if text_dim != arch.text_dim or z_dim != arch.out_channels:  # I2V: in_channels add mask + image latent
        raise ConversionError(f"--pipeline-from {weights}: its text encoder width {text_dim} / VAE channels {z_dim} "
                              f"do not fit the exported model (text_dim {arch.text_dim}, latent channels "
                              f"{arch.out_channels})")
    return weights


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def copy_components(weights: Path, out: Path) -> list[str]:
    """Every component of ``weights`` except its transformer(s), and its model index, into ``out``."""
    copied = []
    for entry in sorted(weights.iterdir()):
        if entry.name.startswith(".") or entry.name in ("transformer", "transformer_2"):
            continue
        if entry.is_dir():
            for src in sorted(p for p in entry.rglob("*") if p.is_file()):
                dst = out / src.relative_to(weights)
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(src, dst)
            copied.append(entry.name + "/")
        elif entry.name == INDEX:
            index = json.loads(entry.read_text())
            index["transformer"] = ["diffusers", "WanTransformer3DModel"]
            index.pop("transformer_2", None)
            (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            copied.append(INDEX)
    return copied
