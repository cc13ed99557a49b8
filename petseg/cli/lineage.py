"""``petseg lineage`` and ``petseg verify``: a run's lineage, the runs that made a model, and their proof.

Each PetSegFlow run carries the graph as artifact ``lineage_graph`` (the name
``lineage`` is taken by the flow's parameter of that name) and the model
fingerprint as ``model_fingerprint``; these commands read them from the run's
``end`` step through the Metaflow Client (petseg.lineage.runs)::

    petseg lineage latest                # stages, what each read, outputs, Pachyderm commits
    petseg lineage 1716 --json           # the graph itself
    petseg lineage latest --openlineage  # the OpenLineage events kept beside the datastore
    petseg lineage --model 3f2a9c1d      # runs whose model fingerprint starts so
    petseg verify latest                 # its signed release first, then every file the run names (exit 1 at the first mismatch)
    petseg verify --release DIR_OR_S3    # a release: its signature and provenance, then its files and its run
    petseg verify --model 3f2a9c1d       # every run that made the model
"""

from __future__ import annotations

import argparse
import json
import os

from petseg.errors import ConfigError, RunError
from petseg.lineage import graph as lineage
from petseg.lineage import runs


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``petseg lineage``."""
    parser = subparsers.add_parser(
        "lineage",
        help="show a run's lineage, or find the runs that produced a model",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "run", nargs="?", help=f"'latest', a run id, or {runs.FLOW}/<run id>"
    )
    parser.add_argument(
        "--model", metavar="FINGERPRINT",
        help="list the runs that produced this model (fingerprint or its first 8+ characters)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--openlineage", action="store_true",
                        help="print the run's OpenLineage events (JSON lines) kept beside its datastore")
    parser.set_defaults(handler=lineage_command)

    parser = subparsers.add_parser(
        "verify",
        help="re-hash every stored file of a run or a release and check it against its fingerprints and lineage",
        description="Read back every file a run or a release names (shards, model weights, calibration table, "
                    "manifest, reports) from wherever it lives, re-hash it, and check it against the run's "
                    "fingerprints, its lineage graph and, with --pachyderm, its Pachyderm commits. A release is "
                    "checked first for its signature and SLSA provenance, against the public keys that "
                    "$PETSEG_TRUSTED_KEYS names (default: the keys directory of petseg's configuration); a run's "
                    "release is checked before any of the run's artifacts, which are pickles, is read, and a run "
                    "without a release is not verified. Exit 0 "
                    "with a one-line summary naming the signer's key when all match; exit 1 naming the first "
                    "check that does not.",
    )
    parser.add_argument("run", nargs="?", help=f"'latest', a run id, or {runs.FLOW}/<run id>")
    parser.add_argument("--release", metavar="DIR_OR_S3", help="a release directory or s3:// prefix")
    parser.add_argument("--model", metavar="FINGERPRINT", help="every run that produced this model (8+ characters); "
                        "those that released nothing are listed as not verified")
    parser.add_argument("--pachyderm", metavar="HOST:PORT", default=os.environ.get("PACHD_ADDRESS") or None,
                        help="also check the run's Pachyderm commits there (default $PACHD_ADDRESS)")
    parser.add_argument("--s3-endpoint-url", help="S3 endpoint of a non-AWS S3 server (default: Metaflow's)")
    parser.set_defaults(handler=verify_command)


def lineage_command(args: argparse.Namespace) -> int:
    """Run ``petseg lineage``.

    Returns:
        0 when something was shown, 1 when no run made the given model.

    Raises:
        ConfigError: neither or both of RUN and --model were given.
        RunError: the run is unknown or has no lineage.
    """
    if bool(args.run) == bool(args.model):
        raise ConfigError(
            "give either a run (e.g. `petseg lineage latest`) or --model FINGERPRINT"
        )
    if args.run and args.openlineage:
        return _print_openlineage(args.run)
    if args.run:
        graph = runs.run_graph(args.run)
        print(json.dumps(graph, indent=2, sort_keys=True) if args.json else lineage.format_graph(graph))
        return 0
    graphs = lineage.find_runs_by_model(args.model, runs.run_graphs())
    if args.json:
        print(json.dumps(graphs, indent=2, sort_keys=True))
    for graph in [] if args.json else graphs:
        mirror = graph.get("pachyderm") or {}
        print(
            f"{graph['pathspec']}  model {graph['model_fingerprint'][:12]}"
            f"  dataset {(graph.get('dataset_fingerprint') or '-')[:12]}"
            f"  code {graph.get('code_version') or '-'}"
            f"  commit set {mirror.get('commit_set') or '-'}"
        )
    if not graphs and not args.json:
        print(f"no finished {runs.FLOW} run produced a model with fingerprint {args.model}")
    return 0 if graphs else 1


def _print_openlineage(spec: str) -> int:
    """Print a run's kept OpenLineage events, one JSON document per line; 1 when there are none."""
    from petseg import storage
    from petseg.lineage import openlineage

    run = runs.resolve_run(spec, finished=False)
    location = runs.openlineage_location(run)
    events = openlineage.read_events(location, s3_endpoint_url=storage.s3_endpoint(metaflow=True))
    for event in events:
        print(json.dumps(event, sort_keys=True))
    if not events:
        print(f"no OpenLineage events kept for {run.pathspec} under {location}: its steps sent them to a "
              "configured transport (or OPENLINEAGE_DISABLED was set)")
        return 1
    return 0


