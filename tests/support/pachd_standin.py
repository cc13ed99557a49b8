"""An in-memory stand-in for pachd, speaking Pachyderm's gRPC protocol.

Tests need a Pachyderm server, and none can run on a developer machine without
a cluster. This module serves the same gRPC methods as pachd 2.x on
127.0.0.1, (de)serialising with pachyderm-sdk's own message classes, so the
real ``pachyderm_sdk.Client`` talks to it unchanged. State lives in memory.

What it implements, with Pachyderm's semantics:

- ``pfs_v2.API``: CreateProject, InspectProject, ListProject, DeleteProject,
  CreateRepo, InspectRepo, ListRepo, DeleteRepo, CreateBranch, InspectBranch,
  ListBranch, DeleteBranch, StartCommit, FinishCommit, InspectCommit (with
  ``wait``), ListCommit, ClearCommit, DropCommit, InspectCommitSet,
  DropCommitSet, ModifyFile, GetFile, InspectFile, ListFile.
- Commits are open until finished; a finished commit cannot be written to,
  cleared or finished again. A new commit starts from its parent's files (a
  commit is a snapshot, not a diff), and its parent is the head of its branch
  (or an explicit parent, which must be finished).
- Branch provenance: StartCommit on a branch with provenance fails, as in
  pachd ("cannot start a commit on an output branch"). A commit started on a
  branch creates, in the same commit set (same id), an open commit on every
  branch downstream of it, each with direct provenance on the heads of its
  provenance branches. A new branch with provenance gets an open empty head
  commit; without provenance, a finished one.
- A ModifyFile stream is applied as a whole when it completes: a stream cut
  off half way changes nothing. Paths are normalised to ``/a/b``; deleting a
  directory (``/`` included) deletes everything under it; AddFile appends.
- ClearCommit resets an open commit to its parent's files. DropCommit
  (optionally recursive over subvenant commits) and DropCommitSet delete
  commits that have no children, moving branch heads back to the parents.
- Errors are gRPC status codes with pachd-like messages: NOT_FOUND,
  ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT, UNIMPLEMENTED.
- ``versionpb_v2.API/GetVersion`` (2.12.2), ``admin_v2.API/InspectCluster``,
  and ``auth_v2.API/WhoAmI`` answering, as pachd without auth does,
  UNIMPLEMENTED "the auth service is not activated".

Faults, for tests of a client that must survive them:

- ``drop_connection(method=..., after_messages=..., outage_calls=...)``: the
  next call of ``method`` is cut off with UNAVAILABLE (for the ModifyFile
  stream, after some of its messages arrived), and the next
  ``outage_calls`` calls of any method fail the same way, as while pachd
  restarts. Then (or at ``heal()``) it answers again, with its state intact.
- ``stop()`` / ``start()``: the listening socket really goes away and comes
  back on the same port, state intact.
- ``hang(method=...)``: every call of ``method`` is accepted and never
  answered (until ``heal()`` or ``stop()``), as a pachd stuck on a lock would;
  other methods answer. `silent_pachd` goes further: a TCP server that accepts
  connections and never says a word, not even the HTTP/2 greeting.

What it does not implement: pipelines and jobs (PPS), auth, enterprise,
transactions, file sets (CreateFileSet/AddFileSet), GlobFile, DiffFile,
WalkFile, GetFileTAR, FindCommits, provenance walks, SquashCommit(Set),
commit-set listing, ListCommit's ``from``/``to``/``started_time`` filters,
triggers and propagation specs, the metadata API, ancestry syntax in commit
ids (``master^2``), AddFile from a URL, and persistence: state is lost when
the process ends. pachd finishes commits asynchronously (FINISHING, then
FINISHED after compaction); here finishing is immediate.

Use it in-process::

    with running_standin() as pachd:
        client = pachyderm_sdk.Client.from_pachd_address(pachd.address)

or from a shell: ``python tests/support/pachd_standin.py --port 30650``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import posixpath
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import datetime, timezone

import betterproto
import betterproto.lib.google.protobuf as pb
import grpc
from pachyderm_sdk.api import admin, auth, pfs, version

_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")
_CHUNK = 1024 * 1024
_MAX_MESSAGE = 64 * 1024 * 1024

RepoKey = tuple[str, str]  # (project, repo)


class _Abort(Exception):
    """A gRPC error to answer with."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


@dataclasses.dataclass
class _Commit:
    repo: RepoKey
    id: str
    branch: str | None
    origin: pfs.OriginKind
    description: str
    parent: str | None
    direct_provenance: list[tuple[RepoKey, str]]
    started: datetime
    seq: int
    files: dict[str, bytes]
    finished: datetime | None = None
    error: str = ""
    children: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Branch:
    name: str
    head: str | None
    direct_provenance: list[tuple[RepoKey, str]]


