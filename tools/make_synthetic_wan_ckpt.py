#!/usr/bin/env python
"""Write a synthetic Wan2.1 checkpoint with a preset's exact keys and shapes (random values), to measure
the converter's time and memory on real sizes without downloading the weights.

    python tools/make_synthetic_wan_ckpt.py /data/synthetic-14b --preset wan2.1-t2v-14b --dtype bf16 \\
        --layout original --shards 6

Layouts: ``original`` (``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + index + the release's
config.json, as in Wan-AI/Wan2.1-T2V-14B) or ``diffusers`` (a pipeline root with ``transformer/``). Tensors
are drawn and written one at a time (memory: the largest tensor, 283 MB in float32 for the 14B FFN).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to create (must not exist)")
    p.add_argument("--preset", default="wan2.1-t2v-14b", help="Wan preset whose shapes to use")
    p.add_argument("--layout", choices=("original", "diffusers"), default="original")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--shards", type=int, default=6, help="number of safetensors files (about equal sizes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from megatron_rcm.convert.arch import preset_arch, to_diffusers_config, to_original_config
    from megatron_rcm.convert.dist_ckpt import meta_sharded_state_dict, sharded_tensors
    from megatron_rcm.convert.importer import ensure_single_process_parallel
    from megatron_rcm.convert.safetensors_io import TensorSpec, write_sharded
    from megatron_rcm.convert.wan_keys import external_shape, from_ours

    if args.out.exists():
        print(f"error: {args.out} exists", file=sys.stderr)
        return 2
    ensure_single_process_parallel()
    arch = preset_arch(args.preset)
    dtype = DTYPES[args.dtype]
    specs = [
        TensorSpec(
            from_ours(k, args.layout),
            external_shape(k, sh.global_shape, arch.in_channels, arch.patch_size),
            dtype,
        )
        for k, sh in sharded_tensors(meta_sharded_state_dict(arch)).items()
    ]
    total = sum(s.nbytes for s in specs)
    folder = args.out / "transformer" if args.layout == "diffusers" else args.out
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(args.seed)
    shapes = {s.name: s.shape for s in specs}
    bar = tqdm(total=len(specs), unit="tensor", desc="synthetic")

    def produce(name: str) -> torch.Tensor:
        shape = shapes[name]
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        return (torch.randn(shape, generator=gen) / fan_in**0.5).to(dtype)

    shard_bytes = math.ceil(total / args.shards) + max(s.nbytes for s in specs)  # greedy: at most --shards
    t0 = time.time()
    files = write_sharded(
        str(folder),
        "diffusion_pytorch_model",
        specs,
        produce,
        shard_bytes,
        lambda s: bar.update(1),
    )
    bar.close()
    config = to_original_config(arch) if args.layout == "original" else to_diffusers_config(arch)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if args.layout == "diffusers":
        (args.out / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}) + "\n")
    print(
        f"wrote {args.out}: {args.preset} ({sum(math.prod(s.shape) for s in specs) / 1e9:.2f} B parameters), "
        f"{args.layout} layout, {args.dtype}, {total / 1e9:.2f} GB in {len(files)} file(s), {time.time() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
