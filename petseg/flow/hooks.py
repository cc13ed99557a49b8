"""The Metaflow decorators petseg puts around the flow's steps: lineage, OpenLineage events and run tags.

Step glue, beside `petseg.flow.stages` (which reads Metaflow's settings and the
environment for both):

- `records` (on the flow class) wraps every step in `StepRecords`. When a
  step ends, its stage (`petseg.lineage.graph.STAGES` declares what each reads and
  writes) is recorded in the run's lineage graph from that declaration and the
  step's artifacts, and mirrored into Pachyderm; the run is tagged with what
  the step earned (``dataset:``, ``model:``, ``release:``); and OpenLineage
  events go out (`petseg.lineage.openlineage`: a START, then a COMPLETE or FAIL
  with the task's inputs and outputs, the code record, the determinism
  settings and the split rule). ``--lineage required`` fails the step when
  its lineage cannot be mirrored or an event cannot be delivered;
  ``best-effort`` warns.
- `tag_when_finished` (on the end step) tags the run ``dataset:``, ``model:``
  and ``release:`` from its artifacts when the run finishes, on the machine
  that launched it. A step in a pod with local metadata cannot see its run
  (`tag_run` there only says so); the launcher, where Metaflow syncs every
  task's metadata, can. It uses a step decorator's runtime hooks
  (``runtime_init``, ``runtime_finished``), which Metaflow calls in the
  launching process for a local or ``--with kubernetes`` run; on a scheduler
  (Argo Workflows) there is no such process, and there the metadata service
  lets `tag_run` tag from the steps themselves.
- `release_privileges` (on the release step) hands the release signing key and
  the right to deploy to that step's pod alone when the run goes to Kubernetes:
  the Secret ``$PETSEG_SIGNING_SECRET`` (default ``petseg-signing``, holding
  ``PETSEG_SIGNING_KEY``) joins the step's ``@kubernetes`` secrets, and the pod
  runs as the service account ``$PETSEG_RELEASE_SERVICE_ACCOUNT`` (default
  ``petseg-release``) instead of the other steps' (k8s/base/rbac.yaml).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import sys
import warnings
from pathlib import Path

from metaflow import FlowMutator, StepMutator, UserStepDecorator, current
from metaflow.decorators import StepDecorator, _base_step_decorator

from petseg import codeversion
from petseg.errors import LineageError
from petseg.flow import stages
from petseg.lineage import graph as lineage
from petseg.lineage import openlineage
from petseg.release import bundle

# -- tags -----------------------------------------------------------------------------------------------------


def tag_run(**tags: str) -> None:
    """Tag the current run (e.g. dataset:<fingerprint>) so the Client can find it while it runs.

    A step in a pod with local metadata cannot see its run (the launcher syncs
    the metadata afterwards); there `tag_when_finished` tags the run when it finishes.
    """
    from metaflow import Run
    from metaflow.exception import MetaflowNotFound

    pathspec = f"{current.flow_name}/{current.run_id}"
    try:
        Run(pathspec).add_tags([f"{key}:{value}" for key, value in tags.items()])
    except MetaflowNotFound:
        print(f"note: the launcher tags {pathspec} with {', '.join(sorted(tags))} when the run finishes "
              "(this task's metadata cannot see the run)")


EARNED_TAGS = (("dataset", "ingest", "dataset_fingerprint"), ("model", "train", "model_fingerprint"),
               ("release", "release", "released"))
"""The run tags a step earns: (tag, step, the artifact whose value it is)."""


def _tag_value(key: str, value) -> str:
    return ("accepted" if value else "rejected") if key == "release" else str(value)


def tag_earned(flow, step_name: str) -> None:
    """Tag the run with what this step has earned (`EARNED_TAGS`)."""
    tags = {key: _tag_value(key, getattr(flow, artifact)) for key, step, artifact in EARNED_TAGS if step == step_name}
    if tags:
        tag_run(**tags)


def run_tags(run) -> dict[str, str]:
    """The tags of `EARNED_TAGS` a run has earned, from its artifacts (a Client Run)."""
    found = {}
    for key, step, artifact in EARNED_TAGS:
        try:
            task = run[step].task
        except KeyError:  # the step never ran
            continue
        if task is None or not task.successful or artifact not in task:
            continue
        found[key] = _tag_value(key, task[artifact].data)
    return found


def tag_finished_run(pathspec: str) -> list[str]:
    """Tag a finished run from its artifacts; returns the tags it now carries of those."""
    from metaflow import Run

    run = Run(pathspec, _namespace_check=False)
    tags = [f"{key}:{value}" for key, value in run_tags(run).items()]
    if tags:
        run.add_tags(tags)
    return tags


class LauncherTags(StepDecorator):
    """Tags the run from its artifacts when it finishes, in the launching process (see the module docstring)."""

    name = "petseg_launcher_tags"
    defaults = {}

    def runtime_init(self, flow, graph, package, run_id):
        self._pathspec = f"{flow.name}/{run_id}"

    def runtime_finished(self, exception):
        pathspec = getattr(self, "_pathspec", None)
        if pathspec is None:
            return
        try:
            tags = tag_finished_run(pathspec)
        except Exception as err:  # noqa: BLE001 - tagging must never hide how the run ended
            print(f"petseg: could not tag {pathspec}: {type(err).__name__}: {err}", file=sys.stderr)
            return
        if tags:
            print(f"petseg: tagged {pathspec} with {', '.join(tags)}", file=sys.stderr)


tag_when_finished = functools.partial(_base_step_decorator, LauncherTags)
"""``@tag_when_finished`` on a step: tag the run from its artifacts when it finishes (`LauncherTags`)."""


# -- OpenLineage ---------------------------------------------------------------------------------------------


def openlineage_delivery(*, root: str, pathspec: str, attempt: int, mode: str) -> openlineage.Delivery | None:
    """How this task's OpenLineage events travel: the transport configured the standard way
    (``OPENLINEAGE_CONFIG``, ``openlineage.yml``, ``OPENLINEAGE_URL``, ``OPENLINEAGE__TRANSPORT__*``), or,
    with none, JSON lines beside the run's datastore (`petseg.lineage.openlineage.events_location`).
    None when ``OPENLINEAGE_DISABLED`` is true."""
    if os.environ.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return None
    required = mode == "required"
    _flow, _run, step, task = pathspec.split("/")[:4]
    name = f"{step}.{task}.{attempt}.jsonl"
    configured = (os.environ.get("OPENLINEAGE_URL") or os.environ.get("OPENLINEAGE_CONFIG")
                  or any(key.startswith("OPENLINEAGE__TRANSPORT") for key in os.environ)
                  or Path("openlineage.yml").is_file() or Path("~/.openlineage/openlineage.yml").expanduser().is_file())
    if not configured:
        return openlineage.Delivery(location=openlineage.events_location(root, pathspec), name=name,
                                    required=required, s3_endpoint_url=stages.s3_endpoint())
    from openlineage.client import OpenLineageClient

    try:
        # The client would look for git in this task's working directory (a pod has none);
        # the source code location comes from the launch instead.
        client = OpenLineageClient(config={"facets": {"source_code_location": {"disabled": True}}})
    except Exception as err:  # noqa: BLE001 - a bad configuration surfaces as anything
        raise stages.StepError(f"the OpenLineage configuration cannot be used: {type(err).__name__}: {err}") from None
    return openlineage.Delivery(client=client, name=name, required=required)


def openlineage_namespace() -> str:
    """The OpenLineage job namespace: ``OPENLINEAGE_NAMESPACE``, as other integrations read it, else petseg."""
    return os.environ.get("OPENLINEAGE_NAMESPACE") or "petseg"


class StepRecords(UserStepDecorator):
    """What every step leaves on record (added to every step by `records`).

    Before the step: an OpenLineage START. After it: its stage, when the step is one
    (`petseg.lineage.graph.STAGES`), recorded in the run's lineage graph from the stage's
    declaration and the step's artifacts and mirrored into Pachyderm; the run's
    tags it has earned; then a COMPLETE or FAIL. The start step fixes the run's
    settings, which every event carries, so its events are sent when it ends.
    """

    def pre_step(self, step_name, flow, inputs=None):
        # A join step sees its inputs' artifacts only once it merges them.
        self._settings = _artifact(inputs[0] if inputs else flow, "settings")
        self._delivery = openlineage_delivery(root=stages.datastore_root(flow._datastore), pathspec=current.pathspec,
                                              attempt=current.retry_count, mode=flow.lineage)
        if step_name != "start":
            self._send_or_fail(openlineage.task_event("START", **self._task_facts(flow)))

    def post_step(self, step_name, flow, exception=None):
        problem = None
        try:
            if step_name == "start":
                if exception is None:
                    flow.lineage_target = stages.lineage_target(pachyderm=flow.pachyderm, mode=flow.lineage)
                    self._settings = flow.settings
                    flow.lineage_graph = lineage.new_graph(pathspec=current.pathspec, code=flow.settings["code"],
                                                           code_version=flow.settings["code_version"])
                    self._send(openlineage.flow_event("START", **self._run_facts(flow)))
                self._send(openlineage.task_event("START", **self._task_facts(flow)))
            files = task_files(flow, step_name) if exception is None else ([], [])
            if exception is None and step_name in lineage.STAGES:
                flow.lineage_graph = record_stage(flow, step_name, *files)
            if exception is None:
                tag_earned(flow, step_name)
            self._send(self._outcome(flow, files, exception))
            if step_name == "end" and exception is None:
                self._send(openlineage.flow_event("COMPLETE", **self._run_facts(flow)))
        except LineageError as err:
            problem = stages.StepError(str(err))
        except stages.StepError as err:
            problem = err
        if exception is not None:
            return exception, None
        return problem, None

    def _outcome(self, flow, files, exception):
        graph = _artifact(flow, "lineage_graph")
        reads, writes = files
        inputs, outputs = openlineage.task_datasets(graph, pathspec=current.pathspec, reads=reads, writes=writes,
                                                    datastore_root=stages.datastore_root(flow._datastore))
        stage = next((name for name, entry in (graph or {}).get("stages", {}).items()
                      if entry.get("pathspec") == current.pathspec), None)
        return openlineage.task_event("FAIL" if exception is not None else "COMPLETE", stage=stage, inputs=inputs,
                                      outputs=outputs, error=exception, **self._task_facts(flow))

    def _send_or_fail(self, event) -> None:
        try:
            self._send(event)
        except LineageError as err:
            raise stages.StepError(str(err)) from None

    def _send(self, event) -> None:
        if self._delivery is None:
            return
        problem = self._delivery.send(event)  # raises LineageError when required
        if problem:
            warnings.warn(problem, stacklevel=2)

    def _run_facts(self, flow) -> dict:
        settings = self._settings
        if settings is None:  # a start step that refused its parameters fixed no settings: only the code is known
            code = codeversion.record(dict(flow.code), code_package=stages.code_package())
            settings = {"code": code, "code_version": codeversion.describe(code)}
        return {"namespace": openlineage_namespace(), "run_pathspec": f"{current.flow_name}/{current.run_id}",
                "code": settings["code"], "code_version": settings["code_version"],
                "determinism": {key: settings[key] for key in ("seed", "strict", "threads", "portable")
                                if key in settings},
                "split_rule": flow.split, "image_size": settings.get("image_size"),
                "dataset_fingerprint": _artifact(flow, "dataset_fingerprint"),
                "model_fingerprint": _artifact(flow, "model_fingerprint"),
                "origin_run_id": current.origin_run_id, "engine_version": _metaflow_version()}

    def _task_facts(self, flow) -> dict:
        facts = self._run_facts(flow)
        del facts["run_pathspec"]
        return {**facts, "pathspec": current.pathspec, "attempt": current.retry_count}


class records(FlowMutator):  # noqa: N801 - used like Metaflow's own decorators
    """``@records`` on a flow: every step is recorded (`StepRecords`)."""

    def pre_mutate(self, mutable_flow):
        for _name, step in mutable_flow.steps:
            step.add_decorator(StepRecords, deco_kwargs={})


def task_files(flow, step_name: str) -> tuple[list[dict], list[dict]]:
    """What a step read and wrote, from its stage's declaration (`petseg.lineage.graph.task_files`) and its artifacts;
    the release step also wrote the release's files. Nothing for a step that is no stage."""
    if step_name not in lineage.STAGES:
        return [], []
    blobs = stages.blob_store(flow.blob_root)
    reads, writes = lineage.task_files(step_name, lambda name: getattr(flow, name), blob_url=blobs.url)
    manifest = _artifact(flow, "manifest") if step_name == "release" else None
    if manifest:
        location = manifest["location"].rstrip("/")
        writes += [{"name": name, "sha256": digest, "location": f"{location}/{name}", "kind": "release"}
                   for name, digest in bundle.file_hashes(manifest, flow.signatures).items()]
    return reads, writes


