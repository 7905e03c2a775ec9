"""``megatron-rcm synthesize``: prompts only -> teacher samples as latent shards (distilling without videos).

Per prompt i (key = its 0-based position, 8 digits): noise eps_i [C, F, H, W] drawn from ``seed + i`` (so a
resumed or re-sliced run writes the same sample), the teacher's multi-step sampler with CFG (UniPC or
Euler on Wan's shifted grid, ``megatron_rcm.rcm.samplers``) from eps_i, and the unpadded umT5 embedding of
the prompt; metadata {caption, source: "teacher", sampler, steps, guidance, shift, seed}. The negative
prompt's embedding is written once. Chunking, resuming and rank slicing: ``megatron_rcm.pipeline.chunks``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_rcm.pipeline.chunks import ChunkedShards
from megatron_rcm.pipeline.components import WAN_NEGATIVE_PROMPT, check_weights_folder

logger = logging.getLogger("megatron_rcm.pipeline")


@dataclass
class SynthesizeOptions:
    prompts: str
    weights: str
    out: str
    teacher: str | None = None
    """Teacher weights (anything ``load_dit`` reads); default: the weights folder's transformer/."""
    num_frames: int = 81
    height: int = 480
    width: int = 832
    sampler: str = "unipc"
    steps: int = 50
    guidance: float = 5.0
    shift: float = 5.0
    seed: int = 0
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    samples_per_shard: int = 100
    num_heads: int | None = None
    dtype: str = "auto"
    overwrite: bool = False

    def validate(self) -> None:
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"--num-frames {self.num_frames}: Wan's VAE needs 4k+1 frames (e.g. 81, 33, 9)")
        if self.height % 16 or self.width % 16 or self.height < 16 or self.width < 16:
            raise ValueError(f"--height {self.height} --width {self.width}: both must be positive multiples of 16")
        if self.sampler not in ("unipc", "euler"):
            raise ValueError(f"--sampler {self.sampler!r}: choose unipc or euler")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps} must be >= 1")

    def plan(self) -> dict:
        d = asdict(self)
        for k in ("out", "samples_per_shard", "dtype", "overwrite"):
            d.pop(k)
        d["prompts"], d["weights"] = str(Path(self.prompts).resolve()), str(Path(self.weights).resolve())
        return d


def run_synthesize(opts: SynthesizeOptions, rank: int = 0, world_size: int = 1, barrier=None,
                   device=None) -> Path | None:
    """Synthesize this rank's chunks; rank 0 assembles the shard folder (see ``run_encode``)."""
    from megatron_rcm.data.batch import pad_text
    from megatron_rcm.pipeline.components import TEXT_LEN, TextEncoder, VideoVAE, default_device
    from megatron_rcm.pipeline.dit import load_dit
    from megatron_rcm.pipeline.encode import torch_dtype
    from megatron_rcm.pipeline.sample import _check_fits, read_prompts
    from megatron_rcm.rcm import Conditioning, TrigFlowDenoiser
    from megatron_rcm.rcm.samplers import euler_sample, unipc_sample
    from megatron_rcm.rcm.trigflow import WAN_TIMESTEP_SCALE

    barrier = barrier or (lambda: None)
    opts.validate()
    prompts = read_prompts(opts.prompts)
    weights = check_weights_folder(opts.weights, ("vae", "text_encoder", "tokenizer")
                                   + (() if opts.teacher else ("transformer",)))
    chunks = ChunkedShards(opts.out, len(prompts), opts.samples_per_shard, opts.plan(), opts.overwrite)
    chunks.open()
    barrier()
    chunks.check_plan()
    todo = chunks.todo(rank, world_size)
    device = torch.device(device) if device is not None else default_device()
    dtype = torch_dtype(opts.dtype)
    need_negative = rank == 0 and not chunks.negative_path.is_file()
    if todo or need_negative:
        text = TextEncoder(weights, device, dtype)
        neg = text.encode([opts.negative_prompt])[0]
        if need_negative:
            chunks.write_negative(neg)
        mine = [i for c in todo for i in chunks.records(c)]
        embs = {}
        for b in range(0, len(mine), 8):
            embs.update(zip(mine[b:b + 8], text.encode([prompts[i] for i in mine[b:b + 8]])))
        text_dim = text.dim
        del text
    if todo:
        C, F, H, W = VideoVAE(weights, "cpu").latent_shape(opts.num_frames, opts.height, opts.width)
        teacher, what = load_dit(opts.teacher or weights, num_heads=opts.num_heads, device=device, dtype=dtype)
        if teacher.config.model_type == "i2v":
            raise NotImplementedError(f"teacher {opts.teacher or weights} is image-to-video: synthesize writes T2V "
                                      f"samples from prompts alone; encode videos with `megatron-rcm encode --i2v`")
        _check_fits(teacher, f"teacher {opts.teacher or weights}", text_dim, C, weights)
        logger.info("teacher: %s", what)
        denoiser = TrigFlowDenoiser(teacher, WAN_TIMESTEP_SCALE)
        sampler = unipc_sample if opts.sampler == "unipc" else euler_sample
        neg_ctx = pad_text(neg, TEXT_LEN, "negative prompt")[None].to(device, dtype)
        t0 = time.time()
        for c in todo:
            def samples(c=c):
                for i in chunks.records(c):
                    noise = torch.randn(1, C, F, H, W, generator=torch.Generator().manual_seed(opts.seed + i))
                    cond = Conditioning(context=pad_text(embs[i], TEXT_LEN, f"prompt {i}")[None].to(device, dtype),
                                        neg_context=neg_ctx)
                    x0 = sampler(denoiser, noise.to(device), cond, opts.guidance, opts.steps, opts.shift)
                    meta = {"caption": prompts[i], "source": "teacher", "teacher": str(opts.teacher or weights),
                            "sampler": opts.sampler, "steps": opts.steps, "guidance": opts.guidance,
                            "shift": opts.shift, "seed": opts.seed + i}
                    yield f"{i:08d}", x0[0].float().cpu(), embs[i], meta

            chunks.write_chunk(c, samples())
            logger.info("rank %d: chunk %d written, %.1f s", rank, c, time.time() - t0)
    barrier()
    if rank != 0:
        return None
    out = chunks.assemble()
    logger.info("wrote %d teacher samples to %s", len(prompts), out)
    return out
