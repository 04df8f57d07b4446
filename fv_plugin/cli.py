"""The ``fv`` command: ``fv bench overhead`` (more subcommands come with extraction and evaluation)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fv", description="Function-vector steering for Hugging Face models")
    parser.add_argument("command", choices=["bench"], help="what to run")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the command")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.command == "bench":
        from fv_plugin.bench import main as bench_main

        return bench_main(args.rest)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
