"""`petseg status` and `petseg rollback`: what serves under each endpoint name on this machine, and going back.

    petseg status [NAME] [--json]
    petseg rollback [NAME]            # default petseg; the release that served before, without downtime

An endpoint is the stable address a release serves at (`petseg.local_endpoint`);
a run's release step switches it when the gate accepts a model (``--endpoint``).
"""

from __future__ import annotations

import argparse
import json

from petseg import endpoints, local_endpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``status`` and ``rollback``."""
    command = subparsers.add_parser("status", help="what serves under each endpoint name, and since when")
    command.add_argument("name", nargs="?", help="one endpoint (default: every endpoint)")
    command.add_argument("--json", action="store_true", help="print JSON")
    command.set_defaults(handler=status_command)
    command = subparsers.add_parser("rollback", help="serve the release that served an endpoint before, "
                                                     "without downtime")
    command.add_argument("name", nargs="?", default=endpoints.DEFAULT_NAME,
                         help=f"the endpoint (default {endpoints.DEFAULT_NAME})")
    command.set_defaults(handler=rollback_command)


def status_command(args: argparse.Namespace) -> int:
    """One block per endpoint: address, up or down, the release serving (run, fingerprints, since), history."""
    rows = local_endpoint.status(args.name)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    if not rows:
        print("no endpoints yet: a run with --deploy local serves its release under --endpoint (default petseg)")
        return 0
    for row in rows:
        serving = row["serving"]
        print(f"{row['name']}  {row['url'] or '-'}  {'up' if row['up'] else 'down'}")
        if serving:
            print(f"  serving  {serving['version']} since {serving['since']} (run {serving['run']}, "
                  f"{serving['mask_source']} mask, {serving['deployment']['server']})")
            print(f"  model    {serving['model_fingerprint']}\n  dataset  {serving['dataset_fingerprint']}")
        else:
            print("  serving  nothing")
        print(f"  before   {', '.join(reversed(row['history'])) or '-'}   ({row['accepted']} release(s) accepted)")
    return 0


def rollback_command(args: argparse.Namespace) -> int:
    """Serve the previous release of an endpoint; print what serves now and what it replaced."""
    result = local_endpoint.rollback(args.name)
    print(f"{args.name}: {result['release']} serves at {result['url']} (rolled back from {result['replaced']})")
    return 0
