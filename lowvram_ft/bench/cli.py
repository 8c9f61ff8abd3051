"""`python -m lowvram_ft.bench`: the suite's command line, and the internal modes (--case, --probe,
--build) that the suite starts in its child processes."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .matrix import CASES_DIR, RANDOM_MODELS, BenchError
from .models import build_random_checkpoint
from .supervisor import DEFAULT_OUT_DIR, run_bench
from ..device import describe_gpu
from .worker import case_main


def add_bench_arguments(parser) -> None:
    """The flags of `python -m lowvram_ft bench` and `python -m lowvram_ft.bench`."""
    parser.add_argument("--config", metavar="CASES.yaml", help="case matrix: a YAML file (default: gpu.yaml on a "
                        f"GPU, cpu.yaml otherwise, from {CASES_DIR})")
    parser.add_argument("--out", default=DEFAULT_OUT_DIR, metavar="DIR", help=f"results folder (default {DEFAULT_OUT_DIR})")
    parser.add_argument("--cases", action="append", metavar="TEXT",
                        help="run only cases whose setting contains TEXT (repeatable), e.g. --cases 'gpt-oss-20b'")
    parser.add_argument("--budgets", metavar="GiB,...",
                        help="emulated cards to search, a subset of the matrix's (e.g. 16,24)")


def main(argv: list[str] | None = None) -> int:
    """`python -m lowvram_ft.bench [--config MATRIX] [--out DIR] [--cases TEXT] [--budgets 16,24]` runs
    the suite, like `python -m lowvram_ft bench`; the internal modes --case, --probe and --build are
    what the suite starts in its child processes."""
    parser = argparse.ArgumentParser(prog="python -m lowvram_ft.bench", description="Measure lowvram_ft against the "
                                     "plain Hugging Face stack (protocol: benchmarks/README.md).")
    add_bench_arguments(parser)
    parser.add_argument("--case", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build", choices=sorted(RANDOM_MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=("split-bnb4", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(describe_gpu()))
    elif args.build:
        build_random_checkpoint(args.build, args.layout or RANDOM_MODELS[args.build]["checkpoint"], args.model_dir)
    elif args.case:
        return case_main(args.case, args.result)
    else:
        try:
            run_bench(args.config, args.out, only=args.cases, budgets=args.budgets)
        except BenchError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0
