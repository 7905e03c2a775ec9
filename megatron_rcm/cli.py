"""``megatron-rcm``: the command-line entry point.

    megatron-rcm quickstart [--output-dir outputs/quickstart]        the embedded end-to-end demo
    megatron-rcm quickstart --data shapes [--seeds 0,1,2]            the embedded video benchmark
    megatron-rcm train --config examples/configs/wan2.1_t2v_1.3b.yaml [--set key=value ...] [key=value ...]
    megatron-rcm train --config ... --print-config                   show the merged config and exit
    megatron-rcm plan --preset wan2.1-t2v-14b --frames 81 --size 1280x720 --gpus 128 --gpu-memory 80
                                                                     rank parallel layouts (docs/throughput.md)
    megatron-rcm encode --captions captions.jsonl --weights Wan2.1-T2V-1.3B-Diffusers --out shards/
    megatron-rcm synthesize --prompts prompts.txt --weights Wan2.1-T2V-1.3B-Diffusers --out shards/
    megatron-rcm sample --student runs/x/checkpoints --weights Wan2.1-T2V-1.3B-Diffusers --prompt "..." --out videos/

Overrides use dotted keys (``--set optimizer.lr=1e-6`` or a bare ``optimizer.lr=1e-6``); values are YAML.
Precedence: command line > config file > defaults. Multi-GPU: ``torchrun --nproc-per-node N -m
megatron_rcm.cli train ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from megatron_rcm.config.schema import ConfigError


def configure_logging(verbose: bool = False) -> None:
    """INFO logs of this package; Megatron-Core's INFO listings (every parameter of every gradient bucket,
    about 1,600 lines for Wan 1.3B) and its fallback warnings (no Apex / Transformer Engine) only with
    ``verbose``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core\.")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megatron-rcm", description="rCM distillation on Megatron-Core",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="also show Megatron-Core's INFO logs (gradient bucket listings) and its warnings")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="distill a teacher with the rCM engine")
    tr.add_argument("--config", required=True, help="YAML file (see examples/configs/)")
    tr.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable)")
    tr.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides")
    qs = sub.add_parser("quickstart", help="train a tiny teacher on digits, distill it (rCM, sCM, DMD), evaluate")
    qs.add_argument("--data", choices=("digits", "shapes"), default="digits",
                    help="digits: 8x8 digit images; shapes: the procedural moving-shapes video benchmark")
    qs.add_argument("--output-dir", default=None, help="default outputs/quickstart or outputs/shapes")
    qs.add_argument("--seeds", default=None, help="comma-separated training seeds (shapes only; default 0)")
    qs.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps")
    qs.add_argument("--teacher-batch", type=int, default=None,
                    help="teacher training batch (shapes only; default 32, sized for the 2-core CPU budget)")
    qs.add_argument("--distill-steps", type=int, default=None, help="distillation steps per method")
    qs.add_argument("--methods", default="rcm,scm,dmd", help="comma-separated distillation algorithms")
    qs.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of examples/configs/quickstart.yaml (repeatable)")
    from megatron_rcm.planner.cli import add_parser as add_plan_parser

    add_plan_parser(sub)
    from megatron_rcm.pipeline.cli_args import add_pipeline_commands

    add_pipeline_commands(sub)
    return ap


def _shapes(args) -> int:
    from megatron_rcm.shapes_bench import ShapesBenchOptions, run_shapes_bench

    opts = ShapesBenchOptions(output_dir=args.output_dir or "outputs/shapes", methods=tuple(args.methods.split(",")),
                              overrides=list(args.sets))
    if args.seeds is not None:
        try:
            opts.seeds = tuple(int(s) for s in args.seeds.split(","))
        except ValueError as err:
            raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers") from err
    if args.teacher_steps is not None:
        opts.teacher_steps = args.teacher_steps
    if args.distill_steps is not None:
        opts.distill_steps = args.distill_steps
    if args.teacher_batch is not None:
        opts.teacher_batch = args.teacher_batch
    run_shapes_bench(opts)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    configure_logging(any(a in ("-v", "--verbose") for a in argv))  # before the parser imports Megatron-Core
    args = _parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.command == "plan":
            from megatron_rcm.planner.cli import run as run_plan

            try:
                return run_plan(args)
            except ValueError as err:
                print(f"megatron-rcm plan: {err}", file=sys.stderr)
                return 2
        if args.command in ("encode", "synthesize", "sample"):
            from megatron_rcm.pipeline.cli_args import run_pipeline_command

            return run_pipeline_command(args)
        if args.command == "train":
            from megatron_rcm.config.loader import dump_yaml, load_config

            cfg = load_config(args.config, [*args.sets, *args.overrides])
            if args.print_config:
                print(dump_yaml(cfg), end="")
                return 0
            from megatron_rcm.training import Trainer

            trainer = Trainer(cfg)
            trainer.train()
            trainer.close()
            return 0
        if args.data == "shapes":
            return _shapes(args)
        for flag, value in (("--seeds", args.seeds), ("--teacher-batch", args.teacher_batch)):
            if value is not None:
                raise ConfigError(f"{flag} is only supported with --data shapes")
        from megatron_rcm.quickstart import QuickstartOptions, run_quickstart

        opts = QuickstartOptions(output_dir=args.output_dir or "outputs/quickstart", methods=tuple(args.methods.split(",")),
                                 overrides=list(args.sets))
        if args.teacher_steps is not None:
            opts.teacher_steps = args.teacher_steps
        if args.distill_steps is not None:
            opts.distill_steps = args.distill_steps
        run_quickstart(opts)
        return 0
    except ConfigError as err:
        print(f"megatron-rcm: config error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from megatron_rcm.training.checkpoint import CheckpointError

        if not isinstance(err, CheckpointError):
            raise
        print(f"megatron-rcm: checkpoint error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
