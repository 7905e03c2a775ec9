"""Tiny Wan pipeline components for the encode / synthesize / sample / export tests.

``make_weights(root)`` saves a diffusers Wan pipeline folder (vae/, text_encoder/, tokenizer/, transformer/,
scheduler/, model_index.json) of randomly initialized tiny models: a sentencepiece tokenizer trained on the
fly, a 2-layer umT5 of width 32, a Wan VAE with z_dim 4 (8x spatial, 4x temporal) and a WanTransformer3DModel
of the ``wan-tiny-t2v`` preset's architecture; ``make_i2v_weights`` the I2V variant (CLIP vision encoder,
image processor, I2V transformer). ``make_videos`` writes small mp4s and a frame folder.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

Z_DIM, TEXT_DIM = 4, 32
LATENTS_MEAN = [0.1, -0.2, 0.3, 0.0]
LATENTS_STD = [1.5, 0.5, 2.0, 1.0]
CORPUS = ["a cat walks on the grass", "a dog runs in the park", "red blue green yellow boat",
          "the quick brown fox jumps over the lazy dog", "waves roll onto a sandy beach at sunset"]
# the wan-tiny-t2v preset in diffusers' WanTransformer3DModel terms
TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=Z_DIM,
                   out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=256, num_layers=2)
TRAIN = ["model.preset=wan-tiny-t2v", "model.params_dtype=fp32", "data.source=shards", "data.micro_batch_size=1",
         f"data.text_dim={TEXT_DIM}", "data.text_len=512", "distill.algorithm=rcm", "distill.guidance=5.0",
         "distill.tangent_warmup=1", "distill.student_update_freq=2", "optimizer.warmup_steps=1",
         "logging.progress_bar=false", "training.seed=3", "training.device=cpu"]


def make_tokenizer(folder: Path):
    import sentencepiece as spm
    from transformers import T5Tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 40), model_writer=buf, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spm.model").write_bytes(buf.getvalue())
    return T5Tokenizer(vocab_file=str(folder / "spm.model"), extra_ids=0)


def make_components(tmp: Path, seed: int = 0) -> dict:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tok = make_tokenizer(tmp / "spm")
    te = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=4, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN,
                           latents_std=LATENTS_STD).eval()
    transformer = WanTransformer3DModel(**TRANSFORMER).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=5.0)
    return dict(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer, scheduler=scheduler)


def make_weights(root: Path, seed: int = 0) -> Path:
    """A saved diffusers WanPipeline folder of tiny random models (module docstring)."""
    from diffusers import WanPipeline

    pipe = WanPipeline(**make_components(root.parent / f".{root.name}-build", seed))
    pipe.save_pretrained(root)
    return root


IMAGE_DIM = 24
# the wan-tiny-i2v preset with in_channels = 4 noisy + 4 mask + 4 first-frame latent channels
I2V_TRANSFORMER = dict(TRANSFORMER, in_channels=3 * Z_DIM, image_dim=IMAGE_DIM, added_kv_proj_dim=128)


def make_i2v_weights(root: Path, seed: int = 0) -> Path:
    """A saved diffusers WanImageToVideoPipeline folder: the T2V components plus a tiny CLIP vision encoder
    (32 x 32 images, 8 x 8 patches: 17 tokens of width 24) and an I2V transformer."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    parts = make_components(root.parent / f".{root.name}-build", seed)
    parts["transformer"] = WanTransformer3DModel(**I2V_TRANSFORMER).eval()
    parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32,
        patch_size=8)).eval()
    parts["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    WanImageToVideoPipeline(**parts).save_pretrained(root)
    return root


def make_videos(root: Path, n: int = 3, frames: int = 12, size=(40, 48), fps: int = 16) -> list[Path]:
    """``n`` mp4s of ``frames`` frames (moving gradients) and one frame folder of PNGs."""
    from PIL import Image

    from megatron_rcm.pipeline.video_io import write_mp4

    root.mkdir(parents=True, exist_ok=True)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(n):
        clip = np.stack([np.stack([(xx * 5 + t * 9 + i * 40) % 256, (yy * 5 + i * 70) % 256,
                                   np.full_like(xx, 60 * i % 256)], -1) for t in range(frames)]).astype(np.uint8)
        paths.append(write_mp4(clip, root / f"clip{i}.mp4", fps=fps))
    folder = root / "frames0"
    folder.mkdir(exist_ok=True)
    for t in range(frames):
        Image.fromarray(np.full((h, w, 3), 10 * t, np.uint8)).save(folder / f"f{t:03d}.png")
    paths.append(folder)
    return paths


def write_captions(path: Path, videos: list[Path], captions=None) -> Path:
    captions = captions or CORPUS
    rel = lambda v: v.name if v.parent == path.parent else str(v)
    lines = [json.dumps({"video": rel(v), "caption": captions[i % len(captions)]}) for i, v in enumerate(videos)]
    path.write_text("\n".join(lines) + "\n")
    return path