@dataclasses.dataclass
class _Repo:
    key: RepoKey
    description: str
    created: datetime
    branches: dict[str, _Branch] = dataclasses.field(default_factory=dict)
    commits: dict[str, _Commit] = dataclasses.field(default_factory=dict)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _norm(path: str) -> str:
    """Pachyderm's path form: absolute, no trailing slash, no dots."""
    return posixpath.normpath("/" + (path or "").strip("/")).replace("//", "/")


def _under(path: str, directory: str) -> bool:
    return directory == "/" or path == directory or path.startswith(directory + "/")


class PfsState:
    """Projects, repos, branches, commits and files, with pachd's rules.

    Every public method runs under one lock and raises ``_Abort`` for a
    request pachd would refuse.
    """

    def __init__(self):
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.projects: dict[str, tuple[str, datetime]] = {}
        self.repos: dict[RepoKey, _Repo] = {}
        self._seq = itertools.count()

    # -- names and lookups ---------------------------------------------------

    @staticmethod
    def repo_key(repo: pfs.Repo) -> RepoKey:
        project = repo.project.name if repo.project and repo.project.name else "default"
        return project, repo.name

    def repo(self, key: RepoKey) -> _Repo:
        if key not in self.repos:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"repo {key[0]}/{key[1]} not found")
        return self.repos[key]

    def branch(self, key: RepoKey, name: str) -> _Branch:
        repo = self.repo(key)
        if name not in repo.branches:
            raise _Abort(
                grpc.StatusCode.NOT_FOUND, f"branch {key[0]}/{key[1]}@{name} not found"
            )
        return repo.branches[name]

    def resolve(self, commit: pfs.Commit) -> _Commit:
        """Find the commit a Commit message names: by id, or its branch head."""
        repo_msg = commit.repo if commit.repo and commit.repo.name else commit.branch.repo
        if not repo_msg or not repo_msg.name:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "commit must name a repo")
        key = self.repo_key(repo_msg)
        repo = self.repo(key)
        if commit.id:
            if commit.id in repo.commits:
                return repo.commits[commit.id]
            if commit.id in repo.branches and repo.branches[commit.id].head:
                return repo.commits[repo.branches[commit.id].head]
            raise _Abort(
                grpc.StatusCode.NOT_FOUND,
                f"commit {key[0]}/{key[1]}@{commit.id} not found",
            )
        name = commit.branch.name if commit.branch else ""
        if not name:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "commit must name an id or a branch")
        branch = self.branch(key, name)
        if branch.head is None:
            raise _Abort(
                grpc.StatusCode.NOT_FOUND, f"branch {key[0]}/{key[1]}@{name} has no head"
            )
        return repo.commits[branch.head]

    def commit_at(self, key: RepoKey, commit_id: str) -> _Commit:
        return self.repos[key].commits[commit_id]

    def all_commits(self) -> Iterator[_Commit]:
        for repo in self.repos.values():
            yield from repo.commits.values()

    def subvenant_commits(self, commit: _Commit) -> list[_Commit]:
        """Commits whose direct provenance includes ``commit``."""
        ref = (commit.repo, commit.id)
        return [c for c in self.all_commits() if ref in c.direct_provenance]

    def provenance(self, key: RepoKey, name: str) -> list[tuple[RepoKey, str]]:
        """All branches upstream of a branch (transitive provenance)."""
        seen: list[tuple[RepoKey, str]] = []
        todo = list(self.branch(key, name).direct_provenance)
        while todo:
            ref = todo.pop(0)
            if ref not in seen:
                seen.append(ref)
                todo.extend(self.branch(*ref).direct_provenance)
        return seen

    def subvenance(self, key: RepoKey, name: str) -> list[tuple[RepoKey, str]]:
        """All branches downstream of a branch, upstream ones first."""
        found = [
            (repo.key, b.name)
            for repo in self.repos.values()
            for b in repo.branches.values()
            if (key, name) in self.provenance(repo.key, b.name)
        ]
        ordered: list[tuple[RepoKey, str]] = []
        while len(ordered) < len(found):
            for ref in found:
                upstream = [p for p in self.branch(*ref).direct_provenance if p in found]
                if ref not in ordered and all(p in ordered for p in upstream):
                    ordered.append(ref)
        return ordered

    # -- messages ------------------------------------------------------------

    @staticmethod
    def repo_msg(key: RepoKey) -> pfs.Repo:
        return pfs.Repo(name=key[1], type="user", project=pfs.Project(name=key[0]))

    def commit_msg(self, commit: _Commit) -> pfs.Commit:
        repo = self.repo_msg(commit.repo)
        msg = pfs.Commit(repo=repo, id=commit.id)
        if commit.branch:
            msg.branch = pfs.Branch(repo=repo, name=commit.branch)
        return msg

    def branch_msg(self, ref: tuple[RepoKey, str]) -> pfs.Branch:
        return pfs.Branch(repo=self.repo_msg(ref[0]), name=ref[1])

    def commit_info(self, commit: _Commit) -> pfs.CommitInfo:
        size = sum(len(data) for data in commit.files.values())
        repo = self.repos[commit.repo]
        info = pfs.CommitInfo(
            commit=self.commit_msg(commit),
            origin=pfs.CommitOrigin(kind=commit.origin),
            description=commit.description,
            child_commits=[self.commit_msg(repo.commits[c]) for c in commit.children],
            started=commit.started,
            direct_provenance=[
                self.commit_msg(self.commit_at(*ref)) for ref in commit.direct_provenance
            ],
            direct_subvenance=[self.commit_msg(c) for c in self.subvenant_commits(commit)],
            error=commit.error,
            size_bytes_upper_bound=size,
            details=pfs.CommitInfoDetails(size_bytes=size),
            created_at=commit.started,
        )
        if commit.parent:
            info.parent_commit = self.commit_msg(repo.commits[commit.parent])
        if commit.finished:
            info.finishing = info.finished = commit.finished
        return info

    def branch_info(self, key: RepoKey, name: str) -> pfs.BranchInfo:
        branch = self.branch(key, name)
        info = pfs.BranchInfo(
            branch=self.branch_msg((key, name)),
            provenance=[self.branch_msg(r) for r in self.provenance(key, name)],
            subvenance=[self.branch_msg(r) for r in self.subvenance(key, name)],
            direct_provenance=[self.branch_msg(r) for r in branch.direct_provenance],
        )
        if branch.head:
            info.head = self.commit_msg(self.commit_at(key, branch.head))
        return info

    def repo_info(self, key: RepoKey) -> pfs.RepoInfo:
        repo = self.repo(key)
        size = 0
        for branch in repo.branches.values():
            if branch.head:
                size = max(size, sum(map(len, repo.commits[branch.head].files.values())))
        return pfs.RepoInfo(
            repo=self.repo_msg(key),
            created=repo.created,
            description=repo.description,
            branches=[self.branch_msg((key, b)) for b in sorted(repo.branches)],
            size_bytes_upper_bound=size,
            details=pfs.RepoInfoDetails(size_bytes=size),
        )

    # -- commits -------------------------------------------------------------

    def new_commit(
        self,
        key: RepoKey,
        branch_name: str | None,
        *,
        commit_id: str,
        origin: pfs.OriginKind,
        parent: str | None,
        description: str = "",
    ) -> _Commit:
        repo = self.repos[key]
        branch = repo.branches.get(branch_name) if branch_name else None
        provenance = []
        if branch is not None:
            for ref in branch.direct_provenance:
                upstream = self.branch(*ref)
                if upstream.head:
                    provenance.append((ref[0], upstream.head))
        commit = _Commit(
            repo=key,
            id=commit_id,
            branch=branch_name,
            origin=origin,
            description=description,
            parent=parent,
            direct_provenance=provenance,
            started=_now(),
            seq=next(self._seq),
            files=dict(repo.commits[parent].files) if parent else {},
        )
        repo.commits[commit_id] = commit
        if parent:
            repo.commits[parent].children.append(commit_id)
        if branch is not None:
            branch.head = commit_id
        return commit

    def propagate(self, key: RepoKey, name: str, commit_id: str) -> None:
        """Give every branch downstream of ``key@name`` an open commit ``commit_id``."""
        for ref in self.subvenance(key, name):
            branch = self.branch(*ref)
            if commit_id in self.repos[ref[0]].commits:
                continue
            self.new_commit(
                ref[0], ref[1], commit_id=commit_id, origin=pfs.OriginKind.AUTO,
                parent=branch.head,
            )

    def finish(self, commit: _Commit, description: str = "", error: str = "") -> None:
        if commit.finished:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"commit {commit.repo[1]}@{commit.id} has already finished",
            )
        if description:
            commit.description = description
        commit.error = error
        commit.finished = _now()
        self.changed.notify_all()

    def drop(self, targets: list[_Commit]) -> None:
        """Delete commits that have no children outside ``targets``."""
        ids = {(c.repo, c.id) for c in targets}
        for commit in targets:
            if any((commit.repo, child) not in ids for child in commit.children):
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"cannot drop commit {commit.repo[1]}@{commit.id}: it has children",
                )
            if any((c.repo, c.id) not in ids for c in self.subvenant_commits(commit)):
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"cannot drop commit {commit.repo[1]}@{commit.id}: "
                    "commits outside the drop depend on it",
                )
        for commit in sorted(targets, key=lambda c: -c.seq):
            repo = self.repos[commit.repo]
            for branch in repo.branches.values():
                if branch.head == commit.id:
                    branch.head = commit.parent
            if commit.parent and commit.parent in repo.commits:
                repo.commits[commit.parent].children.remove(commit.id)
            del repo.commits[commit.id]
        self.changed.notify_all()

    def writable(self, commit: pfs.Commit) -> tuple[_Commit, bool]:
        """The open commit a ModifyFile writes to, and whether it is one-off.

        As in pachd, naming a branch whose head is finished (or that has no
        head) writes to a new commit on it, finished when the stream ends.
        """
        named_id = bool(commit.id)
        try:
            target = self.resolve(commit)
        except _Abort as abort:
            if named_id or abort.code != grpc.StatusCode.NOT_FOUND:
                raise
            target = None
        if target is not None and not target.finished:
            return target, False
        if named_id:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"commit {target.repo[1]}@{target.id} has already finished",
            )
        repo_msg = commit.repo if commit.repo and commit.repo.name else commit.branch.repo
        key = self.repo_key(repo_msg)
        return self.start(key, commit.branch.name, parent=None, description=""), True

    def start(
        self, key: RepoKey, branch_name: str, *, parent: pfs.Commit | None, description: str
    ) -> _Commit:
        repo = self.repo(key)
        if not _NAME.match(branch_name or ""):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid branch name {branch_name!r}")
        branch = repo.branches.get(branch_name)
        if branch is not None and branch.direct_provenance:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot start a commit on an output branch: {key[0]}/{key[1]}@{branch_name}",
            )
        if parent is not None and (parent.id or parent.branch.name):
            parent_id = self.resolve(parent).id
        else:
            parent_id = branch.head if branch is not None else None
        if parent_id and not repo.commits[parent_id].finished:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"parent commit {key[1]}@{parent_id} has not been finished",
            )
        if branch is None:
            repo.branches[branch_name] = _Branch(branch_name, None, [])
        commit = self.new_commit(
            key, branch_name, commit_id=uuid.uuid4().hex, origin=pfs.OriginKind.USER,
            parent=parent_id, description=description,
        )
        self.propagate(key, branch_name, commit.id)
        return commit

    # -- files ---------------------------------------------------------------

    @staticmethod
    def apply(files: dict[str, bytes], requests: list[pfs.ModifyFileRequest]) -> dict[str, bytes]:
        """Apply ModifyFile operations to a copy of ``files``."""
        files = dict(files)
        for request in requests:
            kind, body = betterproto.which_one_of(request, "body")
            if kind == "delete_file":
                target = _norm(body.path)
                for path in [p for p in files if _under(p, target)]:
                    del files[path]
            elif kind == "add_file":
                source, data = betterproto.which_one_of(body, "source")
                if source != "raw":
                    raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "AddFile from a URL")
                path = _norm(body.path)
                files[path] = files.get(path, b"") + (data or b"")
            elif kind == "copy_file":
                raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "CopyFile")
            else:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "SetCommit may only come first"
                )
        return files

    def file_info(self, commit: _Commit, path: str) -> pfs.FileInfo:
        msg = pfs.File(commit=self.commit_msg(commit), path=path)
        if path in commit.files:
            data = commit.files[path]
            return pfs.FileInfo(
                file=msg, file_type=pfs.FileType.FILE, size_bytes=len(data),
                hash=hashlib.sha256(data).digest(), committed=commit.finished,
            )
        size = sum(len(d) for p, d in commit.files.items() if _under(p, path))
        return pfs.FileInfo(
            file=msg, file_type=pfs.FileType.DIR, size_bytes=size, committed=commit.finished
        )

    def children(self, commit: _Commit, path: str) -> list[str]:
        """Direct entries (files and directories) of a directory."""
        found = set()
        for name in commit.files:
            if _under(name, path) and name != path:
                rest = name[len(path):].lstrip("/") if path != "/" else name[1:]
                found.add(posixpath.join(path, rest.split("/")[0]))
        return sorted(found)


