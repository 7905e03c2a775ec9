"""The frozen Wan components of a diffusers pipeline folder: umT5 text encoder + tokenizer, and the VAE.

Weights come only from a local folder in the diffusers pipeline layout (e.g. Wan2.1-T2V-1.3B-Diffusers)::

    vae/            AutoencoderKLWan (config.json holds latents_mean / latents_std)
    text_encoder/   transformers UMT5EncoderModel
    tokenizer/      its sentencepiece tokenizer
    transformer/    the DiT (the teacher; read by ``megatron_rcm.pipeline.dit``)
    scheduler/      the sampling scheduler (copied into pipeline exports)

Nothing is downloaded: every ``from_pretrained`` runs with ``local_files_only=True``.

Shape legend: B batch, L text tokens, D text width, C latent channels (z_dim), F/H/W latent frames/rows/cols,
T/Hp/Wp pixel frames/rows/cols.

Text, exactly as diffusers' ``WanPipeline._get_t5_prompt_embeds``: clean the prompt (``prompt_clean``), tokenize
with padding to ``max_len`` = 512 and truncation, run the encoder with the attention mask, keep the first
``sum(mask)`` rows. The shards store that unpadded [L, D]; the trainer zero-pads it to ``data.text_len``
(``megatron_rcm.data.batch.pad_text``), which gives Wan's zero-padded [512, D] context.

Latents, as diffusers' Wan pipelines normalize them (video2video ``prepare_latents`` / ``WanPipeline`` decode)::

    z = (mu - latents_mean) / latents_std        mu: the VAE posterior's mean ("argmax")
    x = VAE.decode(z * latents_std + latents_mean)
"""

from __future__ import annotations

from pathlib import Path

import torch

# Wan2.1's default negative prompt (``sample_neg_prompt`` of its shared config), used for CFG.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
TEXT_LEN = 512


class WeightsError(FileNotFoundError):
    """The weights folder lacks a component (the message names the folder and the missing part)."""


def check_weights_folder(root: str | Path, need: tuple[str, ...] = ("vae", "text_encoder", "tokenizer")) -> Path:
    """``root`` as a Path, after checking it holds the component folders ``need`` (each with its config)."""
    root = Path(root)
    if not root.is_dir():
        raise WeightsError(f"weights folder {root} does not exist (expected a diffusers Wan pipeline folder "
                           f"with {', '.join(d + '/' for d in need)})")
    configs = {"vae": "config.json", "text_encoder": "config.json", "transformer": "config.json",
               "tokenizer": None, "scheduler": "scheduler_config.json", "image_encoder": "config.json",
               "image_processor": "preprocessor_config.json"}
    for name in need:
        sub = root / name
        if not sub.is_dir():
            raise WeightsError(f"weights folder {root} has no {name}/ folder (a diffusers Wan pipeline folder such "
                               f"as Wan2.1-T2V-1.3B-Diffusers holds {', '.join(d + '/' for d in need)})")
        cfg = configs.get(name)
        if cfg is not None and not (sub / cfg).is_file():
            raise WeightsError(f"{sub} has no {cfg}: not a saved diffusers/transformers component")
    return root


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class TextEncoder:
    """umT5 prompt embeddings as Wan computes them (module docstring)."""

    def __init__(self, root: str | Path, device=None, dtype: torch.dtype = torch.float32, max_len: int = TEXT_LEN):
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = check_weights_folder(root, ("text_encoder", "tokenizer"))
        self.device = torch.device(device) if device is not None else default_device()
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        self.model = UMT5EncoderModel.from_pretrained(root / "text_encoder", local_files_only=True,
                                                      dtype=dtype).to(self.device).eval()
        self.max_len = max_len

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Unpadded embeddings [L_i, D] (CPU, the encoder's dtype), one per prompt."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tok = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=self.max_len,
                             truncation=True, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        ids_BL, mask_BL = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        lens_B = mask_BL.gt(0).sum(dim=1).tolist()
        emb_BLD = self.model(ids_BL, mask_BL).last_hidden_state.cpu()
        return [emb_BLD[i, :n].clone() for i, n in enumerate(lens_B)]


class VideoVAE:
    """Wan VAE: pixels in [-1, 1] [B, 3, T, Hp, Wp] <-> normalized latents [B, C, F, H, W] (module docstring)."""

    def __init__(self, root: str | Path, device=None, dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKLWan

        root = check_weights_folder(root, ("vae",))
        self.device = torch.device(device) if device is not None else default_device()
        self.model = AutoencoderKLWan.from_pretrained(root / "vae", local_files_only=True,
                                                      torch_dtype=dtype).to(self.device).eval()
        cfg = self.model.config
        self.z_dim = int(cfg.z_dim)
        self.mean_C = torch.tensor(cfg.latents_mean, dtype=torch.float32)
        self.std_C = torch.tensor(cfg.latents_std, dtype=torch.float32)
        if self.mean_C.numel() != self.z_dim or self.std_C.numel() != self.z_dim:
            raise WeightsError(f"{root / 'vae' / 'config.json'}: latents_mean/latents_std have {self.mean_C.numel()}/"
                               f"{self.std_C.numel()} entries, z_dim is {self.z_dim}")
        self.temporal_factor = int(getattr(cfg, "scale_factor_temporal", 4))
        self.spatial_factor = int(getattr(cfg, "scale_factor_spatial", 8))

    def latent_shape(self, num_frames: int, height: int, width: int) -> list[int]:
        """[C, F, H, W] of a clip of ``num_frames`` x ``height`` x ``width`` pixels."""
        return [self.z_dim, (num_frames - 1) // self.temporal_factor + 1, height // self.spatial_factor,
                width // self.spatial_factor]

    def _bcast(self, v_C: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v_C.to(like.device, like.dtype).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video_B3THW: torch.Tensor) -> torch.Tensor:
        """Normalized latents z = (mu - mean) / std, float32 on CPU."""
        p = next(self.model.parameters())
        mu_BCFHW = self.model.encode(video_B3THW.to(self.device, p.dtype)).latent_dist.mode().float()
        return ((mu_BCFHW - self._bcast(self.mean_C, mu_BCFHW)) / self._bcast(self.std_C, mu_BCFHW)).cpu()

    @torch.no_grad()
    def decode(self, z_BCFHW: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] [B, 3, T, Hp, Wp] (float32, CPU) of normalized latents."""
        p = next(self.model.parameters())
        z = z_BCFHW.to(self.device, torch.float32)
        mu = z * self._bcast(self.std_C, z) + self._bcast(self.mean_C, z)
        return self.model.decode(mu.to(p.dtype)).sample.float().clamp(-1, 1).cpu()
