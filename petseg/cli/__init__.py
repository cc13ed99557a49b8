"""The `petseg` command line: builds the parser from the command groups beside it (petseg.cli) and runs one command."""

from __future__ import annotations

import argparse
import os
import sys

from petseg.cli import cluster, data, endpoint, keys, lineage, runs, serving
from petseg.errors import PetsegError
from petseg.lineage import runs as run_lookups

# Each group registers its commands; this order is the order of `petseg --help`.
COMMAND_GROUPS = (data, runs, serving, endpoint, lineage, keys, cluster)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="petseg",
        description="Reproducible pet segmentation: data, runs, serving and lineage.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user mistakes print one line and exit 2."""
    # Metaflow's Client and runner refuse a root shell with no user name: give it one, as the flow file does.
    run_lookups.default_user(os.environ)
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