class _Service:
    """The gRPC methods, mapping requests onto a ``PfsState``."""

    def __init__(self, state: PfsState, server: "PachdStandin"):
        self.s = state
        self.server = server

    # projects and repos

    def create_project(self, r: pfs.CreateProjectRequest, ctx) -> pb.Empty:
        name = r.project.name
        if not _NAME.match(name or ""):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid project name {name!r}")
        if name in self.s.projects and not r.update:
            raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"project {name} already exists")
        created = self.s.projects.get(name, ("", _now()))[1]
        self.s.projects[name] = (r.description, created)
        return pb.Empty()

    def _project_info(self, name: str) -> pfs.ProjectInfo:
        if name not in self.s.projects:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"project {name} not found")
        description, created = self.s.projects[name]
        return pfs.ProjectInfo(
            project=pfs.Project(name=name), description=description, created_at=created
        )

    def inspect_project(self, r: pfs.InspectProjectRequest, ctx) -> pfs.ProjectInfo:
        return self._project_info(r.project.name)

    def list_project(self, r: pfs.ListProjectRequest, ctx) -> list[pfs.ProjectInfo]:
        return [self._project_info(name) for name in sorted(self.s.projects)]

    def delete_project(self, r: pfs.DeleteProjectRequest, ctx) -> pb.Empty:
        self._project_info(r.project.name)
        repos = [k for k in self.s.repos if k[0] == r.project.name]
        if repos and not r.force:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"project {r.project.name} still has repos",
            )
        for key in repos:
            del self.s.repos[key]
        del self.s.projects[r.project.name]
        return pb.Empty()

    def create_repo(self, r: pfs.CreateRepoRequest, ctx) -> pb.Empty:
        key = self.s.repo_key(r.repo)
        if not _NAME.match(key[1] or ""):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid repo name {key[1]!r}")
        if key[0] not in self.s.projects:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"project {key[0]} not found")
        if key in self.s.repos:
            if not r.update:
                raise _Abort(
                    grpc.StatusCode.ALREADY_EXISTS, f"repo {key[0]}/{key[1]} already exists"
                )
            self.s.repos[key].description = r.description
        else:
            self.s.repos[key] = _Repo(key, r.description, _now())
        return pb.Empty()

    def inspect_repo(self, r: pfs.InspectRepoRequest, ctx) -> pfs.RepoInfo:
        return self.s.repo_info(self.s.repo_key(r.repo))

    def list_repo(self, r: pfs.ListRepoRequest, ctx) -> list[pfs.RepoInfo]:
        projects = {p.name for p in r.projects}
        return [
            self.s.repo_info(key)
            for key in sorted(self.s.repos)
            if not projects or key[0] in projects
        ]

    def delete_repo(self, r: pfs.DeleteRepoRequest, ctx) -> pfs.DeleteRepoResponse:
        key = self.s.repo_key(r.repo)
        repo = self.s.repo(key)
        for name in repo.branches:
            downstream = [ref for ref in self.s.subvenance(key, name) if ref[0] != key]
            if downstream and not r.force:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"repo {key[1]} is in the provenance of {downstream[0][0][1]}",
                )
        del self.s.repos[key]
        return pfs.DeleteRepoResponse(deleted=True)

    # branches

    def create_branch(self, r: pfs.CreateBranchRequest, ctx) -> pb.Empty:
        key = self.s.repo_key(r.branch.repo)
        repo = self.s.repo(key)
        name = r.branch.name
        if not _NAME.match(name or ""):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid branch name {name!r}")
        provenance = []
        for p in r.provenance:
            ref = (self.s.repo_key(p.repo), p.name)
            self.s.branch(*ref)
            if ref == (key, name) or (key, name) in self.s.provenance(*ref):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"branch {key[1]}@{name} cannot be in its own provenance",
                )
            provenance.append(ref)
        head = self.s.resolve(r.head) if (r.head.id or r.head.branch.name) else None
        if head is not None and head.repo != key:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "branch head must be in the same repo")
        branch = repo.branches.get(name)
        is_new = branch is None
        if is_new:
            branch = repo.branches[name] = _Branch(name, None, provenance)
        changed = branch.direct_provenance != provenance
        branch.direct_provenance = provenance
        commit_id = uuid.uuid4().hex
        if head is not None:
            branch.head = head.id
        elif is_new or changed:
            # As pachd: a new (or re-wired) branch gets an empty head commit,
            # left open when it has provenance, since its content is
            # to be produced from upstream.
            commit = self.s.new_commit(
                key, name, commit_id=commit_id, origin=pfs.OriginKind.AUTO,
                parent=branch.head,
            )
            if not provenance:
                commit.files = {}
                commit.finished = _now()
        else:
            return pb.Empty()
        self.s.propagate(key, name, commit_id)
        return pb.Empty()

    def inspect_branch(self, r: pfs.InspectBranchRequest, ctx) -> pfs.BranchInfo:
        return self.s.branch_info(self.s.repo_key(r.branch.repo), r.branch.name)

    def list_branch(self, r: pfs.ListBranchRequest, ctx) -> list[pfs.BranchInfo]:
        key = self.s.repo_key(r.repo)
        names = sorted(self.s.repo(key).branches, reverse=r.reverse)
        return [self.s.branch_info(key, n) for n in names]

    def delete_branch(self, r: pfs.DeleteBranchRequest, ctx) -> pb.Empty:
        key = self.s.repo_key(r.branch.repo)
        self.s.branch(key, r.branch.name)
        if self.s.subvenance(key, r.branch.name) and not r.force:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"branch {key[1]}@{r.branch.name} has subvenance",
            )
        del self.s.repos[key].branches[r.branch.name]
        return pb.Empty()

    # commits

    def start_commit(self, r: pfs.StartCommitRequest, ctx) -> pfs.Commit:
        if not r.branch.name:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "branch must be specified")
        key = self.s.repo_key(r.branch.repo)
        commit = self.s.start(key, r.branch.name, parent=r.parent, description=r.description)
        return self.s.commit_msg(commit)

    def finish_commit(self, r: pfs.FinishCommitRequest, ctx) -> pb.Empty:
        self.s.finish(self.s.resolve(r.commit), r.description, r.error)
        return pb.Empty()

    def inspect_commit(self, r: pfs.InspectCommitRequest, ctx) -> pfs.CommitInfo:
        commit = self.s.resolve(r.commit)
        if r.wait in (pfs.CommitState.FINISHING, pfs.CommitState.FINISHED):
            while not commit.finished and ctx.is_active():
                self.s.changed.wait(timeout=0.1)
                commit = self.s.resolve(pfs.Commit(repo=self.s.repo_msg(commit.repo), id=commit.id))
        return self.s.commit_info(commit)

    def list_commit(self, r: pfs.ListCommitRequest, ctx) -> list[pfs.CommitInfo]:
        repo = self.s.repo(self.s.repo_key(r.repo))
        commits = sorted(repo.commits.values(), key=lambda c: c.seq, reverse=not r.reverse)
        if r.origin_kind:
            commits = [c for c in commits if c.origin == r.origin_kind]
        if r.number:
            commits = commits[: r.number]
        return [self.s.commit_info(c) for c in commits]

    def clear_commit(self, r: pfs.ClearCommitRequest, ctx) -> pb.Empty:
        commit = self.s.resolve(r.commit)
        if commit.finished:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"commit {commit.repo[1]}@{commit.id} has already finished",
            )
        repo = self.s.repos[commit.repo]
        commit.files = dict(repo.commits[commit.parent].files) if commit.parent else {}
        return pb.Empty()

    def drop_commit(self, r: pfs.DropCommitRequest, ctx) -> pfs.DropCommitResponse:
        commit = self.s.resolve(r.commit)
        targets, todo = [], [commit]
        while todo:
            current = todo.pop()
            if current not in targets:
                targets.append(current)
                todo.extend(self.s.subvenant_commits(current))
        if len(targets) > 1 and not r.recursive:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"commit {commit.repo[1]}@{commit.id} has subvenant commits; drop recursively",
            )
        self.s.drop(targets)
        return pfs.DropCommitResponse()

    def _commit_set(self, commit_set_id: str) -> list[_Commit]:
        commits = sorted(
            (c for c in self.s.all_commits() if c.id == commit_set_id), key=lambda c: c.seq
        )
        if not commits:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"no commits found for commit set {commit_set_id}")
        return commits

    def inspect_commit_set(self, r: pfs.InspectCommitSetRequest, ctx) -> list[pfs.CommitInfo]:
        commits = self._commit_set(r.commit_set.id)
        while r.wait and ctx.is_active() and not all(c.finished for c in commits):
            self.s.changed.wait(timeout=0.1)
            commits = self._commit_set(r.commit_set.id)
        return [self.s.commit_info(c) for c in commits]

    def drop_commit_set(self, r: pfs.DropCommitSetRequest, ctx) -> pb.Empty:
        self.s.drop(self._commit_set(r.commit_set.id))
        return pb.Empty()

    # files

    def modify_file(self, requests: Iterator[pfs.ModifyFileRequest], ctx) -> pb.Empty:
        # Read the whole stream before touching state: pachd applies a
        # ModifyFile stream only once it completed.
        received: list[pfs.ModifyFileRequest] = []
        for request in requests:
            received.append(request)
            self.server.count_message("ModifyFile")
        if not received or betterproto.which_one_of(received[0], "body")[0] != "set_commit":
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must set the commit")
        with self.s.lock:
            commit, one_off = self.s.writable(received[0].set_commit)
            commit.files = self.s.apply(commit.files, received[1:])
            if one_off:
                self.s.finish(commit)
        return pb.Empty()

    def _file(self, file: pfs.File) -> tuple[_Commit, str]:
        commit = self.s.resolve(file.commit)
        path = _norm(file.path)
        if path != "/" and path not in commit.files and not any(
            _under(p, path) for p in commit.files
        ):
            raise _Abort(
                grpc.StatusCode.NOT_FOUND,
                f"file {path} not found in repo {commit.repo[1]} at commit {commit.id}",
            )
        return commit, path

    def get_file(self, r: pfs.GetFileRequest, ctx) -> list[pb.BytesValue]:
        commit, path = self._file(r.file)
        if path not in commit.files:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{path} is a directory")
        data = commit.files[path][r.offset:]
        return [pb.BytesValue(value=data[i:i + _CHUNK]) for i in range(0, len(data), _CHUNK)]

    def inspect_file(self, r: pfs.InspectFileRequest, ctx) -> pfs.FileInfo:
        commit, path = self._file(r.file)
        return self.s.file_info(commit, path)

    def list_file(self, r: pfs.ListFileRequest, ctx) -> list[pfs.FileInfo]:
        commit, path = self._file(r.file)
        if path in commit.files:
            return [self.s.file_info(commit, path)]
        names = self.s.children(commit, path)
        if r.reverse:
            names.reverse()
        if r.number:
            names = names[: r.number]
        return [self.s.file_info(commit, name) for name in names]

    # version, admin, auth

    def get_version(self, r: pb.Empty, ctx) -> version.Version:
        return version.Version(major=2, minor=12, micro=2, additional="standin")

    def inspect_cluster(self, r: admin.InspectClusterRequest, ctx) -> admin.ClusterInfo:
        return admin.ClusterInfo(
            id=self.server.cluster_id, deployment_id=self.server.cluster_id, warnings_ok=True
        )

    def who_am_i(self, r: auth.WhoAmIRequest, ctx) -> auth.WhoAmIResponse:
        raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "the auth service is not activated")


