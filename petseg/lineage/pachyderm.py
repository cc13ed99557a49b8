"""Pachyderm mirror: write each recorded lineage stage as a commit in Pachyderm.

Mirroring is optional: project ``petseg``, one repo per stage
(``petseg.lineage.graph.STAGES``), branch ``master``, and branch provenance wired
as the stage parents, so that Pachyderm itself answers "which data and model
made this release". The flow records a stage in the run's lineage graph
(``petseg.lineage.graph.record_stage``), then mirrors it with ``mirror_stage``,
which adds the commit to the graph.

How stage commits relate in Pachyderm. pachd refuses StartCommit on a branch
that has provenance ("cannot start a commit on an output branch"): commits on
such branches are made by Pachyderm, when a commit lands upstream. Every
commit started on an input branch creates, in the same *commit set* (same
commit id), an open commit on every branch downstream of it, with direct
provenance on the upstream commits. petseg uses exactly that instead of
fighting it:

- The ingest stage (the only input repo) starts a commit on
  ``ingest@master``. Pachyderm opens commits with the same id in
  transform, tune, model, calibrate, evaluate and release: one commit set is
  one petseg run, and ``pachctl inspect commit-set ID`` shows it whole.
- Each later stage writes its files into its repo's open commit of that set
  and finishes it, as a pipeline would with its output commit. The commit
  set id travels from stage to stage in the graph.
- So provenance between commits is Pachyderm's own, not a convention in a
  description; an open commit in a later repo means "stage not run (yet)".

The ingest stage also creates the project, repos and branches when they
are missing (idempotently); later stages only touch their own commit.

Atomicity: all files of a stage go in one ModifyFile stream, which pachd
applies only once the stream completes, and the commit is finished after it.
If an attempt fails after the ingest commit was started, that commit (with
the empty ones it opened downstream) is dropped; a later stage's commit is
cleared back to empty, since it cannot leave its commit set. When pachd is
unreachable, that cleanup cannot happen, so every attempt first looks for the
stage's commit of this run: a finished one is reused (no duplicate), an open
one is written again from scratch and finished. Transient failures (pachd
unreachable or restarting) are retried with exponential backoff.

Every call has a deadline (`petseg.lineage.pachd_client`): the sooner of
``CALL_TIMEOUT`` and the stage's own deadline, ``timeout`` seconds after
`mirror_stage` began (``LINEAGE_TIMEOUT`` in the flow). A pachd that accepts
connections and never answers therefore costs a stage at most ``timeout``
seconds plus ``CLEANUP_GRACE`` per clean-up call of a half-written commit;
then the stage fails (required) or warns (best-effort).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from collections.abc import Iterator, Mapping

from petseg.errors import LineageError
from petseg.lineage.graph import FORMAT, STAGES, FileSource, check_stage, file_chunks, output_path
from petseg.lineage.pachd_client import Connection as _Connection
from petseg.lineage.pachd_client import Transient as _Transient

PROJECT = "petseg"
BRANCH = "master"


def mirror_stage(
    graph: dict,
    stage: str,
    *,
    files: Mapping[str, FileSource],
    address: str | None,
    required: bool = True,
    attempts: int = 5,
    delay: float = 1.0,
    timeout: float = 60.0,
) -> dict:
    """Write one recorded stage of one run as one finished commit in its Pachyderm repo.

    The graph must already hold the stage (``petseg.lineage.graph.record_stage``)
    and, for any stage after ingest, the commit set of the run's mirrored
    ingest stage. Calling it again for the same run and stage reuses the
    finished commit.

    The stage's ``pachyderm`` entry becomes ``{"stage", "mirrored": True,
    "address", "project", "repo", "branch", "commit", "reused"}``, or
    ``{"stage", "mirrored": False, "address", "error", "files"}`` when
    best-effort and not mirrored. A mirrored ingest stage also sets the
    graph's ``pachyderm`` to ``{"address", "project", "commit_set"}``.

    Args:
        graph: the run's graph, including ``stage`` (not modified).
        stage: one of ``STAGES``.
        files: the stage's outputs: path in repo -> local file or bytes (as
            given to ``record_stage``).
        address: pachd address, ``host:port`` or ``grpc://host:port``; None
            or empty (no mirror configured) returns the graph as it is.
        required: raise when the stage could not be mirrored (True), or warn
            and record that it was not (False).
        attempts: tries before giving up on an unreachable pachd.
        delay: seconds before the second try, doubled after each failure.
        timeout: seconds after which no call and no try starts any more: the
            stage gives up within ``timeout + 2 * CLEANUP_GRACE`` seconds
            (CLEANUP_GRACE is 5 s).

    Returns:
        A new graph with the stage's mirror record.

    Raises:
        ConfigError: the address is malformed.
        LineageError: a bad stage, or ``required`` and the stage could not be mirrored.
    """
    new = copy.deepcopy(graph)
    if not address:
        return new
    check_stage(stage)
    if stage not in graph["stages"]:
        raise LineageError(f"stage {stage} is not in the lineage graph: record it first")
    deadline = time.monotonic() + timeout
    _Connection(address, deadline).close()  # a malformed address is a ConfigError, never retried
    if STAGES[stage].parents and not (graph.get("pachyderm") or {}).get("commit_set"):
        record, error = None, (
            f"the ingest stage of {graph['pathspec']} was not mirrored, so there is"
            " no Pachyderm commit set to add to; rerun the flow with Pachyderm reachable"
        )
    else:
        record, error = _mirror_with_retries(graph, stage, files, address, attempts, delay, deadline)
    if record is None:
        message = f"stage {stage} was not mirrored: {error}"
        if required:
            raise LineageError(f"{message} (or make lineage best-effort to run on without it)")
        warnings.warn(message, stacklevel=2)
        record = {
            "stage": stage,
            "mirrored": False,
            "address": address,
            "error": error,
            "files": sorted(graph["stages"][stage]["outputs"]),
        }
    new["stages"][stage]["pachyderm"] = record
    if record["mirrored"] and not STAGES[stage].parents:
        new["pachyderm"] = {"address": address, "project": PROJECT, "commit_set": record["commit"]}
    return new


def commit_digests(graph: dict, *, address: str, timeout: float = 60.0) -> dict[str, dict]:
    """Read back each mirrored stage's commit of a run: whether it is finished and the sha256 of its files.

    Args:
        graph: the run's lineage graph, with its stages' mirror records.
        address: the pachd to ask.
        timeout: seconds for the whole read.

    Returns:
        ``{stage: {"commit": id, "finished": bool, "files": {"path": sha256}}}``
        for every stage the graph records as mirrored (paths without the leading /).

    Raises:
        LineageError: pachd did not answer in time, or a commit is missing.
    """
    import grpc
    from pachyderm_sdk.api import pfs

    found = {}
    connection = _Connection(address, time.monotonic() + timeout)
    try:
        for stage, entry in graph["stages"].items():
            record = entry.get("pachyderm") or {}
            if not record.get("mirrored"):
                continue
            commit = pfs.Commit(repo=_repo(stage), id=record["commit"])
            info = connection.sdk.pfs.inspect_commit(commit=commit)
            files, todo = {}, ["/"]
            while todo:
                for item in connection.sdk.pfs.list_file(file=pfs.File(commit=commit, path=todo.pop())):
                    if item.file_type == pfs.FileType.DIR:
                        todo.append(item.file.path)
                    else:
                        data = connection.sdk.pfs.pfs_file(item.file).read()
                        files[item.file.path.lstrip("/")] = hashlib.sha256(data).hexdigest()
            found[stage] = {"commit": record["commit"], "finished": _finished(info), "files": files}
    except grpc.RpcError as exc:
        raise LineageError(f"Pachyderm at {address} did not give back the commits of {graph['pathspec']}: "
                           f"{exc.code().name}: {exc.details()}") from None
    except (_Transient, ConnectionError) as exc:
        raise LineageError(f"Pachyderm at {address} did not answer within {timeout:.0f} s ({exc})") from None
    finally:
        connection.close()
    return found


def _mirror_with_retries(graph, stage, files, address, attempts, delay, deadline) -> tuple[dict | None, str]:
    """The mirror record, or None and why there is none."""
    error = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            pause = delay * 2 ** (attempt - 1)
            if time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
        try:
            return _mirror_once(graph, stage, files, address, deadline), ""
        except _Transient as exc:
            error = (
                f"cannot reach Pachyderm at {address} after {attempt + 1} attempt(s)"
                f" ({exc}). Check that pachd is running and that this address"
                " reaches it (e.g. `pachctl port-forward`, or the cluster's pachd service)"
            )
        except LineageError as exc:
            return None, str(exc)
        if time.monotonic() >= deadline:
            break
    return None, error


def _mirror_once(graph: dict, stage: str, files: Mapping[str, FileSource], address: str, deadline: float) -> dict:
    """One attempt; transient gRPC failures come out as ``_Transient``."""
    import grpc

    transient = {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    }
    client = _Connection(address, deadline)
    try:
        if STAGES[stage].parents:
            commit_id, reused = _mirror_downstream(client, graph, stage, files)
        else:
            _ensure_layout(client.sdk)
            commit_id, reused = _mirror_input(client, graph, stage, files)
    except grpc.RpcError as exc:
        if exc.code() in transient:
            raise _Transient(f"{exc.code().name}: {exc.details()}") from None
        raise LineageError(
            f"Pachyderm at {address} refused stage {stage}: {exc.code().name}: {exc.details()}"
        ) from None
    except ConnectionError as exc:
        raise _Transient(str(exc).strip()) from None
    finally:
        client.close()
    return {
        "stage": stage,
        "mirrored": True,
        "address": address,
        "project": PROJECT,
        "repo": stage,
        "branch": BRANCH,
        "commit": commit_id,
        "reused": reused,
    }


def _ensure_layout(client) -> None:
    """Create the project, repos and branches with provenance, if missing."""
    import grpc
    from pachyderm_sdk.api import pfs

    project = pfs.Project(name=PROJECT)
    if not client.pfs.project_exists(project):
        _tolerate_exists(
            lambda: client.pfs.create_project(
                project=project, description="petseg: one repo per workflow stage"
            )
        )
    for stage, entry in STAGES.items():
        branch, wanted = _branch(stage), [_branch(parent) for parent in entry.parents]
        try:
            info = client.pfs.inspect_branch(branch=branch)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            info = None
        if info is None:
            if not client.pfs.repo_exists(branch.repo):
                _tolerate_exists(
                    lambda: client.pfs.create_repo(
                        repo=branch.repo, description=f"petseg stage {stage}"
                    )
                )
            client.pfs.create_branch(branch=branch, provenance=wanted)
            if entry.parents:
                _seal_initial_commit(client, branch)
        elif sorted(map(str, info.direct_provenance)) != sorted(map(str, wanted)):
            client.pfs.create_branch(branch=branch, provenance=wanted)


def _seal_initial_commit(client, branch) -> None:
    """Finish the empty commit pachd opens on a new branch with provenance.

    Left open it would read as a stage that never ran; no petseg run owns it.
    """
    import grpc

    head = client.pfs.inspect_branch(branch=branch).head
    if head.id and not _finished(client.pfs.inspect_commit(commit=head)):
        try:
            client.pfs.finish_commit(commit=head, description="petseg: empty initial commit")
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # finished meanwhile
                raise


def _mirror_input(connection: _Connection, graph: dict, stage: str, files) -> tuple[str, bool]:
    """The ingest stage: a commit on the input branch, opening the commit set."""
    client = connection.sdk
    description = _description(graph, stage)
    existing = _find_run_commit(client, graph, stage)
    if existing is not None and _finished(existing):
        return _reuse(existing, graph, stage)
    if existing is not None:
        # An earlier attempt of this run died before finishing: its commit
        # (and the set it opened downstream) is written again, not duplicated.
        commit = existing.commit
    else:
        commit = client.pfs.start_commit(
            branch=_branch(stage), parent=_last_finished(client, _branch(stage)),
            description=description,
        )
    try:
        _write_files(client, commit, files)
        client.pfs.finish_commit(commit=commit, description=description)
    except BaseException:
        # Drop it with the empty commits it opened downstream; if a later
        # run already built on them, at least leave it empty.
        with connection.grace():
            if not _try(lambda: client.pfs.drop_commit(commit=commit, recursive=True)):
                _try(lambda: client.pfs.clear_commit(commit=commit))
        raise
    return commit.id, False


def _mirror_downstream(connection: _Connection, graph: dict, stage: str, files) -> tuple[str, bool]:
    """A later stage: fill and finish its repo's open commit of the run's commit set."""
    import grpc
    from pachyderm_sdk.api import pfs

    client = connection.sdk
    commit_set = graph["pachyderm"]["commit_set"]
    commit = pfs.Commit(repo=_repo(stage), id=commit_set)
    try:
        info = client.pfs.inspect_commit(commit=commit)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        raise LineageError(
            f"commit set {commit_set} has no commit in repo {PROJECT}/{stage}: the"
            " repo or its provenance was changed after the ingest stage ran;"
            " rerun the flow"
        ) from None
    if _finished(info):
        return _reuse(info, graph, stage)
    description = _description(graph, stage)
    try:
        _write_files(client, commit, files)
        client.pfs.finish_commit(commit=commit, description=description)
    except BaseException:
        # This commit belongs to the commit set and cannot be dropped alone;
        # clearing it leaves it open and empty: "stage not run".
        with connection.grace():
            _try(lambda: client.pfs.clear_commit(commit=commit))
        raise
    return commit_set, False


def _write_files(client, commit, files: Mapping[str, FileSource]) -> None:
    """All files in one ModifyFile stream, replacing what the parent held."""
    from pachyderm_sdk.api import pfs

    def requests() -> Iterator[pfs.ModifyFileRequest]:
        yield pfs.ModifyFileRequest(set_commit=commit)
        # A commit starts as a copy of its parent (the previous run's stage).
        yield pfs.ModifyFileRequest(delete_file=pfs.DeleteFile(path="/"))
        for name, source in sorted(files.items()):
            path = "/" + output_path(name)
            yield pfs.ModifyFileRequest(add_file=pfs.AddFile(path=path, raw=b""))
            for chunk in file_chunks(source, name):
                yield pfs.ModifyFileRequest(add_file=pfs.AddFile(path=path, raw=chunk))

    client.pfs.modify_file(requests())


def _find_run_commit(client, graph: dict, stage: str):
    """The newest commit of ``stage`` written for this run, or None."""
    for info in client.pfs.list_commit(repo=_repo(stage)):
        meta = _parse_description(info.description)
        if meta and meta.get("stage") == stage and meta.get("run") == graph["pathspec"]:
            return info
    return None


def _last_finished(client, branch):
    """The newest finished commit on a branch.

    pachd refuses an open parent; a commit left open by a run that died (and
    never retried) must not block the next runs.
    """
    head = client.pfs.inspect_branch(branch=branch).head
    while head is not None and head.id:
        info = client.pfs.inspect_commit(commit=head)
        if _finished(info):
            return info.commit
        head = info.parent_commit
    return None


def _reuse(info, graph: dict, stage: str) -> tuple[str, bool]:
    """Accept an existing finished commit for this stage, or explain why not."""
    meta = _parse_description(info.description)
    if meta is None:
        raise LineageError(
            f"commit {info.commit.id} in {PROJECT}/{stage} is finished but was not"
            " written by petseg; it cannot hold this run's stage"
        )
    outputs = graph["stages"][stage]["outputs"]
    if meta.get("outputs") == outputs:
        return info.commit.id, True
    if meta.get("run") == graph["pathspec"]:
        # A retried step: the commit of the first attempt stays (commits are
        # immutable), though files such as a saved model differ in bytes.
        warnings.warn(
            f"stage {stage} of {graph['pathspec']} is already in Pachyderm"
            f" (commit {info.commit.id}) with outputs of an earlier attempt",
            stacklevel=4,
        )
        return info.commit.id, True
    raise LineageError(
        f"stage {stage} of commit set {info.commit.id} was already recorded by"
        f" {meta.get('run')} with other outputs; commits are immutable, so start"
        " a new run rather than resuming that one"
    )


def _description(graph: dict, stage: str) -> str:
    """The commit description: a headline, then the run's metadata as JSON."""
    entry = graph["stages"][stage]
    meta = {
        "petseg": FORMAT,
        "stage": stage,
        "parents": entry["parents"],
        "run": graph["pathspec"],
        "run_id": graph["run_id"],
        "pathspec": entry["pathspec"],
        "code_version": graph["code_version"],
        "code": graph.get("code"),
        "dataset_fingerprint": graph["dataset_fingerprint"],
        "model_fingerprint": graph["model_fingerprint"],
        "outputs": entry["outputs"],
    }
    headline = f"petseg {stage} of {graph['pathspec']}"
    return headline + "\n" + json.dumps(meta, indent=1, sort_keys=True)


def _parse_description(text: str) -> dict | None:
    """The metadata of a petseg commit description, or None for other commits."""
    _headline, _, body = (text or "").partition("\n")
    try:
        meta = json.loads(body)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and "petseg" in meta else None


# -- small helpers -------------------------------------------------------------


def _repo(stage: str):
    from pachyderm_sdk.api import pfs

    return pfs.Repo(name=stage, type="user", project=pfs.Project(name=PROJECT))


def _branch(stage: str):
    from pachyderm_sdk.api import pfs

    return pfs.Branch(repo=_repo(stage), name=BRANCH)


def _finished(info) -> bool:
    # betterproto reads an unset timestamp as the epoch.
    return any(t is not None and t.timestamp() > 0 for t in (info.finishing, info.finished))


def _tolerate_exists(create) -> None:
    import grpc

    try:
        create()
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # made by a concurrent run
            raise


def _try(action) -> bool:
    """Best-effort cleanup (the connection may be what failed): did it work?"""
    try:
        action()
    except Exception:  # noqa: BLE001 - the original error is the one to report
        return False
    return True
