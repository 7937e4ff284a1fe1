"""Command line: `pyopt info`, `pyopt bench ...`."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # `pyopt bench` has its own parser (pyopt/bench/cli.py).
        from .bench.cli import main as bench_main
        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="pyopt", description="pyopt kernels for PyTorch")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="show the build, the CPU ISA and backend availability")
    p_info.add_argument("--json", action="store_true", help="print the info dict as JSON")
    sub.add_parser("bench", help="run benchmarks against stock PyTorch (pyopt bench -h)")
    args = parser.parse_args(argv)

    if args.cmd == "info":
        from ._info import format_info, info
        d = info()
        print(json.dumps(d, indent=2) if args.json else format_info(d))
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