# service name -> method -> (kind, request class, _Service attribute)
_METHODS: dict[str, dict[str, tuple[str, type, str]]] = {
    "pfs_v2.API": {
        "CreateProject": ("unary", pfs.CreateProjectRequest, "create_project"),
        "InspectProject": ("unary", pfs.InspectProjectRequest, "inspect_project"),
        "ListProject": ("stream", pfs.ListProjectRequest, "list_project"),
        "DeleteProject": ("unary", pfs.DeleteProjectRequest, "delete_project"),
        "CreateRepo": ("unary", pfs.CreateRepoRequest, "create_repo"),
        "InspectRepo": ("unary", pfs.InspectRepoRequest, "inspect_repo"),
        "ListRepo": ("stream", pfs.ListRepoRequest, "list_repo"),
        "DeleteRepo": ("unary", pfs.DeleteRepoRequest, "delete_repo"),
        "CreateBranch": ("unary", pfs.CreateBranchRequest, "create_branch"),
        "InspectBranch": ("unary", pfs.InspectBranchRequest, "inspect_branch"),
        "ListBranch": ("stream", pfs.ListBranchRequest, "list_branch"),
        "DeleteBranch": ("unary", pfs.DeleteBranchRequest, "delete_branch"),
        "StartCommit": ("unary", pfs.StartCommitRequest, "start_commit"),
        "FinishCommit": ("unary", pfs.FinishCommitRequest, "finish_commit"),
        "InspectCommit": ("unary", pfs.InspectCommitRequest, "inspect_commit"),
        "ListCommit": ("stream", pfs.ListCommitRequest, "list_commit"),
        "ClearCommit": ("unary", pfs.ClearCommitRequest, "clear_commit"),
        "DropCommit": ("unary", pfs.DropCommitRequest, "drop_commit"),
        "InspectCommitSet": ("stream", pfs.InspectCommitSetRequest, "inspect_commit_set"),
        "DropCommitSet": ("unary", pfs.DropCommitSetRequest, "drop_commit_set"),
        "ModifyFile": ("client_stream", pfs.ModifyFileRequest, "modify_file"),
        "GetFile": ("stream", pfs.GetFileRequest, "get_file"),
        "InspectFile": ("unary", pfs.InspectFileRequest, "inspect_file"),
        "ListFile": ("stream", pfs.ListFileRequest, "list_file"),
    },
    "versionpb_v2.API": {"GetVersion": ("unary", pb.Empty, "get_version")},
    "admin_v2.API": {
        "InspectCluster": ("unary", admin.InspectClusterRequest, "inspect_cluster")
    },
    "auth_v2.API": {"WhoAmI": ("unary", auth.WhoAmIRequest, "who_am_i")},
}


