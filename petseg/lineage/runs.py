"""Run look-ups: past runs of PetSegFlow and their artifacts, through the Metaflow Client.

What the run commands (`petseg runs`, `show`, `diff`, `reproduce`,
`tensorboard`, `lineage`, `verify`, `serve`, `stop`) read: a run by its name,
the facts of a run, the differences between two runs, a run's lineage graph,
its OpenLineage events kept beside its datastore, its artifacts and its
release. RUN is a run id, ``PetSegFlow/<id>`` or ``latest``. A run that is
unknown, of another flow or still running is a RunError, never a traceback.

A run's artifacts are Metaflow pickles (even its status is one: the Client
reads ``_success``): reading one runs whatever code its bytes name. Where a
run leads to its signed release (`release_location`, `runs_of_model`), it is
found from the run's metadata and tags alone, which are JSON, so that the
release's signature is checked before anything of the run is unpickled.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterator
from pathlib import Path

from petseg.errors import ConfigError, RunError

FLOW = "PetSegFlow"
FLOW_FILE = Path(__file__).resolve().parents[2] / "flows" / "seg_flow.py"
# Environment facts that change results; a difference is worth a warning.
ENVIRONMENT_KEYS_THAT_MATTER = ("packages", "tensorflow_build", "cpu", "devices", "settings", "python")
# Where a run's end step keeps its lineage graph (the flow's parameter ``lineage`` takes that name).
GRAPH_ARTIFACT = "lineage_graph"


def resolve_run(spec: str, *, finished: bool = True):
    """Return the Metaflow Run named by ``spec`` (id, ``PetSegFlow/<id>`` or ``latest``).

    Raises:
        RunError: the run does not exist, belongs to another flow, or is still running.
    """
    from metaflow import Flow, Run, namespace
    from metaflow.exception import MetaflowNamespaceMismatch, MetaflowNotFound

    namespace(None)  # runs of every user and production namespace
    try:
        if spec == "latest":
            run = Flow(FLOW).latest_run
            if run is None:
                raise RunError(f"no {FLOW} runs found: run `python flows/seg_flow.py run` first")
        else:
            flow, _, run_id = spec.rpartition("/")
            if flow and flow != FLOW:
                raise RunError(f"run {spec!r} belongs to flow {flow!r}: petseg inspects {FLOW} runs only")
            run = Run(f"{FLOW}/{run_id}")
    except (MetaflowNotFound, MetaflowNamespaceMismatch):
        raise RunError(f"run {spec!r} not found: expected a run id, {FLOW}/<id> or latest "
                       f"(see `petseg runs`)") from None
    if finished and _status(run) == "running":
        raise RunError(f"run {run.pathspec} is still running: wait for it to finish")
    return run


def _data(run, step: str, name: str, default=None):
    try:
        return getattr(run[step].task.data, name)
    except (KeyError, AttributeError):
        return default


def _status(run) -> str:
    """successful, failed (a task failed, so the run cannot finish) or running."""
    if run.successful:
        return "successful"
    if run.finished or any(task.finished and not task.successful for step in run for task in step):
        return "failed"
    return "running"


def _started(run):
    try:
        return run["start"].task.created_at
    except KeyError:
        return run.created_at


def started_at(pathspec: str) -> str | None:
    """When a run started (RFC 3339), or None when this machine's Metaflow does not know the run."""
    try:
        return _started(resolve_run(pathspec, finished=False)).isoformat()
    except RunError:
        return None


def _seconds(start, end) -> float | None:
    return round((end - start).total_seconds(), 1) if start and end else None


def _tag(run, key: str) -> str | None:
    for tag in run.tags:
        if tag.startswith(f"{key}:"):
            return tag.split(":", 1)[1]
    return None


