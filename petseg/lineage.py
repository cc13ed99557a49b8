"""Lineage graph: what each stage of a petseg run read and wrote, as a plain dict.

A run's lineage is a plain, JSON-able dict (the *graph*) that the flow keeps
as an artifact, with or without Pachyderm::

    {"format": 2, "flow": "PetSegFlow", "run_id": "17", "pathspec": "PetSegFlow/17",
     "code_version": "c8ba2d8...-dirty", "code": {"commit", "dirty", ...} (petseg.codeversion),
     "dataset_fingerprint": "...", "model_fingerprint": "...",
     "pachyderm": {"address": "...", "project": "petseg", "commit_set": "..."} or None,
     "stages": {"evaluate": {"parents": ["calibrate", "model", "transform", "tune"],
                             "pathspec": "PetSegFlow/17/evaluate/9",
                             "inputs": [{"name": "model.keras", "sha256": "...", "stage": "model"},
                                        {"name": "test-00000.tfrecord", "sha256": "...",
                                         "stage": "transform", "blob": True}, ...],
                             "outputs": {"metrics.json": {"sha256": "...", "size": 812}},
                             "blobs": [],
                             "code_package": "..." or None,
                             "pachyderm": {"mirrored": True, "repo": "evaluate",
                                           "commit": "...", ...} or None},
                ...}}

A stage's ``inputs`` are what its step opened (the step glue notes every blob
it fetches and every artifact it is handed, by content hash; see
``petseg.stages``), and its ``parents`` are derived from them: the stages
whose outputs (``outputs``, or the shards in ``blobs``) have those hashes.
``STAGES`` declares, per stage, the parents it may have: the Pachyderm mirror
wires branch provenance from it before the first commit of a run, so a stage
that reads from an undeclared stage is a LineageError, not a silent gap.
``OUTPUTS`` names the artifact each output file is made from (`as_file`),
which is how ``petseg verify`` re-derives every output's bytes.

This module builds, joins, searches and prints graphs. The ``pachyderm``
entries are filled by ``petseg.pachyderm.mirror_stage``, which mirrors a
recorded stage into Pachyderm; nothing here talks to Pachyderm.
"""

from __future__ import annotations

import copy
import hashlib
import json
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

from petseg.errors import ConfigError, LineageError

FORMAT = 2
STAGES: dict[str, tuple[str, ...]] = {
    "warehouse": (),
    "transform": ("warehouse",),
    "tune": ("transform",),
    "model": ("transform", "tune"),
    "calibrate": ("model", "transform"),
    "evaluate": ("calibrate", "model", "transform", "tune"),
    "release": ("calibrate", "evaluate", "model"),
}
"""Each stage and the stages it may read from, in flow order (see the module docstring)."""

OUTPUTS: dict[str, dict[str, tuple[str, str]]] = {
    "warehouse": {"ingest_report.json": ("ingest", "ingest_report")},
    "transform": {"splits.json": ("transform", "splits")},
    "tune": {"trials.json": ("select", "trial_results"), "selected.json": ("select", "best")},
    "model": {"model.keras": ("train", "model_keras"), "fingerprint.txt": ("train", "model_fingerprint"),
              "history.json": ("train", "history")},
    "calibrate": {"calibration.json": ("calibrate", "calibration"), "report.json": ("calibrate", "calibration_report")},
    "evaluate": {"metrics.json": ("evaluate", "metrics")},
    "release": {"manifest.json": ("release", "manifest"), "decision.txt": ("release", "gate_message")},
}
"""Each stage's output files and the (step, artifact) each is made from with `as_file`."""

FileSource = Union[str, Path, bytes]

_CHUNK = 1024 * 1024
_SHORT = 12


def new_graph(*, pathspec: str, code: Mapping | None = None, code_version: str | None = None) -> dict:
    """Start the lineage graph of a run.

    Args:
        pathspec: the Metaflow run (``PetSegFlow/17``) or any of its tasks.
        code: the run's code record (``petseg.codeversion.record``).
        code_version: its one-line form (``petseg.codeversion.describe``).

    Returns:
        A graph with no stages yet.
    """
    flow, run_id = _run_of(pathspec)
    return {
        "format": FORMAT,
        "flow": flow,
        "run_id": run_id,
        "pathspec": f"{flow}/{run_id}",
        "code_version": code_version,
        "code": dict(code) if code else None,
        "dataset_fingerprint": None,
        "model_fingerprint": None,
        "pachyderm": None,
        "stages": {},
    }


