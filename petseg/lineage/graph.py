"""Lineage graph: what each stage of a petseg run read and wrote, as a plain dict.

A run's lineage is a plain, JSON-able dict (the *graph*) that the flow keeps
as an artifact, with or without Pachyderm::

    {"format": 3, "flow": "PetSegFlow", "run_id": "17", "pathspec": "PetSegFlow/17",
     "code_version": "c8ba2d8...-dirty", "code": {"commit", "dirty", ...} (petseg.codeversion),
     "dataset_fingerprint": "...", "model_fingerprint": "...",
     "pachyderm": {"address": "...", "project": "petseg", "commit_set": "..."} or None,
     "stages": {"evaluate": {"parents": ["calibrate", "train", "transform", "tune"],
                             "pathspec": "PetSegFlow/17/evaluate/9",
                             "inputs": [{"name": "model.keras", "sha256": "...", "stage": "train"},
                                        {"name": "test-00000.tfrecord", "sha256": "...",
                                         "stage": "transform", "blob": True}, ...],
                             "outputs": {"metrics.json": {"sha256": "...", "size": 812}},
                             "blobs": [],
                             "code_package": "..." or None,
                             "pachyderm": {"mirrored": True, "repo": "evaluate",
                                           "commit": "...", ...} or None},
                ...}}

``STAGES`` declares each stage (`Stage`): the parents it may have (the
Pachyderm mirror wires branch provenance from them before the first commit of
a run, so a stage that reads from an undeclared stage is a LineageError, not a
silent gap), the artifact each output file is made from (`as_file`; which is
how ``petseg verify`` re-derives every output's bytes), and what its step
reads. A stage's ``inputs`` follow from that declaration and the step's
artifacts (`task_files`): the earlier stages' files it reads and the shards it
opens, by content hash. Its ``parents`` are derived from them: the stages
whose outputs (``outputs``, or the shards in ``blobs``) have those hashes.

This module builds, joins, searches and prints graphs. The ``pachyderm``
entries are filled by ``petseg.lineage.pachyderm.mirror_stage``, which mirrors a
recorded stage into Pachyderm; nothing here talks to Pachyderm.
"""

from __future__ import annotations

import copy
import hashlib
import json
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

from petseg.errors import ConfigError, LineageError

FORMAT = 3
"""Format 3 names every stage after its step (ingest, train, ...); format 2 had warehouse and model."""


@dataclass(frozen=True)
class Stage:
    """What one stage of the flow reads and writes; its step, Pachyderm repo and OpenLineage job share its name.

    Attributes:
        parents: the stages it may read from (the Pachyderm mirror wires branch provenance from them).
        outputs: each output file and the artifact of the step it is made from (`as_file`).
        reads: the output files of earlier stages the step opens, through their artifacts.
        shards: the blob-store shards the step opens: ``ingest`` (the ingest report's) or split names (the
            transform's ``splits``).
    """

    parents: tuple[str, ...]
    outputs: Mapping[str, str]
    reads: tuple[str, ...] = ()
    shards: tuple[str, ...] = ()


STAGES: dict[str, Stage] = {
    "ingest": Stage((), {"ingest_report.json": "ingest_report"}),
    "transform": Stage(("ingest",), {"splits.json": "splits"}, reads=("ingest_report.json",), shards=("ingest",)),
    "tune": Stage(("transform",), {"trials.json": "trial_results", "selected.json": "best"},
                  reads=("splits.json",), shards=("training", "validation")),
    "train": Stage(("transform", "tune"), {"model.keras": "model_keras", "fingerprint.txt": "model_fingerprint",
                                           "history.json": "history"},
                   reads=("selected.json", "splits.json"), shards=("training", "validation")),
    "calibrate": Stage(("train", "transform"), {"calibration.json": "calibration", "report.json": "calibration_report"},
                       reads=("model.keras", "splits.json"), shards=("calibration",)),
    "evaluate": Stage(("calibrate", "train", "transform", "tune"), {"metrics.json": "metrics"},
                      reads=("model.keras", "calibration.json", "splits.json", "history.json", "trials.json",
                             "report.json"), shards=("training", "validation", "test")),
    "release": Stage(("calibrate", "evaluate", "train"), {"manifest.json": "manifest", "decision.txt": "gate_message"},
                     reads=("model.keras", "calibration.json", "metrics.json")),
}
"""Every stage in flow order (see the module docstring). The tune stage's trials run in parallel ``trial``
tasks; its ``tune`` step joins them and records the stage for them."""


def artifact_of(stage: str | None, name: str) -> str | None:
    """The artifact a stage's output file is made from, or None when the stage has no such output."""
    entry = STAGES.get(stage or "")
    return entry.outputs.get(name) if entry else None


def producer_of(name: str) -> str:
    """The stage whose output file ``name`` is."""
    return next(stage for stage, entry in STAGES.items() if name in entry.outputs)


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
    ``petseg.lineage.pachyderm.mirror_stage`` when a Pachyderm mirror is configured.

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
        dataset_fingerprint: set it once known (ingest stage).
        model_fingerprint: set it once known (train stage).

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
    undeclared = [parent for parent in parents if parent not in STAGES[stage].parents]
    if undeclared:
        names = sorted({item["name"] for item in resolved if item.get("stage") in undeclared})
        raise LineageError(
            f"stage {stage} read {', '.join(names)} from stage(s) {', '.join(undeclared)}, which "
            f"petseg.lineage.graph.STAGES does not list as its parents ({', '.join(STAGES[stage].parents) or 'none'}); "
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


def task_files(stage: str, artifact: Callable[[str], Any], *,
               blob_url: Callable[[str], str]) -> tuple[list[dict], list[dict]]:
    """What a stage's step read and wrote, from the stage's declaration (`Stage`) and the artifacts it names.

    Args:
        stage: one of ``STAGES``.
        artifact: the value of an artifact by name, as the step sees it.
        blob_url: where a shard of the blob store lives, by its sha256.

    Returns:
        (reads, writes): the ``inputs`` of `record_stage` (earlier stages' output files, the shards opened,
        and for the first stage the source it read, whose hash is the data set fingerprint), and the shards
        the stage wrote (``{"name", "sha256", "blob": True, "location"}`` each).
    """
    entry = STAGES[stage]
    reads = [{"name": name, "sha256": sha256(as_file(artifact(artifact_of(producer_of(name), name))))}
             for name in entry.reads]
    for split in entry.shards:
        records = (artifact(STAGES["ingest"].outputs["ingest_report.json"])["shards"] if split == "ingest"
                   else artifact(STAGES["transform"].outputs["splits.json"])["splits"][split])
        reads += [_blob(record, blob_url) for record in records]
    outputs = [artifact(name) for name in entry.outputs.values()]
    if not entry.parents:  # data from outside the run: the report names it, the fingerprint hashes it
        report = outputs[0]
        reads += [{"name": name, "sha256": report["fingerprint"], "source": True, "location": name}
                  for name in (report.get("source"), report.get("feedback")) if name]
    writes = [_blob(record, blob_url) for value in outputs for record in _shards_of(value)]
    return reads, writes


def _shards_of(value: Any) -> list[dict]:
    """The shard records an output lists: an ingest report's ``shards``, or every split's of ``splits``."""
    if not isinstance(value, Mapping):
        return []
    if isinstance(value.get("splits"), Mapping):
        return [record for records in value["splits"].values() for record in records]
    return list(value.get("shards") or [])


def _blob(record: Mapping, blob_url: Callable[[str], str]) -> dict:
    return {"name": record["name"], "sha256": record["sha256"], "blob": True, "location": blob_url(record["sha256"])}


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
