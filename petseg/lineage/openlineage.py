"""OpenLineage events of a petseg run: built from explicit values, sent to a transport or kept as JSON lines.

Every step of a run is an OpenLineage *run* of the job ``<Flow>.<step>`` (a
task attempt: START, then COMPLETE or FAIL), whose ``parent`` facet names the
flow run (job ``<Flow>``, which gets a START from the start step and a
COMPLETE from the end step). Run ids are UUIDs derived from the Metaflow
pathspec, so the START and the end of one task, and every reference to the
flow run, agree without shared state. What a lineage tool receives:

- ``job.facets``: ``jobType`` (BATCH, METAFLOW, TASK or DAG) and
  ``sourceCodeLocation`` (git, the launching checkout's commit and branch);
- ``run.facets``: ``parent``, ``processing_engine`` (Metaflow and its
  version), ``errorMessage`` on FAIL, and petseg's ``metaflow`` facet (the
  pathspec, step, task, attempt, origin run of a resume) and ``petseg`` facet
  (the code record of `petseg.codeversion`, the determinism settings, the
  split rule, the data set and model fingerprints);
- ``inputs`` and ``outputs``: one dataset per shard, artifact or release file,
  named where it lives (namespace ``file`` and the path, or ``s3://bucket``
  and the key; artifacts by their task's path in the Metaflow datastore), each
  with a ``petseg_file`` facet: the file name, its sha256 and the stage that
  wrote it.

Custom facets follow the OpenLineage rule for them (``_producer``,
``_schemaURL``); their JSON schemas are `FACET_SCHEMAS`. `Delivery` sends
events through an ``openlineage-python`` client, or, when none is configured,
writes them as JSON lines beside the run's datastore (`events_location`),
where `read_events` finds them again.
"""

from __future__ import annotations

import datetime as dt
import json
import traceback
import uuid
from collections.abc import Iterable, Mapping
from urllib.parse import urlparse

import attr
from openlineage.client import event_v2, facet_v2
from openlineage.client.facet_v2 import (error_message_run, job_type_job, parent_run, processing_engine_run,
                                         source_code_location_job)
from openlineage.client.serde import Serde

from petseg import __version__
from petseg.errors import LineageError
from petseg.layout import Layout
from petseg.lineage.graph import artifact_of
from petseg.storage import Location, is_s3, split_s3

PRODUCER = f"urn:petseg:{__version__}"
"""Who produced the events and facets (a URN: petseg has no web address of its own)."""

_RUN_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:petseg:openlineage:run")


def _schema(name: str) -> str:
    return f"urn:petseg:openlineage:{name}:1"


@attr.define
class MetaflowRunFacet(facet_v2.RunFacet):
    """Where the run is in Metaflow: its pathspec, step, task and attempt, and the run it resumed."""

    pathspec: str
    flow: str
    run_id: str
    step: str | None = None
    task_id: str | None = None
    attempt: int | None = None
    origin_run_id: str | None = None

    @staticmethod
    def _get_schema() -> str:
        return _schema("MetaflowRunFacet")


@attr.define
class PetsegRunFacet(facet_v2.RunFacet):
    """What made the result: code, determinism settings, split rule and fingerprints."""

    code_version: str
    code: dict = attr.field(factory=dict)
    determinism: dict = attr.field(factory=dict)
    split_rule: str | None = None
    image_size: int | None = None
    stage: str | None = None
    dataset_fingerprint: str | None = None
    model_fingerprint: str | None = None

    @staticmethod
    def _get_schema() -> str:
        return _schema("PetsegRunFacet")


@attr.define
class PetsegFileDatasetFacet(facet_v2.DatasetFacet):
    """One file of a run: its name, content hash and the stage that wrote it."""

    file: str
    sha256: str
    kind: str
    stage: str | None = None
    size: int | None = None

    @staticmethod
    def _get_schema() -> str:
        return _schema("PetsegFileDatasetFacet")


def _object_schema(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": {"_producer": {"type": "string"}, "_schemaURL": {"type": "string"},
                                             **properties},
            "required": ["_producer", "_schemaURL", *required]}


