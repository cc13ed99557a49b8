"""Where a run's files live, and where a deployment keeps its own: one layout, to write them and find them again.

Beside Metaflow's datastore, under ``<datastore root>/petseg`` (a directory or ``s3://`` prefix; `Layout`):

- ``blobs/``: shards by the sha256 of their bytes (`petseg.storage.BlobStore`);
- ``releases/petseg-<run id>``: a run's signed release, the files of the release format and nothing else
  (`petseg.release.bundle`);
- ``feedback/petseg-<run id>``: the feedback store of that release when it serves (`petseg.serving.quarantine`):
  a prefix of its own, so a store's policy can let servers add pending samples and only read releases;
- ``seldon-models/petseg-<run id>``: the folder a Seldon Core v2 Model of that release loads, holding its
  ``model-settings.json`` alone, which names the release (`petseg.deploy.kubernetes.write_model_settings`);
  unsigned, so the runtime serves the release it names only as the model its Model names (`is_model_of`);
- ``openlineage/<flow>/<run id>``: the run's OpenLineage events as JSON lines (`petseg.lineage.openlineage`).

Metaflow's artifacts are named ``<datastore root>/<flow>/<run id>/<step>/<task>/<artifact>`` (`artifact`).
A release's objects on Kubernetes, and the model a Seldon Core v2 Model of it loads, are named `deployment_name`.

A local deployment keeps what it writes while it serves (``deployment.json``, ``serving.log``) in the user's
state directory (`deployment_dir`), never in the release: a signed release never changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from petseg.errors import ConfigError
from petseg.userdirs import state_dir

BLOBS, RELEASES, FEEDBACK, OPENLINEAGE = "blobs", "releases", "feedback", "openlineage"
SELDON_MODELS = "seldon-models"
_HOME = "petseg"


@dataclasses.dataclass(frozen=True)
class Layout:
    """The files of runs beside one Metaflow datastore (see the module docstring).

    Attributes:
        datastore_root: Metaflow's datastore root, a directory or ``s3://`` prefix (no trailing slash).
    """

    datastore_root: str

    def __post_init__(self):
        object.__setattr__(self, "datastore_root", self.datastore_root.rstrip("/"))

    @classmethod
    def of_blobs(cls, blobs: str) -> Layout:
        """The layout whose `blobs` is ``blobs`` (a run records its blob store; this finds the rest from it).

        Raises:
            ConfigError: ``blobs`` is not the blob store of a layout.
        """
        suffix = f"/{_HOME}/{BLOBS}"
        if not blobs.rstrip("/").endswith(suffix):
            raise ConfigError(f"{blobs} is not a petseg blob store (expected <datastore root>{suffix})")
        return cls(blobs.rstrip("/")[:-len(suffix)])

    @property
    def root(self) -> str:
        """Where petseg's files live beside the datastore."""
        return f"{self.datastore_root}/{_HOME}"

    @property
    def blobs(self) -> str:
        """The blob store of shards."""
        return f"{self.root}/{BLOBS}"

    @property
    def releases(self) -> str:
        """Where the runs' releases are."""
        return f"{self.root}/{RELEASES}"

    def release(self, run_id: str) -> str:
        """A run's release."""
        return f"{self.releases}/{release_name(run_id)}"

    def openlineage(self, pathspec: str) -> str:
        """Where a run's OpenLineage events are kept as JSON lines (``pathspec``: the run's, or one of its steps',
        tasks')."""
        flow, run_id = pathspec.split("/")[:2]
        return f"{self.root}/{OPENLINEAGE}/{flow}/{run_id}"

    def artifact(self, task_pathspec: str, name: str) -> str:
        """The name of a task's artifact in Metaflow's datastore."""
        return f"{self.datastore_root}/{task_pathspec}/{name}"


def release_name(run_id: str) -> str:
    """The version of a run's release: its name under `Layout.releases`."""
    return f"petseg-{run_id}"


def deployment_name(version: str) -> str:
    """``petseg-<short version>``: the name of a release's objects on Kubernetes (`petseg.deploy.kubernetes`), a
    DNS-1123 label short enough for the objects Seldon derives from it.

    Args:
        version: The release version, ``petseg-<run id>``.

    Returns:
        The run id, lower-cased; ids that are long or not DNS-safe are cut and
        get 8 hex digits of their hash, so that distinct versions keep distinct names.
    """
    short = version.removeprefix("petseg-")
    safe = re.sub(r"[^a-z0-9]+", "-", short.lower()).strip("-")
    if safe != short or len(safe) > 24:
        safe = f"{safe[:15].strip('-')}-{hashlib.sha256(short.encode()).hexdigest()[:8]}".strip("-")
    return f"petseg-{safe}"


def is_model_of(model_name: str, version: str) -> bool:
    """Whether a model server names a model as the release ``version``'s: its `deployment_name`, as a Seldon Core v2
    Model of the release is named, with or without the ``_<generation>`` that Seldon's agent appends."""
    return re.fullmatch(rf"{re.escape(deployment_name(version))}(_[0-9]+)?", model_name) is not None


def beside(release: str, kind: str) -> str:
    """A folder of its own for something about a release directory or ``s3://`` prefix, outside it:
    ``<root>/<kind>/<name>`` for a release ``<root>/releases/<name>`` (a run's, `Layout.release`), else
    ``<release>-<kind>``."""
    parent, _, name = release.rstrip("/").rpartition("/")
    if parent.rpartition("/")[2] == RELEASES:
        return f"{parent[:-len(RELEASES)]}{kind}/{name}"
    return f"{release.rstrip('/')}-{kind}"


def feedback(release: str) -> str:
    """The feedback store of a release (`beside`)."""
    return beside(release, FEEDBACK)


def seldon_model(release: str) -> str:
    """The folder a Seldon Core v2 Model of a release loads (`beside`): its ``model-settings.json`` alone."""
    return beside(release, SELDON_MODELS)


def deployment_dir(model_uri: str) -> Path:
    """Where a local deployment of a release (a directory, ``s3://`` prefix or run) keeps ``deployment.json``
    and ``serving.log``: under the user's state directory (`petseg.userdirs`), by the release's name and a
    hash of where it is."""
    resolved = str(Path(model_uri).resolve()) if Path(model_uri).is_dir() else str(model_uri)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(resolved.rstrip("/")).name) or "release"
    return state_dir() / "deployments" / f"{name}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"
