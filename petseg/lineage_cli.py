"""``petseg lineage``: a run's lineage graph, or the runs that made a model.

Each PetSegFlow run carries the graph as artifact ``lineage_graph`` (the name
``lineage`` is taken by the flow's parameter of that name) and the model
fingerprint as ``model_fingerprint``; this command reads them from the run's
``end`` step through the Metaflow Client::

    petseg lineage latest            # stages, parents, outputs, Pachyderm commits
    petseg lineage 1716 --json       # the graph itself
    petseg lineage --model 3f2a9c1d  # runs whose model fingerprint starts so
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

from petseg import lineage
from petseg.errors import ConfigError, RunError
from petseg.runs import FLOW

# Where a run keeps its graph, in order of preference.
GRAPH_ARTIFACTS = ("lineage_graph", "lineage")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``petseg lineage`` on the ``petseg`` command's subparsers."""
    parser = subparsers.add_parser(
        "lineage",
        help="show a run's lineage, or find the runs that produced a model",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "run", nargs="?", help=f"'latest', a run id, or {FLOW}/<run id>"
    )
    parser.add_argument(
        "--model", metavar="FINGERPRINT",
        help="list the runs that produced this model (fingerprint or its first 8+ characters)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(handler=command)
    return parser


def command(args: argparse.Namespace) -> int:
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
        graph = run_graph(args.run)
        print(json.dumps(graph, indent=2, sort_keys=True) if args.json else lineage.format_graph(graph))
        return 0
    graphs = lineage.find_runs_by_model(args.model, run_graphs())
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
        print(f"no finished {FLOW} run produced a model with fingerprint {args.model}")
    return 0 if graphs else 1


def run_graph(run: str) -> dict:
    """The lineage graph of one run.

    Args:
        run: ``latest``, a run id, or ``PetSegFlow/<run id>``.

    Raises:
        RunError: no such run, a run of another flow, or one without lineage.
    """
    from petseg.runs import resolve_run

    found = resolve_run(run)
    graph = _graph_of(found)
    if graph is None:
        raise RunError(
            f"{found.pathspec} has no lineage: it did not succeed (the graph is read"
            " from its end step) or predates lineage"
        )
    return graph


def run_graphs() -> Iterator[dict]:
    """The lineage graphs of every successful run, newest first."""
    from metaflow import Flow, namespace
    from metaflow.exception import MetaflowNotFound

    namespace(None)  # as `petseg runs`: runs of every user and production namespace
    try:
        runs = list(Flow(FLOW).runs())
    except MetaflowNotFound:
        return
    for run in runs:
        graph = _graph_of(run)
        if graph is not None:
            yield graph


def _graph_of(run) -> dict | None:
    """The lineage graph stored by a run's end step, or None."""
    if not run.successful:
        return None
    task = run["end"].task
    if task is None:
        return None
    graph = None
    for name in GRAPH_ARTIFACTS:
        if name in task and isinstance(task[name].data, dict):
            graph = dict(task[name].data)
            break
    if graph is None:
        return None
    if not graph.get("model_fingerprint") and "model_fingerprint" in task:
        graph["model_fingerprint"] = task["model_fingerprint"].data
    return graph
