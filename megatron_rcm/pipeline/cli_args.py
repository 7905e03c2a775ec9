"""The ``encode``, ``synthesize`` and ``sample`` subcommands of ``megatron-rcm`` (arguments and dispatch).

Under torchrun (WORLD_SIZE > 1) ``encode`` and ``synthesize`` initialize one process group, each rank
works on its slice on its own GPU, and rank 0 assembles the shard folder after a barrier.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_rcm.config.argtypes import positive_int


def _video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-frames", type=positive_int, default=81, help="pixel frames per clip, 4k+1 (default 81)")
    p.add_argument("--height", type=positive_int, default=480, help="pixel height, multiple of 16 (default 480)")
    p.add_argument("--width", type=positive_int, default=832, help="pixel width, multiple of 16 (default 832)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="model dtype: auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (as a whole)")


def _weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="local diffusers Wan pipeline folder (vae/, text_encoder/, "
                   "tokenizer/, transformer/, scheduler/), e.g. Wan2.1-T2V-1.3B-Diffusers")


def add_pipeline_commands(sub) -> None:
    from megatron_rcm.pipeline.components import WAN_NEGATIVE_PROMPT

    enc = sub.add_parser("encode", help="videos + captions -> training shards (VAE latents, umT5 embeddings)")
    enc.add_argument("--captions", required=True, help=".jsonl ({'video': ..., 'caption': ...} per line) or .csv "
                     "(columns video, caption)")
    enc.add_argument("--video-root", help="folder the video paths are relative to (default: the captions' folder)")
    _weights_arg(enc)
    enc.add_argument("--out", required=True, help="shard folder to write")
    enc.add_argument("--fps", type=float, default=16.0, help="frame rate the clips are sampled at (default 16)")
    enc.add_argument("--samples-per-shard", type=positive_int, default=100)
    enc.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT, help="default: Wan2.1's negative prompt")
    enc.add_argument("--i2v", action="store_true", help="also write the image-to-video condition of the first "
                     "frame (CLIP features, first-frame latent + mask; needs image_encoder/ and image_processor/)")
    _video_args(enc)

    syn = sub.add_parser("synthesize", help="prompts -> teacher samples as training shards (no videos needed)")
    syn.add_argument("--prompts", required=True, help="text file (one prompt per line) or .jsonl with 'prompt'")
    _weights_arg(syn)
    syn.add_argument("--teacher", help="teacher weights (default: the weights folder's transformer/)")
    syn.add_argument("--out", required=True, help="shard folder to write")
    syn.add_argument("--sampler", choices=("unipc", "euler"), default="unipc")
    syn.add_argument("--steps", type=positive_int, default=50)
    syn.add_argument("--guidance", type=float, default=5.0)
    syn.add_argument("--shift", type=float, default=5.0)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--samples-per-shard", type=positive_int, default=100)
    syn.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT)
    syn.add_argument("--num-heads", type=positive_int, help="teacher heads when no config records them")
    _video_args(syn)

    smp = sub.add_parser("sample", help="student (and teacher) -> mp4 per prompt + a contact sheet")
    smp.add_argument("--student", required=True, help="training checkpoint (run root, 'latest' or step_*), "
                     "tools/convert.py export, dist_checkpointing export, or weight file")
    _weights_arg(smp)
    smp.add_argument("--out", required=True, help="output folder")
    smp.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    smp.add_argument("--prompts", help="text file (one per line) or .jsonl with 'prompt'")
    smp.add_argument("--steps", type=positive_int, default=4, help="student steps, 1-4 (default 4)")
    smp.add_argument("--sigma-max", type=float, default=80.0, help="80 for 1.3B, 200 for 14B")
    smp.add_argument("--teacher", nargs="?", const="", default=None, help="also sample the teacher on the same "
                     "noise (default weights: the weights folder's transformer/)")
    smp.add_argument("--teacher-steps", type=positive_int, default=50)
    smp.add_argument("--guidance", type=float, default=5.0, help="teacher CFG scale")
    smp.add_argument("--shift", type=float, default=5.0, help="teacher's sampling shift")
    smp.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT)
    smp.add_argument("--fps", type=float, default=16.0)
    smp.add_argument("--seed", type=int, default=0)
    ema = smp.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None, help="the EMA weights (default when "
                     "the checkpoint has them)")
    ema.add_argument("--raw", dest="ema", action="store_false", help="the raw student weights, not the EMA")
    smp.add_argument("--config", dest="train_config", help="the training run's YAML (architecture of a training "
                     "checkpoint that does not record it)")
    smp.add_argument("--set", dest="train_set", action="append", default=[], metavar="KEY=VALUE")
    smp.add_argument("--num-heads", type=positive_int)
    smp.add_argument("--image", help="I2V: the picture the videos start from (needs image_encoder/ and "
                     "image_processor/ in --weights)")
    _video_args(smp)


def _write_on_ranks(opts, run) -> int:
    """Validate ``opts``, run ``run(opts, rank, world, barrier, device)`` on this rank, report what rank 0 wrote."""
    opts.validate()
    rank, world, barrier, device = _ranks()
    out = run(opts, rank, world, barrier, device)
    if out is not None:
        print(f"wrote {out}")
    return 0


def _ranks():
    """(rank, world size, barrier, device) of this process; initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None, None
    import torch
    import torch.distributed as dist

    from megatron_rcm.parallel.state import initialize_parallel

    initialize_parallel(tensor_parallel=1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), dist.barrier, device


