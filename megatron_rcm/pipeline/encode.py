"""``megatron-rcm encode``: videos (or frame folders) + captions -> the tar shards the trainer reads.

Captions: a ``.jsonl`` file (one object per line with ``video`` and ``caption``; ``fps`` optional for frame
folders) or a ``.csv`` file with a header naming the ``video`` and ``caption`` columns. Video paths are
relative to ``--video-root`` (default: the captions file's folder).

Per sample (key = the record's 0-based position, 8 digits): the normalized VAE latent [C, F, H, W] of
``num_frames`` frames sampled at ``fps``, resized and center-cropped to ``height`` x ``width``; the unpadded
umT5 embedding [L, D] of the caption; metadata {caption, source, fps, source_fps, num_frames, height, width};
with ``i2v`` also the first frame's CLIP features and condition channels (``megatron_rcm.pipeline.i2v``).
The negative prompt's embedding is written once (``negative.t5.pth``): CFG training needs it.
(``megatron_rcm.pipeline.components`` gives the exact text and latent conventions.)

Before any model is loaded, every record is checked: the caption file parses, each video exists, and the
videos this rank will encode open and are long enough. Multi-GPU: under torchrun each rank encodes its
slice of chunks (``megatron_rcm.pipeline.chunks``); a rerun resumes; rank 0 assembles the folder.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_rcm.pipeline.chunks import ChunkedShards
from megatron_rcm.pipeline.components import WAN_NEGATIVE_PROMPT, check_weights_folder
from megatron_rcm.pipeline.video_io import VideoError, check_length, probe, read_clip, to_model_input

logger = logging.getLogger("megatron_rcm.pipeline")
VIDEO_KEYS = ("video", "path", "file")
CAPTION_KEYS = ("caption", "text", "prompt")


class CaptionError(ValueError):
    """A caption file that cannot be used; the message names the file and line."""


@dataclass
class Record:
    index: int
    video: Path
    caption: str
    where: str
    """``captions.jsonl line 3``: for error messages."""
    fps: float | None = None
    """Frame rate of a frame folder, when the caption file gives one."""


@dataclass
class EncodeOptions:
    captions: str
    weights: str
    out: str
    video_root: str | None = None
    num_frames: int = 81
    height: int = 480
    width: int = 832
    fps: float = 16.0
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    samples_per_shard: int = 100
    text_len: int = 512
    dtype: str = "auto"
    """Text / image encoder dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16`` or ``fp32`` (the VAE runs
    in fp32)."""
    overwrite: bool = False
    i2v: bool = False
    """Also write the image-to-video condition of the first frame (``megatron_rcm.pipeline.i2v``)."""

    def validate(self) -> None:
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"--num-frames {self.num_frames}: Wan's VAE needs 4k+1 frames (e.g. 81, 77, 33, 9)")
        if self.height % 16 or self.width % 16 or self.height < 16 or self.width < 16:
            raise ValueError(f"--height {self.height} --width {self.width}: both must be positive multiples of 16 "
                             f"(VAE stride 8 x patch 2)")
        if not self.fps > 0:
            raise ValueError(f"--fps {self.fps} must be > 0")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--dtype {self.dtype!r}: choose auto, bf16 or fp32")

    def plan(self) -> dict:
        """The settings that decide the shards' content (a resumed run must use the same)."""
        keep = ("captions", "weights", "video_root", "num_frames", "height", "width", "fps", "negative_prompt",
                "text_len", "i2v")
        d = asdict(self)
        return {k: (str(Path(d[k]).resolve()) if k in ("captions", "weights") else d[k]) for k in keep}


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _pick(row: dict, keys: tuple[str, ...], where: str, what: str) -> str:
    for k in keys:
        if row.get(k) not in (None, ""):
            return str(row[k])
    raise CaptionError(f"{where}: no {what} (expected a '{keys[0]}' field; found {sorted(map(str, row))})")