def run_row(run) -> dict:
    """The facts `petseg runs` lists for one run."""
    summary = _data(run, "end", "summary", {}) if run.successful else {}
    started = _started(run)
    return {
        "id": run.id,
        "status": _status(run),
        "start": started.isoformat(sep=" ", timespec="seconds") if started else None,
        "duration_s": _seconds(started, run.finished_at),
        "dataset_fingerprint": summary.get("dataset_fingerprint") or _tag(run, "dataset"),
        "model_fingerprint": summary.get("model_fingerprint") or _tag(run, "model"),
        "test_pet_iou": summary.get("test_pet_iou"),
        "test_miou": summary.get("test_miou"),
        "best_baseline": summary.get("best_baseline"),
        "best_baseline_miou": summary.get("best_baseline_miou"),
        "release": _tag(run, "release"),
    }


def run_rows() -> list[dict]:
    """`run_row` of every run of the flow, newest first; empty before the first run."""
    from metaflow import Flow, namespace
    from metaflow.exception import MetaflowNotFound

    namespace(None)
    try:
        return [run_row(run) for run in Flow(FLOW).runs()]
    except MetaflowNotFound:
        return []


def describe(run) -> dict:
    """Everything `petseg show` prints about one run."""
    steps = {}
    for step in run:
        tasks = list(step)
        starts = [t.created_at for t in tasks if t.created_at]
        ends = [t.finished_at for t in tasks if t.finished_at]
        steps[step.id] = {"tasks": len(tasks), "duration_s": _seconds(min(starts, default=None),
                                                                      max(ends, default=None))}
    return {
        **run_row(run),
        "pathspec": run.pathspec,
        "tags": sorted(run.tags),
        "parameters": _data(run, "start", "parameters", {}),
        "code_version": (_data(run, "start", "settings", {}) or {}).get("code_version"),
        "environment": _data(run, "train", "environment", {}),
        "steps": dict(reversed(list(steps.items()))),
        "ingest_report": {k: v for k, v in (_data(run, "ingest", "ingest_report", {}) or {}).items()
                          if k != "shards"},
        "trials": _data(run, "tune", "trial_results"),
        "selected": _data(run, "tune", "best"),
        "metrics": _data(run, "evaluate", "metrics"),
        "calibration": {k: v for k, v in (_data(run, "calibrate", "calibration_report", {}) or {}).items()
                        if k.startswith("ece")},
        "release_decision": _data(run, "release", "gate_message"),
        "manifest": _data(run, "release", "manifest"),
        "deployment": _data(run, "release", "deployment"),
    }


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def differences(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """Keys (flattened with dots) whose values differ between two nested dicts."""
    fa, fb = _flatten(a), _flatten(b)
    return [(key, fa.get(key), fb.get(key)) for key in sorted(set(fa) | set(fb)) if fa.get(key) != fb.get(key)]


def diff_runs(run_a, run_b) -> dict:
    """What differs between two runs, by section."""
    da, db = describe(run_a), describe(run_b)
    sections = {
        "parameters": (da["parameters"], db["parameters"]),
        "data": ({"dataset_fingerprint": da["dataset_fingerprint"]}, {"dataset_fingerprint": db["dataset_fingerprint"]}),
        "fingerprints": ({"model": da["model_fingerprint"]}, {"model": db["model_fingerprint"]}),
        "environment": (da["environment"], db["environment"]),
        "metrics": (da["metrics"] or {}, db["metrics"] or {}),
        "champion": (_champion(da), _champion(db)),
    }
    return {name: differences(a, b) for name, (a, b) in sections.items()}


def _champion(described: dict) -> dict:
    """The champion a run was compared with, the mask it serves, and the release it replaced."""
    metrics = described["metrics"] or {}
    champion = metrics.get("champion") or {}
    return {"compared_with": champion.get("version"), "served_mask": (metrics.get("mask") or {}).get("source"),
            "replaced": ((described["manifest"] or {}).get("replaces") or {}).get("version")}


def flow_environment() -> dict:
    """This process's environment, plus a user name Metaflow accepts when it would find none (`default_user`)."""
    env = dict(os.environ)
    default_user(env)
    return env


def default_user(environ) -> None:
    """Give ``environ`` (``os.environ`` or a child's copy) a USERNAME Metaflow accepts, when it holds none.

    Metaflow records who ran a flow and refuses to start, or to open the Client's
    default namespace, as "root" or with no user name: it takes the first of
    METAFLOW_USER, SUDO_USER, USERNAME and USER that is set and is not "root".
    So a command typed in a root shell (a container, CI) would stop with
    "Metaflow could not determine your user name". The login name stands in,
    or "petseg" when that is root too; a user name already set is kept.
    """
    if any(environ.get(name) not in (None, "", "root") for name in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER")):
        return
    try:
        login = getpass.getuser()
    except (KeyError, OSError):  # no login variable and no passwd entry
        login = ""
    environ["USERNAME"] = login if login and login != "root" else "petseg"


def cpu_flag_changes(old: dict, new: dict) -> str | None:
    """A one-line account of CPU instruction-set flags present in one environment record only."""
    before = set((old.get("cpu") or {}).get("flags") or [])
    after = set((new.get("cpu") or {}).get("flags") or [])
    if before == after:
        return None
    if ((old.get("settings") or {}).get("portable")):
        return (f"CPU instruction sets differ ({' '.join(sorted(before ^ after))}); the run was portable, so its "
                "kernels are pinned to its baseline (AVX2 with FMA) and run the same code here, with the same "
                "software and threads; equal bits on another CPU model are not guaranteed (bench/device_check.sh)")
    return (f"CPU instruction sets differ (only in the original: {' '.join(sorted(before - after)) or '-'}; "
            f"only here: {' '.join(sorted(after - before)) or '-'}): bitwise equality is guaranteed only on "
            "the same CPU instruction set, software and thread count")


def reproduce(run, *, echo=print, show_output: bool = True) -> dict:
    """Re-run a past run's flow with the same parameters and compare fingerprints.

    Returns:
        {"identical": bool, "new_run": pathspec, "differences": [...], "environment": [...]}.
    """
    from metaflow import Runner

    params = dict(_data(run, "start", "parameters", {}) or {})
    if not params:
        raise RunError(f"run {run.pathspec} recorded no parameters: it cannot be reproduced")
    params["deploy"] = "none"  # reproducing a run checks it; it does not deploy it again
    params.setdefault("portable", False)  # recorded before the parameter existed: native strict mode
    echo(f"re-running {run.pathspec} with {params}")
    with Runner(str(FLOW_FILE), show_output=show_output, env=flow_environment()).run(**params) as result:
        if result.status != "successful":
            raise RunError(f"the re-run {result.run.pathspec} failed ({result.status}); "
                           f"see `python {FLOW_FILE} logs {result.run.id}`")
        new = result.run
    old_info, new_info = describe(run), describe(new)
    checks = [(key, old_info[key], new_info[key]) for key in ("dataset_fingerprint", "model_fingerprint")
              if old_info[key] != new_info[key]]
    old_env, new_env = old_info["environment"] or {}, new_info["environment"] or {}
    env = [row for row in differences({k: old_env.get(k) for k in ENVIRONMENT_KEYS_THAT_MATTER},
                                      {k: new_env.get(k) for k in ENVIRONMENT_KEYS_THAT_MATTER})
           if row[0] != "cpu.flags"]
    return {"identical": not checks, "new_run": new.pathspec, "differences": checks, "environment": env,
            "cpu_flags": cpu_flag_changes(old_env, new_env)}


def training_logs(run) -> bytes:
    """The TensorBoard logs of a run's train step, as a .tar.gz archive.

    Raises:
        RunError: the run's train step did not finish.
    """
    logs = _data(run, "train", "tensorboard_logs")
    if not logs:
        raise RunError(f"run {run.pathspec} has no training logs (its train step did not finish)")
    return logs


def release_artifact(spec: str, name: str) -> dict:
    """An artifact of a run's release step (``manifest`` or ``deployment``).

    Raises:
        RunError: no such run, or its model was not released (or not deployed).
    """
    run = resolve_run(spec)
    try:
        value = getattr(run["release"].task.data, name, None)
    except KeyError:
        value = None  # the run never reached its release step
    if not value:
        raise RunError(f"run {run.pathspec} has no {name}: its model was not released or not deployed")
    return value


def release_location(spec: str, *, s3_endpoint_url: str | None = None) -> tuple[str, object]:
    """Where a run's signed release is, found without reading any of the run's artifacts; and the run.

    The run's datastore root is in its tasks' metadata (``ds-root``; the release step's first, as a
    metadata service may not record it for a task that ``resume`` cloned), and a run's release is
    `petseg.layout.Layout.release` beside it: that is where the release step wrote it.

    Raises:
        RunError: no such run, one that recorded no datastore, or no release there.
    """
    from petseg import storage
    from petseg.layout import Layout

    run = resolve_run(spec, finished=False)  # its status is an artifact: not read here
    root = next(filter(None, (_datastore_root(run, step) for step in ("release", "end", "start"))), None)
    if not root:
        raise RunError(f"run {run.pathspec} recorded no datastore (it never ran a step), so it has no release")
    location = Layout(root).release(run.id)
    if not storage.Location(location, s3_endpoint_url=s3_endpoint_url, what="release").exists("manifest.json"):
        raise RunError(f"run {run.pathspec} has no signed release at {location}: its model was not released (see "
                       f"`petseg show {run.id}`), or the release was removed. Only a run's signed release is checked "
                       "before any of its artifacts, which are pickles, is read")
    return location, run


def _datastore_root(run, step: str) -> str | None:
    """The datastore root a step's task recorded in its metadata, or None (no such step, or none recorded)."""
    try:
        return run[step].task.metadata_dict.get("ds-root")
    except (KeyError, AttributeError):
        return None


def runs_of_model(prefix: str) -> list[str]:
    """The pathspecs of runs tagged ``model:<fingerprint>`` with a fingerprint starting with ``prefix``, newest
    first: found from the runs' tags (metadata), never from their artifacts.

    Raises:
        ConfigError: ``prefix`` has fewer than 8 characters.
    """
    from metaflow import Flow, namespace
    from metaflow.exception import MetaflowNotFound

    wanted = prefix.strip().lower()
    if len(wanted) < 8:
        raise ConfigError(f"model fingerprint {prefix!r} is too short: give at least 8 characters")
    namespace(None)
    try:
        found = list(Flow(FLOW).runs())
    except MetaflowNotFound:
        return []
    return [run.pathspec for run in found if (_tag(run, "model") or "").lower().startswith(wanted)]


def run_graph(run: str) -> dict:
    """The lineage graph of one run (see petseg.lineage.graph), read from its end step.

    Args:
        run: ``latest``, a run id, or ``PetSegFlow/<run id>``.

    Raises:
        RunError: no such run, a run of another flow, or one without lineage.
    """
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


def artifact_reader(run):
    """A function (step, artifact) -> the run's artifact value (None when the step or artifact is missing)."""
    def read(step: str, name: str):
        return _data(run, step, name)

    return read


def blob_root_of(run) -> str:
    """Where a run's shards live (its start step's ``blob_root``).

    Raises:
        RunError: the run recorded none.
    """
    root = _data(run, "start", "blob_root")
    if not root:
        raise RunError(f"run {run.pathspec} recorded no blob store (its start step did not finish)")
    return root


def openlineage_location(run) -> str:
    """Where a run's OpenLineage events are kept as JSON lines when no transport was configured: beside its
    blob store (`petseg.layout`)."""
    from petseg.layout import Layout

    return Layout.of_blobs(blob_root_of(run)).openlineage(run.pathspec)


def graph_of_pathspec(pathspec: str) -> dict | None:
    """The lineage graph of a finished run, or None when this machine's Metaflow does not know the run."""
    try:
        return _graph_of(resolve_run(pathspec))
    except RunError:
        return None


def _graph_of(run) -> dict | None:
    """The lineage graph stored by a run's end step, with its model fingerprint, or None."""
    if not run.successful:
        return None
    task = run["end"].task
    if task is None:
        return None
    if GRAPH_ARTIFACT not in task or not isinstance(task[GRAPH_ARTIFACT].data, dict):
        return None
    graph = dict(task[GRAPH_ARTIFACT].data)
    if not graph.get("model_fingerprint") and "model_fingerprint" in task:
        graph["model_fingerprint"] = task["model_fingerprint"].data
    return graph