_TEXT, _OPTIONAL_TEXT = {"type": "string"}, {"type": ["string", "null"]}
FACET_SCHEMAS: dict[str, dict] = {
    "MetaflowRunFacet": _object_schema(
        {"pathspec": _TEXT, "flow": _TEXT, "run_id": _TEXT, "step": _TEXT, "task_id": _TEXT,
         "attempt": {"type": "integer", "minimum": 0}, "origin_run_id": _TEXT},
        ["pathspec", "flow", "run_id"]),
    "PetsegRunFacet": _object_schema(
        {"code_version": _TEXT,
         "code": {"type": "object", "properties": {"commit": _OPTIONAL_TEXT, "dirty": {"type": ["boolean", "null"]},
                                                   "branch": _OPTIONAL_TEXT, "checkout": _OPTIONAL_TEXT,
                                                   "repository": _OPTIONAL_TEXT, "code_package": _OPTIONAL_TEXT}},
         "determinism": {"type": "object", "properties": {"seed": {"type": "integer"}, "strict": {"type": "boolean"},
                                                          "threads": {"type": "integer"},
                                                          "portable": {"type": "boolean"}},
                         "required": ["seed", "strict", "threads"]},
         "split_rule": _TEXT, "image_size": {"type": "integer"}, "stage": _TEXT,
         "dataset_fingerprint": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
         "model_fingerprint": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        ["code_version", "code", "determinism"]),
    "PetsegFileDatasetFacet": _object_schema(
        {"file": _TEXT, "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
         "kind": {"enum": ["shard", "artifact", "release", "source"]}, "stage": _TEXT,
         "size": {"type": "integer", "minimum": 0}},
        ["file", "sha256", "kind"]),
}
"""JSON schemas of petseg's custom facets, by facet class name (their ``_schemaURL`` names them)."""


# -- names ------------------------------------------------------------------------------------------------------


def run_uuid(key: str) -> str:
    """A stable OpenLineage run id for a Metaflow run or task attempt (``PetSegFlow/17``, ``.../start/1#0``)."""
    return str(uuid.uuid5(_RUN_NAMESPACE, key))


def location_name(uri: str) -> tuple[str, str]:
    """OpenLineage (namespace, name) of where a file lives: ``file`` and a path, ``s3://bucket`` and a key, ..."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"s3://{bucket}", key or "/"
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return f"{parsed.scheme}://{parsed.netloc}", parsed.path or "/"
    if parsed.scheme == "file":
        return "file", parsed.path
    if uri.startswith(("synth:", "tfds:")):
        kind, _, rest = uri.partition(":")
        return f"petseg-{kind}", rest
    return "file", uri


# -- datasets -------------------------------------------------------------------------------------------------


def task_datasets(graph: dict | None, *, pathspec: str, reads: Iterable[Mapping], writes: Iterable[Mapping],
                  datastore_root: str) -> tuple[list[dict], list[dict]]:
    """The inputs and outputs of one task, as plain dataset records.

    Args:
        graph: the run's lineage graph after the task (None before there is one).
        pathspec: the task (``PetSegFlow/17/evaluate/9``).
        reads: what the task read (`petseg.lineage.graph.task_files`): ``{"name",
            "sha256", "stage"?, "blob"?, "source"?, "location"?}``.
        writes: blobs and release files the task wrote: ``{"name", "sha256", "location", "kind"}``.
        datastore_root: the Metaflow datastore root (a directory or ``s3://`` prefix).

    Returns:
        (inputs, outputs): ``{"namespace", "name", "file", "sha256", "kind", "stage", "size"}`` each.
    """
    from petseg.lineage.graph import resolve_inputs

    graph = graph or {"stages": {}}
    stages = graph.get("stages", {})
    own = next((name for name, entry in stages.items() if entry.get("pathspec") == pathspec), None)
    inputs = []
    for item in resolve_inputs(graph, own or "", reads):
        origin = item.get("stage")
        if item.get("blob") or item.get("source"):
            where = _location_of(reads, item) or item["name"]
            kind = "shard" if item.get("blob") else "source"
        else:
            artifact = artifact_of(origin, item["name"])
            producer = stages.get(origin, {}).get("pathspec") if origin else None
            where = Layout(datastore_root).artifact(producer, artifact) if producer and artifact else \
                _location_of(reads, item) or item["name"]
            kind = "artifact"
        inputs.append(_dataset(where, item["name"], item["sha256"], kind, origin))
    outputs = []
    for stage, entry in stages.items():
        if entry.get("pathspec") != pathspec:
            continue
        for name, output in entry["outputs"].items():
            artifact = artifact_of(stage, name) or name
            where = Layout(datastore_root).artifact(pathspec, artifact)
            outputs.append(_dataset(where, name, output["sha256"], "artifact", stage, output.get("size")))
    for item in writes:
        kind = "shard" if item.get("blob") else item.get("kind", "release")
        outputs.append(_dataset(item["location"], item["name"], item["sha256"], kind, own))
    return inputs, outputs


def _location_of(reads: Iterable[Mapping], item: Mapping) -> str | None:
    return next((r.get("location") for r in reads if r["sha256"] == item["sha256"] and r["name"] == item["name"]
                 and r.get("location")), None)


def _dataset(where: str, file: str, sha256: str, kind: str, stage: str | None, size: int | None = None) -> dict:
    namespace, name = location_name(where)
    return {"namespace": namespace, "name": name, "file": file, "sha256": sha256, "kind": kind, "stage": stage,
            "size": size}


# -- events ---------------------------------------------------------------------------------------------------


def task_event(event_type: str, *, namespace: str, pathspec: str, attempt: int, origin_run_id: str | None,
               code: Mapping, code_version: str, determinism: Mapping, split_rule: str | None,
               image_size: int | None, stage: str | None = None, dataset_fingerprint: str | None = None,
               model_fingerprint: str | None = None, inputs: Iterable[Mapping] = (),
               outputs: Iterable[Mapping] = (), error: BaseException | None = None,
               engine_version: str | None = None, event_time: str | None = None) -> event_v2.RunEvent:
    """One event of a step's task attempt (``START``, ``COMPLETE`` or ``FAIL``).

    Args:
        event_type: ``START``, ``COMPLETE`` or ``FAIL``.
        namespace: the OpenLineage job namespace.
        pathspec: the task, ``Flow/run/step/task``.
        attempt: Metaflow's retry count of the task.
        origin_run_id: the run a resumed run resumed, or None.
        code: the run's code record; ``code_version`` its one-line form.
        determinism: ``{"seed", "strict", "threads"}``.
        split_rule, image_size: the run's split rule and image side.
        stage: the lineage stage the task recorded, if any.
        dataset_fingerprint, model_fingerprint: known so far, or None.
        inputs, outputs: dataset records (`task_datasets`).
        error: the exception of a FAIL.
        engine_version: Metaflow's version.
        event_time: ISO 8601 time (default now).
    """
    flow, run_id, step, task_id = pathspec.split("/")[:4]
    run_facets = {
        "parent": _parent(namespace, flow, run_id),
        "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
            version=engine_version or "unknown", name="Metaflow", openlineageAdapterVersion=__version__,
            producer=PRODUCER),
        "metaflow": MetaflowRunFacet(pathspec=pathspec, flow=flow, run_id=run_id, step=step, task_id=task_id,
                                     attempt=int(attempt), origin_run_id=origin_run_id, producer=PRODUCER),
        "petseg": _petseg_facet(code, code_version, determinism, split_rule, image_size, stage,
                                dataset_fingerprint, model_fingerprint),
    }
    if error is not None:
        run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=f"{type(error).__name__}: {error}", programmingLanguage="PYTHON",
            stackTrace="".join(traceback.format_exception(error)), producer=PRODUCER)
    return event_v2.RunEvent(
        eventType=event_v2.RunState[event_type], eventTime=event_time or _now(),
        run=event_v2.Run(runId=run_uuid(f"{pathspec}#{attempt}"), facets=run_facets),
        job=event_v2.Job(namespace=namespace, name=f"{flow}.{step}", facets=_job_facets(code, "TASK")),
        inputs=[event_v2.InputDataset(namespace=d["namespace"], name=d["name"], facets=_file_facet(d))
                for d in inputs],
        outputs=[event_v2.OutputDataset(namespace=d["namespace"], name=d["name"], facets=_file_facet(d))
                 for d in outputs],
        producer=PRODUCER,
    )


def flow_event(event_type: str, *, namespace: str, run_pathspec: str, code: Mapping, code_version: str,
               determinism: Mapping, split_rule: str | None, image_size: int | None,
               dataset_fingerprint: str | None = None, model_fingerprint: str | None = None,
               origin_run_id: str | None = None, engine_version: str | None = None,
               event_time: str | None = None) -> event_v2.RunEvent:
    """The flow run's own event (the parent of every task's run): START from start, COMPLETE from end."""
    flow, run_id = run_pathspec.split("/")[:2]
    run_facets = {
        "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
            version=engine_version or "unknown", name="Metaflow", openlineageAdapterVersion=__version__,
            producer=PRODUCER),
        "metaflow": MetaflowRunFacet(pathspec=f"{flow}/{run_id}", flow=flow, run_id=run_id,
                                     origin_run_id=origin_run_id, producer=PRODUCER),
        "petseg": _petseg_facet(code, code_version, determinism, split_rule, image_size, None,
                                dataset_fingerprint, model_fingerprint),
    }
    return event_v2.RunEvent(
        eventType=event_v2.RunState[event_type], eventTime=event_time or _now(),
        run=event_v2.Run(runId=run_uuid(f"{flow}/{run_id}"), facets=run_facets),
        job=event_v2.Job(namespace=namespace, name=flow, facets=_job_facets(code, "DAG")),
        producer=PRODUCER,
    )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _parent(namespace: str, flow: str, run_id: str) -> parent_run.ParentRunFacet:
    return parent_run.ParentRunFacet(run=parent_run.Run(runId=run_uuid(f"{flow}/{run_id}")),
                                     job=parent_run.Job(namespace=namespace, name=flow), producer=PRODUCER)


def _petseg_facet(code, code_version, determinism, split_rule, image_size, stage, dataset_fingerprint,
                  model_fingerprint) -> PetsegRunFacet:
    return PetsegRunFacet(code_version=code_version, code=dict(code), determinism=dict(determinism),
                          split_rule=split_rule, image_size=image_size, stage=stage,
                          dataset_fingerprint=dataset_fingerprint, model_fingerprint=model_fingerprint,
                          producer=PRODUCER)


def _job_facets(code: Mapping, job_type: str) -> dict:
    facets = {"jobType": job_type_job.JobTypeJobFacet(processingType="BATCH", integration="METAFLOW",
                                                      jobType=job_type, producer=PRODUCER)}
    if code.get("commit"):
        checkout = code.get("checkout") or ""
        facets["sourceCodeLocation"] = source_code_location_job.SourceCodeLocationJobFacet(
            type="git", url=code.get("repository") or f"file://{checkout}", repoUrl=code.get("repository") or checkout,
            path="flows", version=code["commit"], branch=code.get("branch"), producer=PRODUCER)
    return facets


def _file_facet(dataset: Mapping) -> dict:
    return {"petseg_file": PetsegFileDatasetFacet(file=dataset["file"], sha256=dataset["sha256"],
                                                  kind=dataset["kind"], stage=dataset.get("stage"),
                                                  size=dataset.get("size"), producer=PRODUCER)}


def to_json(event: event_v2.RunEvent) -> str:
    """The event as OpenLineage JSON (one line)."""
    return Serde.to_json(event)


# -- delivery -------------------------------------------------------------------------------------------------


def events_location(datastore_root: str, pathspec: str) -> str:
    """Where a run's events are kept as JSON lines when no transport is configured (`petseg.layout`)."""
    return Layout(datastore_root).openlineage(pathspec)


class Delivery:
    """Sends a task's events through an OpenLineage client, or keeps them as JSON lines beside the datastore.

    Args:
        client: an ``openlineage.client.OpenLineageClient`` (a configured transport), or None.
        location: where to keep JSON lines without a client (`events_location`).
        name: the file of this task attempt's events under ``location``.
        required: raise when an event cannot be delivered (True), or warn (False).
        s3_endpoint_url: endpoint of a non-AWS S3 server.
    """

    def __init__(self, *, client=None, location: str | None = None, name: str = "events.jsonl",
                 required: bool = True, s3_endpoint_url: str | None = None):
        self.client, self.location, self.name, self.required = client, location, name, required
        self.s3_endpoint_url = s3_endpoint_url
        self.kept: list[str] = []

    @property
    def where(self) -> str:
        """Where events go, for messages."""
        if self.client is not None:
            transport = self.client.transport
            return f"the OpenLineage {transport.kind} transport" + (
                f" at {transport.url}" if getattr(transport, "url", None) else "")
        return f"{self.location}/{self.name}"

    def send(self, event: event_v2.RunEvent) -> str | None:
        """Deliver one event; None when delivered, else why not (when not required).

        Raises:
            LineageError: the event could not be delivered and delivery is required.
        """
        try:
            if self.client is not None:
                self.client.emit(event)
            else:
                self.kept.append(to_json(event))
                Location(self.location, s3_endpoint_url=self.s3_endpoint_url, what="OpenLineage events").write_bytes(
                    self.name, ("\n".join(self.kept) + "\n").encode())
        except Exception as err:  # noqa: BLE001 - a transport raises anything from requests to boto
            message = (f"OpenLineage {event.eventType.value} event of {event.job.name} was not delivered to "
                       f"{self.where}: {type(err).__name__}: {err}")
            if self.required:
                raise LineageError(f"{message} (check the transport, or run with --lineage best-effort)") from None
            return message
        return None


def read_events(location: str, *, s3_endpoint_url: str | None = None) -> list[dict]:
    """Every event kept as JSON lines under ``location``, oldest first."""
    where = Location(location, s3_endpoint_url=s3_endpoint_url, what="OpenLineage events")
    events = []
    for name in where.names() if _exists(where) else []:
        if name.endswith(".jsonl"):
            events += [json.loads(line) for line in where.read_bytes(name).decode().splitlines() if line.strip()]
    return sorted(events, key=lambda event: event["eventTime"])


def _exists(location: Location) -> bool:
    from pathlib import Path

    return location.is_s3 or Path(location.root).is_dir()
