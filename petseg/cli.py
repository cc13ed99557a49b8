"""The `petseg` command line: one subcommand per job, each defined in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from petseg.errors import PetsegError

# Modules that define `add_parser(subparsers)`; each registers its subcommands.
COMMAND_MODULES = (
    "petseg.synth",
    "petseg.runs",
    "petseg.client",
    "petseg.lineage",
    "petseg.kubeconfig",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="petseg",
        description="Reproducible pet segmentation: data, runs, serving and lineage.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user mistakes print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except PetsegError as exc:
        print(f"petseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
