"""``petseg lineage``: a run's lineage graph, or the runs that made a model.

Each PetSegFlow run carries the graph as artifact ``lineage_graph`` (the name
``lineage`` is taken by the flow's parameter of that name) and the model
fingerprint as ``model_fingerprint``; this command reads them from the run's
``end`` step through the Metaflow Client (petseg.runs)::

    petseg lineage latest            # stages, parents, outputs, Pachyderm commits
    petseg lineage 1716 --json       # the graph itself
    petseg lineage --model 3f2a9c1d  # runs whose model fingerprint starts so
"""

from __future__ import annotations

import argparse
import json

from petseg import lineage, runs
from petseg.errors import ConfigError


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
    parser.set_defaults(handler=lineage_command)


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
