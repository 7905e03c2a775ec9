"""Write webdataset-style tar shards of precomputed latents + text embeddings (megatron_rcm.data.format).

Inputs (one of):
  --from-dir DIR    loose precomputed files <key>.latent.pth|npy + <key>.t5.pth|npy (+ <key>.neg_t5.*,
                    <key>.json), as a Wan VAE/umT5 preprocessing job writes them
  --mock N          N random samples of --latent-shape / --text-len / --text-dim (throughput tests)
  --digits          the quickstart's scikit-learn digits with their class embeddings
  --index DIR       (re)build index.json for existing, complete tar shards in DIR (offsets and crc32 of
                    every member); the trainer refuses a shard folder without a valid index.json

The shards are written into a temporary folder beside --out, index.json last, then renamed into place: a
failed run leaves --out as it was. An existing non-empty --out is replaced (as a whole) only with
--overwrite. --negative writes the data set's negative-prompt embedding (negative.t5.pth), which CFG
training (distill.guidance other than 1) needs unless every sample has its own <key>.neg_t5 member.

Examples:
  python tools/make_shards.py --from-dir /data/wan_latents --out /data/shards --samples-per-shard 1000 \
      --negative /data/negative_prompt.t5.pth
  python tools/make_shards.py --mock 64 --latent-shape 16 21 60 104 --out /tmp/mock_shards
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatron_rcm.config.argtypes import positive_int
from megatron_rcm.data.format import (
    LATENT_EXTS,
    NEG_TEXT_EXTS,
    TEXT_EXTS,
    ShardError,
    decode_member,
    split_member_name,
)
from megatron_rcm.data.index import index_folder, write_index
from megatron_rcm.data.writer import ShardWriter, check_output_dir


def _load(path: Path) -> torch.Tensor:
    try:
        t = decode_member(split_member_name(path.name)[1], path.read_bytes())
    except Exception as err:
        raise SystemExit(f"error: {path} cannot be read as a tensor ({err})") from err
    if not isinstance(t, torch.Tensor):
        raise SystemExit(f"error: {path} holds {type(t).__name__}, expected a tensor")
    return t


def from_dir(src: Path, writer: ShardWriter) -> int:
    groups: dict[str, dict[str, Path]] = {}
    for p in sorted(src.iterdir()):
        if p.is_file():
            key, ext = split_member_name(p.name)
            groups.setdefault(key, {})[ext] = p
    n = 0
    for key, files in groups.items():
        lat = next((files[e] for e in LATENT_EXTS if e in files), None)
        txt = next((files[e] for e in TEXT_EXTS if e in files), None)
        if lat is None or txt is None:
            raise SystemExit(f"error: sample '{key}' in {src} needs a latent and a t5 file, found {sorted(files)}")
        neg = next((files[e] for e in NEG_TEXT_EXTS if e in files), None)
        try:
            meta = json.loads(files["json"].read_text()) if "json" in files else None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SystemExit(f"error: {files['json']} is not valid JSON ({err})") from err
        writer.write(key, _load(lat), _load(txt), None if neg is None else _load(neg), meta)
        n += 1
    if n == 0:
        raise SystemExit(f"error: {src} holds no <key>.latent.* / <key>.t5.* files")
    return n


def build_index(root: Path) -> Path:
    """Index the complete tars in ``root`` and write ``index.json`` atomically."""
    return write_index(root, index_folder(root))


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it (both resolved)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _check_args(ap: argparse.ArgumentParser, args) -> None:
    """Argument errors (exit status 2) before any work starts."""
    if args.index is not None:
        if not args.index.is_dir():
            ap.error(f"--index {args.index}: no such folder")
        return
    if args.out is None:
        ap.error("--out is required")
    if args.from_dir is not None:
        if not args.from_dir.is_dir():
            ap.error(f"--from-dir {args.from_dir}: no such folder")
        if _inside(args.from_dir, args.out):
            ap.error(f"--out {args.out} is or contains --from-dir {args.from_dir}: writing it would replace "
                     f"the source files; choose another --out")
    if args.negative is not None and not args.negative.is_file():
        ap.error(f"--negative {args.negative}: no such file")
    try:
        check_output_dir(args.out, args.overwrite)
    except (FileExistsError, NotADirectoryError) as err:
        ap.error(str(err))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-dir", type=Path)
    src.add_argument("--mock", type=positive_int, metavar="N")
    src.add_argument("--digits", action="store_true")
    src.add_argument("--index", type=Path, metavar="DIR")
    ap.add_argument("--out", type=Path, help="output directory for the shards")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out (as a whole)")
    ap.add_argument("--samples-per-shard", type=positive_int, default=1000)
    ap.add_argument("--negative", type=Path, help="negative-prompt embedding [L, D] (.pth/.npy) for the data set "
                    "(written as negative.t5.pth; CFG training needs it unless samples carry .neg_t5)")
    ap.add_argument("--latent-shape", type=positive_int, nargs=4, default=[16, 21, 60, 104],
                    metavar=("C", "F", "H", "W"))
    ap.add_argument("--text-len", type=positive_int, default=512)
    ap.add_argument("--text-dim", type=positive_int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    _check_args(ap, args)

    if args.index is not None:
        try:
            print(f"wrote {build_index(args.index)}")
        except ShardError as err:
            raise SystemExit(f"error: {err}") from err
        return 0
    negative = _load(args.negative) if args.negative else None
    n = 0
    if args.digits:
        from megatron_rcm.data.digits import class_embeddings, load_digits_images

        images, labels = load_digits_images()
        emb, neg = class_embeddings(args.text_len, args.text_dim)
        negative = neg[0] if negative is None else negative
    try:
        with ShardWriter(args.out, args.samples_per_shard, negative, overwrite=args.overwrite) as writer:
            if args.from_dir is not None:
                n = from_dir(args.from_dir, writer)
            elif args.mock is not None:
                g = torch.Generator().manual_seed(args.seed)
                for i in range(args.mock):
                    writer.write(f"mock{i:08d}", torch.randn(args.latent_shape, generator=g),
                                 torch.randn(args.text_len, args.text_dim, generator=g))
                n = args.mock
            else:
                for i, (img, y) in enumerate(zip(images, labels)):
                    writer.write(f"digit{i:05d}", img, emb[y], meta={"label": int(y)})
                n = len(labels)
    except ValueError as err:  # a bad sample (key, shape); the writer has dropped its temporary folder
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {n} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
