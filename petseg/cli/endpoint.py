"""`petseg status`, `promote` and `rollback`: what serves under each endpoint name, moving traffic, going back.

    petseg status [NAME] [--json]
    petseg rollback [NAME]            # default petseg; the release that served before, without downtime
    petseg promote NAME [--namespace NS] [--kind deployment|seldon|kserve|seldon-v2] [--by WHO]   # on Kubernetes
    petseg rollback NAME --kubernetes [--namespace NS] [--kind deployment|seldon|kserve|seldon-v2] [--by WHO]

An endpoint is the stable address a release serves at: on this machine (`petseg.deploy.local_endpoint`)
a run's release step switches it when the gate accepts a model (``--endpoint``); on Kubernetes it
is a Service in front of one Deployment per release (`petseg.deploy.deployment`), where a release
may first be staged, or one operator object (`petseg.deploy.rollout`), where a release may first
take a canary share.
"""

from __future__ import annotations

import argparse
import getpass
import json

from petseg import servers
from petseg.deploy import endpoints, local_endpoint
from petseg.errors import ConfigError

KINDS = {"deployment": "Service", "seldon": servers.SERVERS["seldon"].kind, "kserve": servers.SERVERS["mlserver"].kind,
         "seldon-v2": servers.SERVERS["seldon-v2"].kind}
"""``--kind`` -> the kind of the endpoint's object (a KServe InferenceService serves with ``mlserver``; a plain
Deployment's endpoint is its Service)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``status`` and ``rollback``."""
    command = subparsers.add_parser("status", help="what serves under each endpoint name, and since when")
    command.add_argument("name", nargs="?", help="one endpoint (default: every endpoint)")
    command.add_argument("--json", action="store_true", help="print JSON")
    command.set_defaults(handler=status_command)
    command = subparsers.add_parser("rollback", help="serve the release that served an endpoint before, "
                                                     "without downtime (or drop its canary on Kubernetes)")
    command.add_argument("name", nargs="?", default=endpoints.DEFAULT_NAME,
                         help=f"the endpoint (default {endpoints.DEFAULT_NAME})")
    command.add_argument("--kubernetes", action="store_true", help="the endpoint's object on Kubernetes")
    _cluster_options(command)
    command.set_defaults(handler=rollback_command)
    command = subparsers.add_parser("promote", help="on Kubernetes, move all of an endpoint's traffic to its "
                                                    "staged release or canary")
    command.add_argument("name", help="the endpoint")
    _cluster_options(command)
    command.set_defaults(handler=promote_command)


def _cluster_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--namespace", default="default", help="Kubernetes namespace (default: default)")
    command.add_argument("--kind", choices=KINDS, default="deployment",
                         help="deployment: a Service in front of a Deployment per release (--deploy kubernetes); "
                              "seldon: a SeldonDeployment; kserve: a KServe InferenceService; seldon-v2: a Seldon "
                              "Core v2 Experiment between the releases' Models (--deploy operator). Default "
                              "deployment")
    command.add_argument("--by", default=None, help="who does it, recorded in the object (default: the user name)")


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
    if args.kubernetes:
        return _change(args, "rollback", "rolled back")
    result = local_endpoint.rollback(args.name)
    print(f"{args.name}: {result['release']} serves at {result['url']} (rolled back from {result['replaced']})")
    return 0


def promote_command(args: argparse.Namespace) -> int:
    """All of the endpoint's traffic to its staged release or canary; print the traffic."""
    return _change(args, "promote", "promoted")


def _change(args: argparse.Namespace, action: str, verb: str) -> int:
    """Promote or roll back the endpoint on Kubernetes, signed by ``--by``; print what serves."""
    who = args.by or getpass.getuser()
    if args.kind == "deployment":
        from petseg.deploy import deployment

        result = getattr(deployment, action)(args.name, who=who, namespace=args.namespace)
        shares = ", ".join(f"{version} {percent} %" for version, percent in result["traffic"].items())
        staged = f"; staged {result['candidate']}" if result["candidate"] else ""
        print(f"{args.name}: {verb} by {who}; traffic {shares}{staged}")
        return 0
    from petseg.deploy import rollout

    change = getattr(rollout, action)

    def changed(current: dict | None) -> dict:
        if current is None:
            raise ConfigError(f"no {KINDS[args.kind]} {args.namespace}/{args.name}: nothing serves under that "
                              "endpoint on this cluster (check --namespace and --kind)")
        return change(current, who=who)

    applied = rollout.apply(args.name, changed, namespace=args.namespace, kind=KINDS[args.kind])
    shares = ", ".join(f"{version} {percent} %" for version, percent in rollout.traffic(applied).items())
    print(f"{args.name}: {verb} by {who}; traffic {shares}")
    return 0
