"""Video in and out: probe and read videos (PyAV) or frame folders (Pillow), resize + center-crop, write
mp4 (H.264 through PyAV's bundled FFmpeg) and PNG contact sheets.

Shape legend: T pixel frames, H/W pixel rows/cols; frames are uint8 [T, H, W, 3] (RGB) unless noted.

Frame sampling at ``fps``: clip frame k is the source frame nearest to time k / fps from the start,
index round(k * src_fps / fps); a clip of T frames needs round((T - 1) * src_fps / fps) + 1 source frames.
Frame folders are taken as frames at ``fps`` already (consecutive frames, sorted by name).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class VideoError(ValueError):
    """A video that is missing, unreadable or too short; the message names the file."""


@dataclass
class VideoInfo:
    path: Path
    num_frames: int
    """Frames in the source (from the container, or duration x rate when it does not say)."""
    fps: float
    width: int
    height: int


def _natural_key(p: Path):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)]


def frame_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS), key=_natural_key)


def probe(path: str | Path, folder_fps: float) -> VideoInfo:
    """Frame count, rate and size of a video file or frame folder (reads headers, decodes nothing)."""
    path = Path(path)
    if not path.exists():
        raise VideoError(f"video {path} does not exist")
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise VideoError(f"frame folder {path} holds no images ({', '.join(IMAGE_EXTS)})")
        try:
            with Image.open(files[0]) as im:
                w, h = im.size
        except OSError as err:
            raise VideoError(f"frame {files[0]} cannot be read ({err})") from err
        return VideoInfo(path, len(files), float(folder_fps), w, h)
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"video {path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise VideoError(f"video {path} has no frame rate")
            n = int(stream.frames or 0)
            if n == 0:  # webm/mkv rarely record a frame count: duration x rate
                if stream.duration is not None and stream.time_base is not None:
                    seconds = float(stream.duration * stream.time_base)
                else:
                    seconds = float(container.duration or 0) / 1e6
                n = int(seconds * float(rate) + 0.5)
            return VideoInfo(path, n, float(rate), int(stream.codec_context.width), int(stream.codec_context.height))
    except VideoError:
        raise
    except Exception as err:  # av raises InvalidDataError, FileNotFoundError, ... by cause
        raise VideoError(f"video {path} cannot be read ({type(err).__name__}: {err})") from err


def source_indices(num_frames: int, src_fps: float, fps: float) -> list[int]:
    """Source frame indices of the clip's frames (module docstring)."""
    return [int(round(k * src_fps / fps)) for k in range(num_frames)]


def check_length(info: VideoInfo, num_frames: int, fps: float, where: str = "") -> None:
    need = source_indices(num_frames, info.fps, fps)[-1] + 1 if info.path.is_file() else num_frames
    if info.num_frames < need:
        what = "frame folder" if info.path.is_dir() else "video"
        raise VideoError(f"{where}{what} {info.path} has {info.num_frames} frames ({info.fps:g} fps), too few for "
                         f"{num_frames} frames at {fps:g} fps (needs {need}); lower --num-frames or --fps")


def resize_center_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Scale to cover height x width (aspect kept, bicubic), then crop the center: uint8 [H, W, 3]."""
    w, h = img.size
    scale = max(width / w, height / h)
    new_w, new_h = max(width, int(round(w * scale))), max(height, int(round(h * scale)))
    img = img.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))


def read_clip(info: VideoInfo, num_frames: int, fps: float, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: ``num_frames`` frames sampled at ``fps``, resized and center-cropped."""
    check_length(info, num_frames, fps)
    if info.path.is_dir():
        out = []
        for f in frame_files(info.path)[:num_frames]:
            try:
                with Image.open(f) as im:
                    out.append(resize_center_crop(im, height, width))
            except OSError as err:
                raise VideoError(f"frame {f} cannot be read ({err})") from err
        return np.stack(out)
    import av

    wanted = source_indices(num_frames, info.fps, fps)
    picked: dict[int, np.ndarray] = {}
    last = wanted[-1]
    try:
        with av.open(str(info.path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    picked[i] = resize_center_crop(frame.to_image(), height, width)
                if i >= last:
                    break
    except Exception as err:
        raise VideoError(f"video {info.path} cannot be decoded ({type(err).__name__}: {err})") from err
    if last not in picked:
        raise VideoError(f"video {info.path} decoded to {len(picked)} usable frames, too few for {num_frames} frames "
                         f"at {fps:g} fps (its header promised {info.num_frames}); lower --num-frames or --fps")
    return np.stack([picked[i] for i in wanted])


def to_model_input(frames_THW3: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames_THW3)).float().div(127.5).sub(1.0)
    return x.permute(3, 0, 1, 2).contiguous()


def to_uint8(video_3THW: torch.Tensor) -> np.ndarray:
    """float [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (as diffusers' VideoProcessor rounds)."""
    x = ((video_3THW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).numpy()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def write_mp4(frames_THW3: np.ndarray, path: str | Path, fps: float = 16.0, crf: int = 18) -> Path:
    """H.264 mp4 (yuv420p, so sizes must be even), written to a temporary name and renamed into place."""
    import av

    path = Path(path)
    T, H, W, _ = frames_THW3.shape
    if H % 2 or W % 2:
        raise ValueError(f"{path}: H.264 needs an even frame size, got {W}x{H}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            stream.options = {"crf": str(crf)}
            for t in range(T):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frames_THW3[t], format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def contact_sheet(rows: list[tuple[str, np.ndarray]], path: str | Path, frames_per_row: int = 6,
                  label_width: int = 220, pad: int = 2) -> Path:
    """PNG of labelled rows, each ``frames_per_row`` frames evenly spaced over a clip uint8 [T, H, W, 3].
    Written to a temporary name and renamed into place."""
    H, W = rows[0][1].shape[1:3]
    n = min(frames_per_row, max(r[1].shape[0] for r in rows))
    canvas = Image.new("RGB", (label_width + n * (W + pad) + pad, len(rows) * (H + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, clip) in enumerate(rows):
        y = pad + r * (H + pad)
        draw.text((4, y + 2), label[:60], fill=(0, 0, 0))
        picks = np.linspace(0, clip.shape[0] - 1, n).round().astype(int)
        for c, t in enumerate(picks):
            canvas.paste(Image.fromarray(clip[t]), (label_width + pad + c * (W + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
