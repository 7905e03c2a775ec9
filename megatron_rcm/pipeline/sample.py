"""``megatron-rcm sample``: a distilled student (and optionally its teacher) -> videos.

Per prompt i, noise eps_i [1, C, F, H, W] is drawn from ``seed + i``; an I2V model starts every video from
``image`` (its CLIP features and first-frame condition, ``megatron_rcm.pipeline.i2v``); the student runs the few-step
sampler of rcm_math.md section 8 (``student_sample``: t = [atan(sigma_max), mid_t[:n-1]..., 0]) and, with
``teacher``, the teacher runs its own UniPC sampler (``unipc_sample``, Wan's shifted grid, CFG ``guidance``
with the negative prompt) from the same eps_i. Latents are decoded by the Wan VAE (``VideoVAE.decode``).

Output folder (written beside OUT, renamed into place when complete)::

    student/000.mp4 ...      one mp4 per prompt
    teacher/000.mp4 ...      with a teacher
    contact_sheet.png        per prompt a row of frames (student; teacher below it)
    summary.json             prompts, settings, what was loaded, wall times and the speed-up

Wall times cover the DiT sampling only (no text encoding, no VAE decode), summed over the prompts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_rcm.pipeline.components import WAN_NEGATIVE_PROMPT, check_weights_folder

logger = logging.getLogger("megatron_rcm.pipeline")


@dataclass
class SampleOptions:
    student: str
    weights: str
    """Diffusers Wan pipeline folder: vae/, text_encoder/, tokenizer/ (and transformer/, the default teacher)."""
    out: str
    prompts: list[str] = field(default_factory=list)
    steps: int = 4
    num_frames: int = 81
    height: int = 480
    width: int = 832
    fps: float = 16.0
    seed: int = 0
    sigma_max: float = 80.0
    mid_t: tuple[float, ...] = (1.5, 1.4, 1.0)
    teacher: str | None = None
    """Teacher weights (anything ``load_dit`` reads), or None for no teacher."""
    teacher_steps: int = 50
    guidance: float = 5.0
    shift: float = 5.0
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    image: str | None = None
    """I2V: the picture every video starts from (resized and center-cropped to height x width)."""
    ema: bool | None = None
    train_config: str | None = None
    train_set: tuple[str, ...] = ()
    num_heads: int | None = None
    dtype: str = "auto"
    overwrite: bool = False

    def validate(self) -> None:
        if not self.prompts:
            raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
        if not 1 <= self.steps <= len(self.mid_t) + 1:
            raise ValueError(f"--steps {self.steps}: the student samples with 1..{len(self.mid_t) + 1} steps")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"--num-frames {self.num_frames}: Wan's VAE needs 4k+1 frames (e.g. 81, 33, 9)")
        if self.height % 16 or self.width % 16 or self.height < 16 or self.width < 16:
            raise ValueError(f"--height {self.height} --width {self.width}: both must be positive multiples of 16")
        if self.teacher_steps < 1:
            raise ValueError(f"--teacher-steps {self.teacher_steps} must be >= 1")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a text file, or the ``caption``/``prompt`` field of each line of a .jsonl."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
                out.append(str(obj.get("prompt") or obj.get("caption") or obj["text"]))
            except (json.JSONDecodeError, KeyError, AttributeError) as err:
                raise ValueError(f"{path} line {n}: expected an object with 'prompt' or 'caption' ({err})") from err
        else:
            out.append(line.strip())
    if not out:
        raise ValueError(f"prompt file {path} holds no prompts")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_fits(model, what: str, text_dim: int, z_dim: int, weights: Path, image: str | None = None) -> None:
    cfg = model.config
    if (cfg.model_type == "i2v") != (image is not None):
        raise ValueError(f"{what} is an {cfg.model_type.upper()} model: " + (
            "give the picture to start from with --image" if image is None else "--image is for I2V models"))
    if cfg.text_dim != text_dim or cfg.out_channels != z_dim:
        raise ValueError(f"{what} takes text_dim={cfg.text_dim}, latent channels {cfg.out_channels}, but the text "
                         f"encoder / VAE of {weights} give {text_dim} / {z_dim}: they do not belong together")


def _image_condition(opts: SampleOptions, weights: Path, vae, device, dtype):
    """(CLIP features [1, N, D], condition channels [1, 4 + C, F, H, W]) of ``opts.image``."""
    from PIL import Image

    from megatron_rcm.pipeline.i2v import I2V_PARTS, ImageEncoder, first_frame_condition
    from megatron_rcm.pipeline.video_io import resize_center_crop, to_model_input

    check_weights_folder(weights, I2V_PARTS)
    try:
        with Image.open(opts.image) as im:
            frame_HW3 = resize_center_crop(im, opts.height, opts.width)
    except OSError as err:
        raise ValueError(f"--image {opts.image} cannot be read ({err})") from err
    clip = ImageEncoder(weights, device, dtype).encode([frame_HW3])
    y = first_frame_condition(vae, to_model_input(frame_HW3[None])[:, 0], opts.num_frames)[None]
    return clip.to(device, dtype), y.to(device, dtype)


@torch.no_grad()
def _run(model, sampler, noises, conds, device) -> tuple[list[torch.Tensor], float]:
    out, seconds = [], 0.0
    for noise, cond in zip(noises, conds):
        _sync(device)
        t0 = time.perf_counter()
        x = sampler(model, noise.to(device), cond)
        _sync(device)
        seconds += time.perf_counter() - t0
        out.append(x.float().cpu())
    return out, seconds


def run_sample(opts: SampleOptions, device=None, log=print) -> dict:
    """Sample, decode and write the output folder; returns the summary (also written as summary.json).

    Under torchrun with tensor parallelism every rank runs the same steps (same noise, same prompts: the
    model is collective) and rank 0 alone writes the folder and logs."""
    import torch.distributed as dist

    from megatron_rcm.convert.output_dir import atomic_output_dir, check_not_source, check_output_dir
    from megatron_rcm.data.batch import pad_text
    from megatron_rcm.pipeline.components import TEXT_LEN, TextEncoder, VideoVAE, default_device
    from megatron_rcm.pipeline.dit import load_dit
    from megatron_rcm.pipeline.encode import torch_dtype
    from megatron_rcm.pipeline.video_io import contact_sheet, to_uint8, write_mp4
    from megatron_rcm.rcm import Conditioning, TrigFlowDenoiser
    from megatron_rcm.rcm.samplers import student_sample, unipc_sample
    from megatron_rcm.rcm.trigflow import WAN_TIMESTEP_SCALE

    opts.validate()
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    log = log if rank0 else (lambda *_: None)
    weights = check_weights_folder(opts.weights)
    sources = [opts.student, opts.weights] + ([opts.teacher] if opts.teacher else [])
    check_not_source(opts.out, sources, "model it samples")
    check_output_dir(opts.out, opts.overwrite)
    device = torch.device(device) if device is not None else default_device()
    dtype = torch_dtype(opts.dtype)

    text = TextEncoder(weights, device, dtype)
    embs = text.encode(list(opts.prompts))
    neg = text.encode([opts.negative_prompt])[0]
    text_dim = text.dim
    del text
    vae = VideoVAE(weights, device)  # fp32, as Wan runs its VAE
    C, F, H, W = vae.latent_shape(opts.num_frames, opts.height, opts.width)
    noises = [torch.randn(1, C, F, H, W, generator=torch.Generator().manual_seed(opts.seed + i))
              for i in range(len(embs))]
    clip = y = None
    if opts.image is not None:
        clip, y = _image_condition(opts, weights, vae, device, dtype)
    conds = [Conditioning(context=pad_text(e, TEXT_LEN, "prompt")[None].to(device, dtype), clip_fea=clip, y=y,
                          neg_context=pad_text(neg, TEXT_LEN, "negative prompt")[None].to(device, dtype))
             for e in embs]

    student, student_what = load_dit(opts.student, ema=opts.ema, train_config=opts.train_config,
                                     train_set=opts.train_set, num_heads=opts.num_heads, device=device, dtype=dtype)
    _check_fits(student, f"student {opts.student}", text_dim, C, weights, opts.image)
    log(f"student: {student_what}")
    gen = torch.Generator(device).manual_seed(opts.seed)

    def student_fn(model, noise, cond):
        return student_sample(TrigFlowDenoiser(model, WAN_TIMESTEP_SCALE), noise, cond, opts.steps, opts.sigma_max,
                              opts.mid_t, generator=gen)

    rows = {"student": _run(student, student_fn, noises, conds, device)}
    del student
    teacher_what = None
    if opts.teacher:
        teacher, teacher_what = load_dit(opts.teacher, num_heads=opts.num_heads, device=device, dtype=dtype)
        _check_fits(teacher, f"teacher {opts.teacher}", text_dim, C, weights, opts.image)
        log(f"teacher: {teacher_what}")

        def teacher_fn(model, noise, cond):
            return unipc_sample(TrigFlowDenoiser(model, WAN_TIMESTEP_SCALE), noise, cond, opts.guidance,
                                opts.teacher_steps, opts.shift)

        rows["teacher"] = _run(teacher, teacher_fn, noises, conds, device)
        del teacher

    labels = {"student": f"student {opts.steps}-step",
              "teacher": f"teacher {opts.teacher_steps}-step cfg {opts.guidance:g}"}
    summary = {
        "prompts": list(opts.prompts),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("prompts", "negative_prompt")},
        "student": student_what,
        "teacher": teacher_what,
        "latent_shape": [C, F, H, W],
        "student_seconds": rows["student"][1],
    }
    if "teacher" in rows:
        summary["teacher_seconds"] = rows["teacher"][1]
        summary["speedup"] = rows["teacher"][1] / max(rows["student"][1], 1e-9)
    if not rank0:
        return summary
    sheet = []
    with atomic_output_dir(opts.out, opts.overwrite) as tmp:
        clips = {}
        for name, (latents, _) in rows.items():
            clips[name] = [to_uint8(vae.decode(z)[0]) for z in latents]
            for i, clip in enumerate(clips[name]):
                write_mp4(clip, tmp / name / f"{i:03d}.mp4", fps=opts.fps)
        for i, prompt in enumerate(opts.prompts):
            sheet += [(f"{labels[name]}: {prompt}", clips[name][i]) for name in rows]
        contact_sheet(sheet, tmp / "contact_sheet.png")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    n = len(opts.prompts)
    log(f"student {opts.steps}-step: {summary['student_seconds']:.2f} s for {n} video(s)")
    if "teacher" in rows:
        log(f"teacher {opts.teacher_steps}-step (CFG {opts.guidance:g}): {summary['teacher_seconds']:.2f} s; "
            f"speed-up {summary['speedup']:.1f}x")
    log(f"wrote {opts.out}: {n} mp4(s) per model, contact_sheet.png, summary.json")
    return summary