def verify_command(args: argparse.Namespace) -> int:
    """Run ``petseg verify``.

    Returns:
        0 when every file matches (a one-line summary), 1 at the first that does not (a one-line report).

    Raises:
        ConfigError: not exactly one of RUN, --release and --model was given.
        RunError: the run is unknown, unfinished or has no lineage.
    """
    from petseg import storage
    from petseg.lineage import verify

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up notices, when weights are loaded
    if sum(bool(value) for value in (args.run, args.release, args.model)) != 1:
        raise ConfigError("give one of: a run (e.g. `petseg verify latest`), --release DIR_OR_S3, "
                          "or --model FINGERPRINT")
    endpoint = storage.s3_endpoint(args.s3_endpoint_url, metaflow=True)
    try:
        if args.release:
            tally = verify.verify_release(args.release, s3_endpoint_url=endpoint, find_graph=runs.graph_of_pathspec)
            print(tally.summary(f"release {args.release}"))
            return 0
        # Runs are found by their metadata and tags, and each run's signed release is verified before any of
        # its artifacts (pickles) is read.
        specs = [args.run] if args.run else runs.runs_of_model(args.model)
        if not specs:
            print(f"no finished {runs.FLOW} run produced a model with fingerprint {args.model}")
            return 1
        verified = 0
        for spec in specs:
            try:
                location, run = runs.release_location(spec, s3_endpoint_url=endpoint)
            except RunError as err:
                if args.run:
                    raise
                # Another run that made the model but released nothing: nothing of it is read, nothing proven.
                print(f"not verified {spec}: {err}")
                continue
            tally = verify.verify_run(run.pathspec, release=location,
                                      read_graph=lambda run=run: runs.run_graph(run.pathspec),
                                      artifacts=runs.artifact_reader(run),
                                      blob_root=lambda run=run: runs.blob_root_of(run),
                                      s3_endpoint_url=endpoint, pachyderm_address=args.pachyderm)
            print(tally.summary(tally.subject))
            verified += 1
    except verify.Mismatch as mismatch:
        print(f"{'REFUSED' if isinstance(mismatch, verify.Refusal) else 'MISMATCH'} {mismatch}")
        return 1
    if not verified:
        print(f"no {runs.FLOW} run that produced the model {args.model} has a signed release: nothing verified")
        return 1
    return 0

