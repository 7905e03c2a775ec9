"""The image-to-video condition of Wan2.1 I2V, as diffusers' ``WanImageToVideoPipeline`` computes it.

Shape legend: T pixel frames, Hp/Wp pixel rows/cols, C latent channels, F = (T - 1) / 4 + 1 latent frames,
H/W latent rows/cols, N CLIP tokens, D CLIP width.

    clip_ND = CLIPVisionModel(CLIPImageProcessor(first frame)).hidden_states[-2]     (``encode_image``)
    y       = [mask_4FHW ; z_CFHW]                                                  (``prepare_latents``)
        z     = normalized VAE latent of [first frame, T - 1 zero frames]
        mask  = 1 on pixel frame 0, 0 elsewhere, frame 0 repeated 4 times (the VAE's temporal factor) so that
                T + 3 = 4 F mask frames fold into 4 channels per latent frame: [1, T+3, H, W] -> [4, F, H, W]

The DiT sees ``cat([x_t, y])`` along channels (``Conditioning.y``) and the CLIP tokens ahead of the text
(``Conditioning.clip_fea``). The components come from the weights folder's ``image_encoder/`` and
``image_processor/`` (a Wan2.1-I2V-14B-*-Diffusers folder has them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_rcm.pipeline.components import check_weights_folder, default_device

I2V_PARTS = ("image_encoder", "image_processor")


class ImageEncoder:
    """CLIP image features of Wan I2V (module docstring)."""

    def __init__(self, root: str | Path, device=None, dtype: torch.dtype = torch.float32):
        from transformers import CLIPImageProcessor, CLIPVisionModel

        root = check_weights_folder(root, I2V_PARTS)
        self.device = torch.device(device) if device is not None else default_device()
        self.processor = CLIPImageProcessor.from_pretrained(root / "image_processor", local_files_only=True)
        self.model = CLIPVisionModel.from_pretrained(root / "image_encoder", local_files_only=True,
                                                     dtype=dtype).to(self.device).eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, images_HW3: list[np.ndarray]) -> torch.Tensor:
        """uint8 RGB images -> features [B, N, D] (float32, CPU)."""
        from PIL import Image

        pixels = self.processor(images=[Image.fromarray(im) for im in images_HW3], return_tensors="pt")
        p = next(self.model.parameters())
        out = self.model(pixel_values=pixels.pixel_values.to(self.device, p.dtype), output_hidden_states=True)
        return out.hidden_states[-2].float().cpu()


def first_frame_mask(num_frames: int, latent_hw: tuple[int, int], temporal_factor: int = 4) -> torch.Tensor:
    """[temporal_factor, F, H, W]: 1 where the pixel frame is the given first frame (module docstring)."""
    H, W = latent_hw
    mask_1THW = torch.zeros(1, num_frames, H, W)
    mask_1THW[:, 0] = 1.0
    mask_1THW = torch.cat([mask_1THW[:, :1].repeat_interleave(temporal_factor, dim=1), mask_1THW[:, 1:]], dim=1)
    return mask_1THW.view(-1, temporal_factor, H, W).transpose(0, 1).contiguous()


def first_frame_condition(vae, frame_3HW: torch.Tensor, num_frames: int) -> torch.Tensor:
    """y [4 + C, F, H, W] for a first frame in [-1, 1] (``vae``: a ``VideoVAE``)."""
    _, Hp, Wp = frame_3HW.shape
    video_3THW = torch.cat([frame_3HW[:, None], frame_3HW.new_zeros(3, num_frames - 1, Hp, Wp)], dim=1)
    z_CFHW = vae.encode(video_3THW[None])[0]
    mask = first_frame_mask(num_frames, tuple(z_CFHW.shape[2:]), vae.temporal_factor)
    return torch.cat([mask, z_CFHW])
