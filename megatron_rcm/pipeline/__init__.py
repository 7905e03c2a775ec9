"""From videos and prompts to shards, and from a distilled student to videos.

    components   the weights folder (a diffusers Wan pipeline folder): umT5 text encoder + tokenizer, Wan VAE
    video_io     read videos / frame folders (PyAV, Pillow), resize + center-crop, write mp4, contact sheets
    chunks       rank slicing, resumable chunk folders and their atomic assembly into one shard folder
    encode       ``megatron-rcm encode``: videos + captions -> tar shards
    synthesize   ``megatron-rcm synthesize``: prompts -> teacher samples -> tar shards
    dit          load a student / teacher Wan DiT from a training checkpoint, an export or a weight file
    sample       ``megatron-rcm sample``: student (and teacher) -> latents -> VAE decode -> mp4 + contact sheet
    i2v          the image-to-video condition (CLIP features, first-frame mask + latent), as Wan I2V computes it
    pipeline_folder   a diffusers pipeline folder around an exported student (tools/convert.py export)
    cli_args     the subcommands' arguments and dispatch (torchrun ranks for encode / synthesize)
"""