def as_file(value: Any) -> bytes:
    """The bytes an artifact is recorded as: bytes as they are, text as UTF-8, anything else as sorted JSON."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode()


def sha256(data: bytes) -> str:
    """The hex sha256 of some bytes."""
    return hashlib.sha256(data).hexdigest()


def describe_files(files: Mapping[str, FileSource]) -> dict[str, dict]:
    """Content hash and size of each output file.

    Args:
        files: path in the stage's repo (``shards/train-00000.tfrecord``) ->
            local file path, or the content as bytes.

    Returns:
        ``{path: {"sha256": hex, "size": bytes}}`` with paths sorted.

    Raises:
        LineageError: a path is not a plain relative path, or a file is missing.
    """
    described = {}
    for name, source in files.items():
        digest, size = hashlib.sha256(), 0
        for chunk in file_chunks(source, name):
            digest.update(chunk)
            size += len(chunk)
        described[output_path(name)] = {"sha256": digest.hexdigest(), "size": size}
    return dict(sorted(described.items()))


def record_stage(
    graph: dict,
    stage: str,
    *,
    files: Mapping[str, FileSource],
    pathspec: str,
    inputs: Iterable[Mapping] = (),
    blobs: Iterable[Mapping] = (),
    code_package: str | None = None,
    dataset_fingerprint: str | None = None,
    model_fingerprint: str | None = None,
) -> dict:
    """Add one stage to the graph (not yet mirrored: its ``pachyderm`` entry is None).

    A flow step calls it after writing its outputs, then hands the result to
    ``petseg.pachyderm.mirror_stage`` when a Pachyderm mirror is configured.

    Args:
        graph: the run's graph so far (not modified).
        stage: one of ``STAGES``.
        files: the stage's outputs: path in repo -> local file or bytes.
        pathspec: the Metaflow task doing the stage (``current.pathspec``).
        inputs: what the stage opened: ``{"name", "sha256"}`` each, with
            ``"blob": True`` for a shard fetched from the blob store and
            ``"source": True`` for data from outside the run.
        blobs: the shards the stage wrote to the blob store, ``{"name", "sha256"}`` each.
        code_package: the code package the stage's task ran (None when local).
        dataset_fingerprint: set it once known (warehouse stage).
        model_fingerprint: set it once known (model stage).

    Returns:
        A new graph including the stage, its inputs resolved to the stages
        that wrote them and its parents derived from those.

    Raises:
        LineageError: a bad stage, pathspec or file, or an input from a stage
            that ``STAGES`` does not declare as a parent of this one.
    """
    check_stage(stage)
    flow, run_id = _run_of(pathspec)
    new = copy.deepcopy(graph)
    # After a resume the graph comes from the origin run; it now belongs here.
    new.update(flow=flow, run_id=run_id, pathspec=f"{flow}/{run_id}")
    if dataset_fingerprint is not None:
        new["dataset_fingerprint"] = dataset_fingerprint
    if model_fingerprint is not None:
        new["model_fingerprint"] = model_fingerprint
    resolved = resolve_inputs(new, stage, inputs)
    parents = sorted({item["stage"] for item in resolved if item.get("stage")})
    undeclared = [parent for parent in parents if parent not in STAGES[stage]]
    if undeclared:
        names = sorted({item["name"] for item in resolved if item.get("stage") in undeclared})
        raise LineageError(
            f"stage {stage} read {', '.join(names)} from stage(s) {', '.join(undeclared)}, which "
            f"petseg.lineage.STAGES does not list as its parents ({', '.join(STAGES[stage]) or 'none'}); "
            "declare them there, so that the Pachyderm mirror wires that provenance"
        )
    new["stages"][stage] = {
        "parents": parents,
        "pathspec": pathspec,
        "inputs": resolved,
        "outputs": describe_files(files),
        "blobs": [{"name": blob["name"], "sha256": blob["sha256"]} for blob in blobs],
        "code_package": code_package,
        "pachyderm": None,
    }
    return new


def resolve_inputs(graph: dict, stage: str, inputs: Iterable[Mapping]) -> list[dict]:
    """Each input, once, with the stage that wrote it (``"stage"``, None for data from outside the run).

    An input is matched by content hash against the outputs (``outputs``, or
    the shards in ``blobs``) of the stages recorded so far, other than ``stage``.
    """
    writers: dict[tuple[bool, str], set[str]] = {}
    for name, entry in graph["stages"].items():
        if name == stage:
            continue
        for output in entry.get("outputs", {}).values():
            writers.setdefault((False, output["sha256"]), set()).add(name)
        for blob in entry.get("blobs", []):
            writers.setdefault((True, blob["sha256"]), set()).add(name)
    resolved, seen = [], set()
    for item in inputs:
        blob = bool(item.get("blob"))
        key = (blob, item["sha256"], item["name"])
        if key in seen:
            continue
        seen.add(key)
        found = sorted(writers.get((blob, item["sha256"]), ()))
        entry = {"name": item["name"], "sha256": item["sha256"], "stage": found[0] if found else None}
        if blob:
            entry["blob"] = True
        if item.get("source"):
            entry["source"] = True
        resolved.append(entry)
    return sorted(resolved, key=lambda e: (e["stage"] or "", bool(e.get("blob")), e["name"], e["sha256"]))


class TaskLog:
    """What one task opened (``reads``, the ``inputs`` of `record_stage`) and wrote (``writes``: blobs and
    release files, with where they live)."""

    def __init__(self):
        self.reads: list[dict] = []
        self.writes: list[dict] = []

    def clear(self) -> None:
        """Forget everything (a new task)."""
        self.reads.clear()
        self.writes.clear()

    def snapshot(self) -> dict[str, list[dict]]:
        """A copy of ``reads`` and ``writes``."""
        return {"reads": [dict(r) for r in self.reads], "writes": [dict(w) for w in self.writes]}

    def artifacts(self, **values: Any) -> None:
        """Note artifacts handed to the task, by the stage output they are (``model.keras``)."""
        self.reads.extend({"name": name, "sha256": sha256(as_file(value))} for name, value in values.items())

    def blobs(self, records: Iterable[Mapping], *, url, written: bool = False) -> None:
        """Note shards fetched from (or, ``written``, put into) a blob store; ``url(key)`` says where each lives."""
        noted = [{"name": r["name"], "sha256": r["sha256"], "blob": True, "location": url(r["sha256"])}
                 for r in records]
        (self.writes if written else self.reads).extend(noted)


def merge(graphs: Iterable[dict]) -> dict:
    """Join the graphs of parallel branches (a Metaflow join step).

    Args:
        graphs: graphs of the same run, e.g. ``[i.lineage for i in inputs]``.

    Returns:
        One graph holding every stage of any input.

    Raises:
        LineageError: the inputs disagree about a stage or a fingerprint.
    """
    graphs = list(graphs)
    if not graphs:
        raise LineageError("nothing to merge: no lineage graphs were given")
    merged = copy.deepcopy(graphs[0])
    for other in graphs[1:]:
        for key in ("dataset_fingerprint", "model_fingerprint", "pachyderm"):
            if other.get(key) is not None:
                if merged.get(key) not in (None, other[key]):
                    raise LineageError(f"cannot merge lineage: the branches disagree on {key}")
                merged[key] = copy.deepcopy(other[key])
        for stage, entry in other["stages"].items():
            if stage in merged["stages"] and merged["stages"][stage] != entry:
                raise LineageError(
                    f"cannot merge lineage: the branches recorded stage {stage} differently"
                )
            merged["stages"][stage] = copy.deepcopy(entry)
    return merged


def find_runs_by_model(fingerprint: str, graphs: Iterable[dict]) -> list[dict]:
    """The graphs of the runs that produced a model.

    Args:
        fingerprint: a model fingerprint, or a prefix of at least 8 characters.
        graphs: lineage graphs of runs.

    Returns:
        The matching graphs, in the order given.
    """
    wanted = fingerprint.strip().lower()
    if len(wanted) < 8:
        raise ConfigError(
            f"model fingerprint {fingerprint!r} is too short: give at least 8 characters"
        )
    return [g for g in graphs if (g.get("model_fingerprint") or "").lower().startswith(wanted)]


def format_graph(graph: dict) -> str:
    """A readable view of a graph: stages, parents, outputs, Pachyderm commits."""
    lines = [graph["pathspec"]]
    for key in ("code_version", "dataset_fingerprint", "model_fingerprint"):
        value = graph.get(key)
        label = key.replace("_fingerprint", "").replace("_", " ")
        lines.append(f"  {label}: {_short(value) if 'fingerprint' in key else value or '-'}")
    package = (graph.get("code") or {}).get("code_package")
    if package:
        lines.append(f"  code package: {package}")
    mirror = graph.get("pachyderm")
    if mirror:
        lines.append(
            f"  pachyderm: project {mirror['project']} at {mirror['address']},"
            f" commit set {mirror['commit_set']}"
        )
    for stage in STAGES:
        entry = graph["stages"].get(stage)
        if entry is None:
            continue
        parents = ", ".join(entry["parents"]) or "(input)"
        lines.append("")
        lines.append(f"{stage} <- {parents}    {_where(entry.get('pachyderm'))}")
        lines.append(f"  task {entry['pathspec']}")
        for item in _summarise_inputs(entry.get("inputs", [])):
            lines.append(f"  read {item}")
        for name, output in entry["outputs"].items():
            lines.append(f"  {name:<40} {_size(output['size']):>10}  {output['sha256'][:_SHORT]}")
    return "\n".join(lines)


def check_stage(stage: str) -> None:
    """Raise LineageError unless ``stage`` is one of ``STAGES``."""
    if stage not in STAGES:
        raise LineageError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")


def output_path(name: str) -> str:
    """An output's path in its stage's repo, normalised; LineageError if it leaves the repo."""
    path = posixpath.normpath(str(name).strip("/"))
    if path in ("", ".") or path.startswith("..") or "\\" in path:
        raise LineageError(
            f"bad output path {name!r}: give a relative path inside the stage's repo"
        )
    return path


def file_chunks(source: FileSource, name: str) -> Iterator[bytes]:
    """The bytes of an output (a local file or bytes) in chunks of 1 MiB.

    Raises:
        LineageError: the local file cannot be read.
    """
    if isinstance(source, (bytes, bytearray)):
        for start in range(0, len(source), _CHUNK):
            yield bytes(source[start:start + _CHUNK])
        return
    try:
        with open(source, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                yield chunk
    except OSError as exc:
        raise LineageError(f"cannot read output {name!r} from {source}: {exc.strerror}") from None


# -- small helpers -------------------------------------------------------------


def _run_of(pathspec: str) -> tuple[str, str]:
    parts = (pathspec or "").strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise LineageError(
            f"bad Metaflow pathspec {pathspec!r}: expected Flow/run_id[/step/task]"
        )
    return parts[0], parts[1]


def _summarise_inputs(inputs: list[dict]) -> list[str]:
    """One line per input file, and one per stage for its shards."""
    lines, shards = [], {}
    for item in inputs:
        origin = item.get("stage") or ("source" if item.get("source") else "outside the run")
        if item.get("blob"):
            shards.setdefault(origin, []).append(item)
        else:
            lines.append(f"{item['name']} ({origin}, {item['sha256'][:_SHORT]})")
    for origin, items in shards.items():
        lines.append(f"{len(items)} shard{'s' if len(items) != 1 else ''} ({origin})")
    return lines


def _short(value: Any) -> str:
    return str(value)[:_SHORT] if value else "-"


def _size(size: float) -> str:
    if size < 1024:
        return f"{size} B"
    for unit in ("KiB", "MiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GiB"


def _where(record: dict | None) -> str:
    if not record:
        return "(not mirrored)"
    if not record.get("mirrored"):
        return f"(not mirrored: {record.get('error', 'unknown error')})"
    return f"{record['project']}/{record['repo']}@{record['commit']}"
