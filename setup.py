"""megatron-rcm: rCM distillation of video diffusion models on Megatron-Core."""

from setuptools import find_packages, setup

packages = find_packages(include=["megatron_rcm", "megatron_rcm.*"])
packages.append("megatron_rcm.kernels")

setup(
    name="megatron-rcm",
    version="0.1.0",
    description="Score-regularized continuous-time consistency distillation (rCM) on Megatron-Core",
    python_requires=">=3.10",
    packages=packages,
    # `kernels/` is shipped as `megatron_rcm.kernels`, never as a top-level `kernels` module.
    package_dir={"megatron_rcm.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "safetensors>=0.4",
        "einops>=0.7",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
        "packaging",
        "psutil",  # megatron-core's checkpoint writer imports it
        "scikit-learn",  # the quickstart's data set (8x8 digits) and its evaluation classifier
    ],
    extras_require={
        "triton": ["triton>=3.1"],
        "te": ["transformer-engine[pytorch]"],
        "wandb": ["wandb"],
        "interop": ["diffusers>=0.33", "accelerate", "transformers"],
        # encode / synthesize / sample: Wan VAE (diffusers), umT5 + tokenizer (transformers, sentencepiece),
        # video files (PyAV, whose wheels ship FFmpeg)
        "pipeline": ["diffusers>=0.33", "accelerate", "transformers>=4.56", "sentencepiece", "av"],
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            "diffusers>=0.33",
            "accelerate",  # diffusers' from_pretrained of WanTransformer3DModel needs it (convert tests)
            "transformers>=4.56",  # umT5 text encoder (pipeline tests)
            "sentencepiece",  # the pipeline tests train a tiny tokenizer
            "av",  # mp4 reading and writing (pipeline tests)
            "scikit-learn",
            "triton>=3.1",
        ],
    },
    entry_points={"console_scripts": ["megatron-rcm=megatron_rcm.cli:main"]},
)