class PachdStandin:
    """A pachd stand-in serving gRPC on ``host:port`` (a free port by default).

    Attributes:
        address: ``host:port`` to give ``Client.from_pachd_address``.
        state: the in-memory ``PfsState``, for tests to inspect.
        calls: names of the methods called so far, in order.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self.state = PfsState()
        self.calls: list[str] = []
        self.cluster_id = uuid.uuid4().hex
        self._service = _Service(self.state, self)
        self._server: grpc.Server | None = None
        self._fault_lock = threading.Lock()
        self._armed: tuple[str, int] | None = None
        self._outage = 0
        self._messages = 0
        self._hanging: str | None = None
        self._unhang = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> "PachdStandin":
        """Listen (again, on the same port after ``stop``), keeping state."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_send_message_length", _MAX_MESSAGE),
            ],
        )
        for service, methods in _METHODS.items():
            handlers = {
                name: self._handler(name, kind, request_class, getattr(self._service, attr))
                for name, (kind, request_class, attr) in methods.items()
            }
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, handlers),)
            )
        port = server.add_insecure_port(f"{self.host}:{self.port}")
        if port == 0:
            raise OSError(f"cannot listen on {self.host}:{self.port}")
        self.port = port
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop listening at once, cutting off calls in flight; state stays."""
        self._unhang.set()
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def wait(self) -> None:
        """Block until the server stops."""
        if self._server is not None:
            self._server.wait_for_termination()

    # -- faults --------------------------------------------------------------

    def drop_connection(
        self, *, method: str = "ModifyFile", after_messages: int = 1, outage_calls: int = 2
    ) -> None:
        """Cut off the next call of ``method``, then stay unavailable a while.

        Args:
            method: gRPC method name, e.g. ``"ModifyFile"`` or ``"FinishCommit"``.
            after_messages: for the ModifyFile stream, how many of its messages
                arrive before the cut (ignored for other methods).
            outage_calls: how many following calls, of any method, fail with
                UNAVAILABLE before the server answers again.
        """
        with self._fault_lock:
            self._armed = (method, outage_calls)
            self._messages = after_messages

    def heal(self) -> None:
        """End an outage or a hang now and disarm a fault not yet fired."""
        with self._fault_lock:
            self._armed = None
            self._outage = 0
            self._hanging = None
            self._unhang.set()

    def hang(self, *, method: str) -> None:
        """Accept every call of ``method`` and never answer it, until ``heal()`` or ``stop()``."""
        with self._fault_lock:
            self._hanging = method
            self._unhang.clear()

    def _trip(self) -> None:
        """Fire the armed fault: start the outage and fail this call."""
        _method, outage = self._armed
        self._armed = None
        self._outage = outage
        raise _Abort(grpc.StatusCode.UNAVAILABLE, "connection reset by peer (stand-in fault)")

    def _before_call(self, name: str) -> None:
        if self._hanging == name:
            self.calls.append(name)
            self._unhang.wait()
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "pachd is going away (stand-in hang ended)")
        with self._fault_lock:
            self.calls.append(name)
            if self._outage > 0:
                self._outage -= 1
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "pachd is unavailable (stand-in outage)")
            if self._armed and self._armed[0] == name and name != "ModifyFile":
                self._trip()

    def count_message(self, name: str) -> None:
        """Called per streamed message: cut the stream when armed to."""
        with self._fault_lock:
            if self._armed and self._armed[0] == name:
                self._messages -= 1
                if self._messages <= 0:
                    self._trip()

    # -- plumbing ------------------------------------------------------------

    def _handler(self, name: str, kind: str, request_class: type, method: Callable):
        def run(request, context):
            try:
                self._before_call(name)
                if kind == "client_stream":
                    return method(request, context)
                with self.state.lock:
                    return method(request, context)
            except _Abort as abort:
                context.abort(abort.code, abort.details)

        def run_stream(request, context):
            yield from run(request, context) or []

        if kind == "unary":
            return grpc.unary_unary_rpc_method_handler(
                run, request_deserializer=request_class.FromString, response_serializer=bytes
            )
        if kind == "stream":
            return grpc.unary_stream_rpc_method_handler(
                run_stream, request_deserializer=request_class.FromString,
                response_serializer=bytes,
            )
        return grpc.stream_unary_rpc_method_handler(
            run, request_deserializer=request_class.FromString, response_serializer=bytes
        )


@contextlib.contextmanager
def running_standin(*, host: str = "127.0.0.1", port: int = 0) -> Iterator[PachdStandin]:
    """Run a stand-in for the duration of a ``with`` block.

    Yields:
        The started ``PachdStandin``; its ``address`` is ``host:port``.
    """
    standin = PachdStandin(host=host, port=port).start()
    try:
        yield standin
    finally:
        standin.stop()


@contextlib.contextmanager
def silent_pachd(*, host: str = "127.0.0.1") -> Iterator[str]:
    """A TCP server that accepts connections and never answers (not even HTTP/2's greeting).

    Yields:
        Its ``host:port``.
    """
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # kept open, never read, never written
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"{host}:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in held:
            connection.close()
        listener.close()


def main(argv: list[str] | None = None) -> None:
    """Serve a stand-in until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=30650, help="port (0: a free one)")
    parser.add_argument("--silent", action="store_true",
                        help="accept connections on a free port and never answer (prints its address)")
    args = parser.parse_args(argv)
    if args.silent:
        with silent_pachd(host=args.host) as address:
            print(f"silent pachd listening on {address}", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                return
    standin = PachdStandin(host=args.host, port=args.port).start()
    print(f"pachd stand-in listening on {standin.address}", flush=True)
    try:
        standin.wait()
    except KeyboardInterrupt:
        standin.stop()


if __name__ == "__main__":
    main()
