#!/usr/bin/env python
"""Convert Wan2.1 weights between the public layouts and Megatron-Core distributed checkpoints.

  import  Wan2.1 T2V/I2V weights (original ``WanModel`` keys, diffusers ``WanTransformer3DModel``, or an
          rCM / TurboDiffusion student: a .pt/.pth of ``net.``/``net_ema.`` keys; .safetensors or .pth,
          single or sharded with an index; a diffusers pipeline root or its transformer/ folder) -> a
          Megatron ``dist_checkpointing`` checkpoint that loads at any TP size.
  export  a Megatron checkpoint (the converter's, or a training run's raw student or its EMA) ->
          diffusers (``WanTransformer3DModel.from_pretrained``), the original layout, or rcm (OUT/model.pt).

Both stream: one tensor (import) or a 512 MB window (export) in memory at a time. Details and the on-disk
contract: docs/conversion.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from megatron_rcm.config.argtypes import positive_float, positive_int

EPILOG = """examples:
  python tools/convert.py import /models/Wan2.1-T2V-14B /ckpt/wan14b --dtype bf16
  python tools/convert.py import /models/Wan2.1-T2V-1.3B-Diffusers /ckpt/wan1.3b --tp 2 --verify
  python tools/convert.py export /runs/rcm/checkpoints /out/student-diffusers --format diffusers --ema
  python tools/convert.py export /runs/rcm/checkpoints /out/student-pipeline --format diffusers --ema \
      --pipeline-from /models/Wan2.1-T2V-1.3B-Diffusers
  python tools/convert.py export outputs/tiny/checkpoints/latest /out/tiny --format diffusers \
      --config my_run.yaml --set model.overrides.num_layers=4
  python tools/convert.py export /ckpt/wan1.3b /out/wan1.3b-original --format original
  python tools/convert.py import /models/rCM_Wan2.1_T2V_1.3B_480p.pt /ckpt/rcm-student
  python tools/convert.py import /models/Wan2.2-T2V-A14B-Diffusers /ckpt/wan22-a14b   # both experts
  python tools/convert.py export /runs/rcm/checkpoints /out/student-rcm --format rcm --ema
"""


def build_parser() -> argparse.ArgumentParser:
    from megatron_rcm.convert.importer import DTYPE_CHOICES
    from megatron_rcm.models.wan import PRESETS

    parser = argparse.ArgumentParser(
        prog="convert.py",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="Wan2.1 weights -> Megatron dist_checkpointing checkpoint")
    imp.add_argument("src", help="weight file, *.index.json, folder of them, or diffusers pipeline root")
    imp.add_argument("out", help="output checkpoint folder (must not hold a checkpoint, unless --overwrite)")
    imp.add_argument(
        "--tp",
        type=positive_int,
        default=1,
        help="tensor-parallel size you will load at: checks heads and FFN width divide by it (the checkpoint "
        "itself loads at any TP size); --verify runs at TP=1",
    )
    imp.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="keep",
        help="stored dtype: keep the source's (default), bf16, ...",
    )
    imp.add_argument("--preset", choices=PRESETS, help="force a preset instead of detecting the architecture")
    imp.add_argument(
        "--num-heads",
        type=positive_int,
        help="attention heads, when neither a preset nor config.json gives them (default: the head count of "
        "the one preset with the source's shapes)",
    )
    imp.add_argument(
        "--verify",
        action="store_true",
        help="run the source (diffusers) and the converted model on one random input; OUT is written only if "
        "the outputs are finite and their relative difference is within --verify-tol (else exit status 3)",
    )
    imp.add_argument(
        "--verify-tol",
        type=positive_float,
        help="--verify's tolerance on max|ours - source| / max|source| (default 1e-4)",
    )

    imp.add_argument(
        "--boundary-ratio",
        type=positive_float,
        help="Wan2.2 A14B folder (transformer/ + transformer_2/, or high_noise_model/ + low_noise_model/): the "
        "experts' switch in RF time, when neither model_index.json nor the detected preset gives it",
    )

    exp = sub.add_parser("export", help="Megatron checkpoint -> diffusers, original or rcm layout")
    exp.add_argument(
        "ckpt",
        help="checkpoint folder (converter output or a training step_*), a run's checkpoint root, or its "
        "'latest' pointer file",
    )
    exp.add_argument("out", help="output folder (must not hold a model, unless --overwrite)")
    exp.add_argument(
        "--format",
        required=True,
        choices=("diffusers", "original", "rcm"),
        dest="fmt",
        help="rcm: the rCM release's / TurboDiffusion's student layout, OUT/model.pt (torch.save of net.* keys, "
        "linear patch embedding), held in memory whole",
    )
    exp.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw model")
    exp.add_argument("--prefix", help="checkpoint key prefix of the model to export (overrides --ema)")
    exp.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="keep", help="output dtype (default: as stored)"
    )
    exp.add_argument(
        "--num-heads", type=positive_int, help="attention heads, when the checkpoint has no wan_config.json"
    )
    exp.add_argument(
        "--config",
        dest="train_config",
        help="the training run's YAML config: a training checkpoint records no architecture (heads, ...); "
        "its model.preset + model.overrides give it",
    )
    exp.add_argument(
        "--set",
        dest="train_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override of the training config, as given to 'megatron-rcm train' (repeatable)",
    )
    exp.add_argument(
        "--pipeline-from",
        metavar="WEIGHTS",
        help="with --format diffusers: write a full pipeline folder (OUT/transformer/ = this model, plus the vae/, "
        "text_encoder/, tokenizer/, scheduler/ and model_index.json of the diffusers pipeline folder WEIGHTS) "
        "that WanPipeline.from_pretrained(OUT) loads",
    )
    exp.add_argument(
        "--max-shard-size", type=positive_float, default=10.0, help="GB per safetensors shard (default 10)"
    )

    for p in (imp, exp):
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds files")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _quiet_library_warnings() -> None:
    """Megatron-Core and DCP warn on import and load about things a conversion does not use (Transformer
    Engine, Apex, deprecated aliases they call themselves); the tool's own messages are the ones to read."""
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings(
            "ignore", category=category, module=r"(megatron|torch\.distributed\.checkpoint)"
        )


def main(argv: list[str] | None = None) -> int:
    _quiet_library_warnings()
    args = build_parser().parse_args(argv)
    from megatron_rcm.convert.errors import ConversionError, VerificationError

    try:
        if args.command == "import":
            from megatron_rcm.convert.importer import run_import

            report = run_import(
                args.src,
                args.out,
                tp=args.tp,
                dtype=args.dtype,
                preset=args.preset,
                num_heads=args.num_heads,
                overwrite=args.overwrite,
                verify=args.verify,
                verify_tol=args.verify_tol,
                progress=not args.no_progress,
                boundary_ratio=args.boundary_ratio,
            )
        else:
            from megatron_rcm.convert.exporter import run_export

            report = run_export(
                args.ckpt,
                args.out,
                fmt=args.fmt,
                ema=args.ema,
                prefix=args.prefix,
                dtype=args.dtype,
                num_heads=args.num_heads,
                train_config=args.train_config,
                train_set=args.train_set,
                overwrite=args.overwrite,
                pipeline_from=args.pipeline_from,
                max_shard_bytes=int(args.max_shard_size * 1e9),
                progress=not args.no_progress,
            )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, VerificationError) else 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
