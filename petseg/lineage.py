"""Lineage graph: what each stage of a petseg run read and wrote, as a plain dict.

A run's lineage is a plain, JSON-able dict (the *graph*) that the flow keeps
as an artifact, with or without Pachyderm::

    {"format": 1, "flow": "PetSegFlow", "run_id": "17", "pathspec": "PetSegFlow/17",
     "code_version": "...", "dataset_fingerprint": "...", "model_fingerprint": "...",
     "pachyderm": {"address": "...", "project": "petseg", "commit_set": "..."} or None,
     "stages": {"transform": {"parents": ["warehouse"],
                              "pathspec": "PetSegFlow/17/transform/4",
                              "outputs": {"splits.json": {"sha256": "...", "size": 812}},
                              "pachyderm": {"mirrored": True, "repo": "transform",
                                            "commit": "...", ...} or None},
                ...}}

Stages and their parents are fixed (``STAGES``): warehouse; transform <-
warehouse; tune <- transform; model <- transform, tune; calibrate <- model,
transform; evaluate <- calibrate; release <- evaluate.

This module builds, joins, searches and prints graphs. The ``pachyderm``
entries are filled by ``petseg.pachyderm.mirror_stage``, which mirrors a
recorded stage into Pachyderm; nothing here talks to Pachyderm.
"""

from __future__ import annotations

import copy
import hashlib
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

from petseg.errors import ConfigError, LineageError

FORMAT = 1
STAGES: dict[str, tuple[str, ...]] = {
    "warehouse": (),
    "transform": ("warehouse",),
    "tune": ("transform",),
    "model": ("transform", "tune"),
    "calibrate": ("model", "transform"),
    "evaluate": ("calibrate",),
    "release": ("evaluate",),
}

FileSource = Union[str, Path, bytes]

_CHUNK = 1024 * 1024
_SHORT = 12


def new_graph(*, pathspec: str, code_version: str) -> dict:
    """Start the lineage graph of a run.

    Args:
        pathspec: the Metaflow run (``PetSegFlow/17``) or any of its tasks.
        code_version: version of the code that runs (package version, git commit).

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
        "dataset_fingerprint": None,
        "model_fingerprint": None,
        "pachyderm": None,
        "stages": {},
    }


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
        dataset_fingerprint: set it once known (warehouse stage).
        model_fingerprint: set it once known (model stage).

    Returns:
        A new graph including the stage.

    Raises:
        LineageError: a bad stage, pathspec or file.
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
    new["stages"][stage] = {
        "parents": list(STAGES[stage]),
        "pathspec": pathspec,
        "outputs": describe_files(files),
        "pachyderm": None,
    }
    return new


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