def read_captions(path: str | Path, video_root: str | Path | None = None) -> list[Record]:
    """Records of a ``.jsonl`` or ``.csv`` caption file; every referenced video must exist."""
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"caption file {path} does not exist")
    root = Path(video_root) if video_root is not None else path.parent
    rows: list[tuple[str, dict]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise CaptionError(f"{path} line {n}: not valid JSON ({err})") from err
            if not isinstance(obj, dict):
                raise CaptionError(f"{path} line {n}: expected an object with 'video' and 'caption'")
            rows.append((f"{path} line {n}", obj))
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for n, obj in enumerate(csv.DictReader(f), 2):
                rows.append((f"{path} line {n}", obj))
    else:
        raise CaptionError(f"caption file {path}: expected a .jsonl or .csv file")
    if not rows:
        raise CaptionError(f"caption file {path} holds no records")
    records = []
    for i, (where, row) in enumerate(rows):
        video = Path(_pick(row, VIDEO_KEYS, where, "video path"))
        caption = _pick(row, CAPTION_KEYS, where, "caption")
        video = video if video.is_absolute() else root / video
        if not video.exists():
            raise VideoError(f"{where}: caption without video: {video} does not exist")
        fps = row.get("fps")
        records.append(Record(i, video, caption, where, float(fps) if fps not in (None, "") else None))
    return records


def check_records(records: list[Record], opts: EncodeOptions) -> dict[int, object]:
    """Probe every record's video (open, frame count): ``VideoError`` naming the file and its caption line."""
    infos = {}
    for r in records:
        try:
            info = probe(r.video, r.fps or opts.fps)
            check_length(info, opts.num_frames, opts.fps)
        except VideoError as err:
            raise VideoError(f"{r.where}: {err}") from err
        infos[r.index] = info
    return infos


def run_encode(opts: EncodeOptions, rank: int = 0, world_size: int = 1, barrier=None, device=None) -> Path | None:
    """Encode this rank's chunks; rank 0 assembles the shard folder once every rank is done (``barrier``
    synchronizes the ranks; None for a single process). Returns the output folder on rank 0."""
    from megatron_rcm.pipeline.components import TextEncoder, VideoVAE

    barrier = barrier or (lambda: None)
    opts.validate()
    records = read_captions(opts.captions, opts.video_root)
    check_weights_folder(opts.weights)
    if opts.i2v:
        from megatron_rcm.pipeline.i2v import I2V_PARTS, ImageEncoder, first_frame_condition

        check_weights_folder(opts.weights, I2V_PARTS)
    chunks = ChunkedShards(opts.out, len(records), opts.samples_per_shard, opts.plan(), opts.overwrite)
    if (chunks.parts / "plan.json").is_file():
        chunks.check_plan()  # a rerun with other settings fails before anything is probed
    todo = chunks.todo(rank, world_size)
    mine = [records[i] for c in todo for i in chunks.records(c)]
    infos = check_records(mine, opts)  # before the parts folder is created or any model loaded
    chunks.open()
    barrier()
    chunks.check_plan()
    done = sum(len(chunks.records(c)) for c in range(chunks.num_chunks) if chunks.is_complete(c))
    if done and rank == 0:
        logger.info("resuming: %d of %d samples are in complete chunks of %s", done, len(records), chunks.parts)

    dtype = torch_dtype(opts.dtype)
    need_text = bool(todo) or (rank == 0 and not chunks.negative_path.is_file())
    text = TextEncoder(opts.weights, device, dtype, opts.text_len) if need_text else None
    if rank == 0 and not chunks.negative_path.is_file():
        chunks.write_negative(text.encode([opts.negative_prompt])[0])
    vae = VideoVAE(opts.weights, device) if todo else None  # fp32, as Wan runs its VAE
    image = ImageEncoder(opts.weights, device, dtype) if todo and opts.i2v else None
    t0 = time.time()
    for c in todo:
        recs = [records[i] for i in chunks.records(c)]
        embs = []
        for b in range(0, len(recs), 8):
            embs += text.encode([r.caption for r in recs[b:b + 8]])

        def samples(recs=recs, embs=embs):
            for r, emb in zip(recs, embs):
                info = infos[r.index]
                frames = read_clip(info, opts.num_frames, opts.fps, opts.height, opts.width)
                video_3THW = to_model_input(frames)
                latent = vae.encode(video_3THW[None])[0]
                meta = {"caption": r.caption, "source": str(r.video), "fps": opts.fps, "source_fps": info.fps,
                        "num_frames": opts.num_frames, "height": opts.height, "width": opts.width}
                extra = {}
                if image is not None:
                    extra = {"clip_ND": image.encode([frames[0]])[0],
                             "y_CFHW": first_frame_condition(vae, video_3THW[:, 0], opts.num_frames)}
                yield f"{r.index:08d}", latent, emb, meta, extra

        chunks.write_chunk(c, samples())
        logger.info("rank %d: chunk %d (%d samples) written, %.1f s", rank, c, len(recs), time.time() - t0)
    barrier()
    if rank != 0:
        return None
    out = chunks.assemble()
    shape = vae.latent_shape(opts.num_frames, opts.height, opts.width) if vae is not None else None
    logger.info("wrote %d samples to %s%s", len(records), out,
                f" (data.latent_shape={shape}, data.text_dim={text.dim})" if shape and text else "")
    return out