def record_stage(flow, stage: str, reads: list[dict], writes: list[dict]) -> dict:
    """The run's lineage graph with this step's stage recorded (`petseg.lineage.graph.record_stage`) from what the
    step read and wrote (`task_files`) and, when the run has a Pachyderm target, mirrored
    (`petseg.lineage.pachyderm.mirror_stage`)."""
    files = {name: lineage.as_file(getattr(flow, artifact)) for name, artifact in lineage.STAGES[stage].outputs.items()}
    graph = lineage.record_stage(flow.lineage_graph, stage, files=files, pathspec=current.pathspec, inputs=reads,
                                 blobs=writes, code_package=stages.code_package(),
                                 dataset_fingerprint=_artifact(flow, "dataset_fingerprint"),
                                 model_fingerprint=_artifact(flow, "model_fingerprint"))
    target = flow.lineage_target
    if target["address"]:
        from petseg.lineage import pachyderm

        graph = pachyderm.mirror_stage(graph, stage, files=files, address=target["address"],
                                       required=target["required"], timeout=target["timeout"])
    return graph


class release_privileges(StepMutator):  # noqa: N801 - used like Metaflow's own decorators
    """``@release_privileges`` on a step: on Kubernetes its pod, and no other, gets the signing key's Secret and
    runs as the release service account."""

    def mutate(self, mutable_step):
        # After the command line: a `--with kubernetes` decorator is there to extend; a local run has none.
        secret = os.environ.get("PETSEG_SIGNING_SECRET") or "petseg-signing"
        account = os.environ.get("PETSEG_RELEASE_SERVICE_ACCOUNT") or "petseg-release"
        specs = list(mutable_step.decorator_specs)
        if "METAFLOW_KUBERNETES_WORKLOAD" in os.environ:
            # Inside the pod. Metaflow hands a decorator that a mutator inserted to the pod as options of
            # `kubernetes step`, not as `--with`, so the pod's step has none: without one the task never
            # writes its local metadata back for the launcher, and the launcher fails. Re-create it.
            if not any(name == "kubernetes" for name, *_ in specs):
                mutable_step.add_decorator("kubernetes", deco_kwargs={"secrets": [secret], "service_account": account})
            return
        for name, _, args, kwargs in specs:
            secrets = list(kwargs.get("secrets") or [])
            if name == "kubernetes" and (secret not in secrets or kwargs.get("service_account") != account):
                mutable_step.add_decorator("kubernetes", deco_args=args, duplicates=mutable_step.OVERRIDE,
                                           deco_kwargs={**kwargs, "secrets": secrets + [secret] * (secret not in secrets),
                                                        "service_account": account})


def _artifact(flow, name: str):
    """An artifact of the step so far, or None before there is one."""
    try:
        return getattr(flow, name)
    except AttributeError:
        return None


@functools.cache
def _metaflow_version() -> str:
    return importlib.metadata.version("metaflow")
