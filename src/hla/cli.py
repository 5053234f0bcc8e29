"""The ``hla`` command line. Each sub-command imports its module lazily so ``hla --version`` is instant."""

from __future__ import annotations

import argparse
import sys

from hla import __version__


def _cmd_demo(args: argparse.Namespace) -> int:
    from hla.demo import run_demo

    return run_demo(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from hla.generation.command import run_generate

    return run_generate(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from hla.bench.claims import run_bench

    return run_bench(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from hla.training.run import run_train

    return run_train(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    from hla.training.run import run_eval

    return run_eval(args)


def _cmd_info(args: argparse.Namespace) -> int:
    from hla.models.info import model_info, resolve_config

    print(model_info(resolve_config(args.config)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hla", description="Hybrid linear attention (Kimi Linear) tools")
    parser.add_argument("--version", action="version", version=f"hla {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="self-check and a small side-by-side run on this machine")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: sized for the device)")
    p.add_argument("--out", default="runs/demo", help="where demo.png and demo.json go")
    p.add_argument("--budget-s", type=float, default=None, help="CPU: seconds of training for both models")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("generate", help="stream a completion from a model directory (or random weights)")
    from hla.generation.command import add_arguments

    add_arguments(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("bench", help="efficiency claims vs the all-MLA twin: cache, TPOT, throughput, prefill")
    from hla.bench.options import add_arguments as add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)

    from hla.training.run import add_eval_arguments, add_train_arguments

    p = sub.add_parser("train", help="train a model on a synthetic task or Shakespeare (torchrun for DDP)")
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("eval", help="accuracy by length / held-out perplexity of a trained run")
    add_eval_arguments(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("info", help="parameter count, layer schedule, weight and cache bytes of a model config")
    p.add_argument("config", metavar="CONFIG_OR_DIR", help="preset name (tiny, small, 1b, kimi-linear-48b), "
                   "config.json or checkpoint directory")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