def _tensor_parallel_ranks() -> None:
    """Under torchrun, ``sample`` builds one tensor-parallel model over all ranks (TP = world size): the
    14B student does not fit one GPU with the VAE and text encoder beside it."""
    from megatron_rcm.parallel.state import initialize_parallel

    initialize_parallel(tensor_parallel=int(os.environ["WORLD_SIZE"]))


def run_pipeline_command(args) -> int:
    from megatron_rcm.convert.errors import ConversionError
    from megatron_rcm.data.format import ShardError
    from megatron_rcm.pipeline.chunks import ChunkError
    from megatron_rcm.pipeline.components import WeightsError
    from megatron_rcm.pipeline.encode import CaptionError
    from megatron_rcm.pipeline.video_io import VideoError

    try:
        if args.command == "encode":
            from megatron_rcm.pipeline.encode import EncodeOptions, run_encode

            opts = EncodeOptions(args.captions, args.weights, args.out, args.video_root, args.num_frames, args.height,
                                 args.width, args.fps, args.negative_prompt, args.samples_per_shard, dtype=args.dtype,
                                 overwrite=args.overwrite, i2v=args.i2v)
            return _write_on_ranks(opts, run_encode)
        if args.command == "synthesize":
            from megatron_rcm.pipeline.synthesize import SynthesizeOptions, run_synthesize

            opts = SynthesizeOptions(args.prompts, args.weights, args.out, args.teacher, args.num_frames, args.height,
                                     args.width, args.sampler, args.steps, args.guidance, args.shift, args.seed,
                                     args.negative_prompt, args.samples_per_shard, args.num_heads, args.dtype,
                                     args.overwrite)
            return _write_on_ranks(opts, run_synthesize)
        from megatron_rcm.pipeline.sample import SampleOptions, read_prompts, run_sample

        prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
        teacher = None if args.teacher is None else (args.teacher or args.weights)
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            _tensor_parallel_ranks()
        opts = SampleOptions(args.student, args.weights, args.out, prompts, args.steps, args.num_frames, args.height,
                             args.width, args.fps, args.seed, args.sigma_max, teacher=teacher,
                             teacher_steps=args.teacher_steps, guidance=args.guidance, shift=args.shift,
                             negative_prompt=args.negative_prompt, image=args.image, ema=args.ema, train_config=args.train_config,
                             train_set=tuple(args.train_set), num_heads=args.num_heads, dtype=args.dtype,
                             overwrite=args.overwrite)
        run_sample(opts)
        return 0
    except (CaptionError, VideoError, WeightsError, ChunkError, ConversionError, ShardError, FileNotFoundError,
            FileExistsError, NotADirectoryError, ValueError, NotImplementedError) as err:
        print(f"megatron-rcm {args.command}: error: {err}", file=sys.stderr)
        return 2
