"""Write webdataset-style tar shards of precomputed latents + text embeddings (megatron_rcm.data.format).

Inputs (one of):
  --from-dir DIR    loose precomputed files <key>.latent.pth|npy + <key>.t5.pth|npy (+ <key>.neg_t5.*,
                    <key>.json), as a Wan VAE/umT5 preprocessing job writes them
  --mock N          N random samples of --latent-shape / --text-len / --text-dim (throughput tests)
  --digits          the quickstart's scikit-learn digits with their class embeddings
  --index DIR       (re)build index.json for existing tar shards in DIR (offsets and crc32 of every member)

Examples:
  python tools/make_shards.py --from-dir /data/wan_latents --out /data/shards --samples-per-shard 1000 \
      --negative /data/negative_prompt.t5.pth
  python tools/make_shards.py --mock 64 --latent-shape 16 21 60 104 --out /tmp/mock_shards
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

import torch

from megatron_rcm.data.format import (
    INDEX_FILE,
    INDEX_VERSION,
    LATENT_EXTS,
    NEG_TEXT_EXTS,
    TEXT_EXTS,
    crc32,
    decode_member,
    split_member_name,
)
from megatron_rcm.data.writer import ShardWriter


def _load(path: Path) -> torch.Tensor:
    return decode_member(split_member_name(path.name)[1], path.read_bytes())


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
        meta = json.loads(files["json"].read_text()) if "json" in files else None
        writer.write(key, _load(lat), _load(txt), None if neg is None else _load(neg), meta)
        n += 1
    return n


def build_index(root: Path) -> Path:
    shards = []
    for path in sorted(root.glob("*.tar")):
        samples: dict[str, dict] = {}
        with tarfile.open(path, "r:") as tar, open(path, "rb") as f:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_member_name(m.name)
                f.seek(m.offset_data)
                data = f.read(m.size)
                samples.setdefault(key, {"key": key, "members": {}})["members"][ext] = [m.offset_data, m.size,
                                                                                       crc32(data)]
        shards.append({"name": path.name, "bytes": path.stat().st_size, "samples": list(samples.values())})
    out = root / INDEX_FILE
    out.write_text(json.dumps({"version": INDEX_VERSION, "shards": shards}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-dir", type=Path)
    src.add_argument("--mock", type=int, metavar="N")
    src.add_argument("--digits", action="store_true")
    src.add_argument("--index", type=Path, metavar="DIR")
    ap.add_argument("--out", type=Path, help="output directory for the shards")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--negative", type=Path, help="negative-prompt embedding [L, D] (.pth/.npy) for the data set")
    ap.add_argument("--latent-shape", type=int, nargs=4, default=[16, 21, 60, 104], metavar=("C", "F", "H", "W"))
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--text-dim", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.index is not None:
        print(f"wrote {build_index(args.index)}")
        return 0
    if args.out is None:
        ap.error("--out is required")
    negative = _load(args.negative) if args.negative else None
    n = 0
    if args.digits:
        from megatron_rcm.data.digits import class_embeddings, load_digits_images

        images, labels = load_digits_images()
        emb, neg = class_embeddings(args.text_len, args.text_dim)
        negative = neg[0] if negative is None else negative
    with ShardWriter(args.out, args.samples_per_shard, negative) as writer:
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
    print(f"wrote {n} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
