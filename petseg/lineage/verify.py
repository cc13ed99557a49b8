"""Re-hash every stored file a run or a release names, and check it against its fingerprints and lineage.

A run is proved in this order, stopping at the first file that does not match:

0. its signed release (`verify_release`), before anything else of the run is
   read: its signature and signed provenance against the trusted keys, its
   files against the sha256 its manifest records, its architecture and weights
   against the model fingerprint, and that it is this run's. The run's
   artifacts, its lineage graph among them, are Metaflow pickles: they are
   read only once the release verified (a run without one is not proved);
1. every output its lineage graph records (ingest report, splits, trials,
   model, history, calibration table and report, metrics, manifest, gate
   decision): the run's artifact is turned into bytes again
   (`petseg.lineage.graph.as_file`) and hashed;
2. every shard of the data set and of the splits, read back from the blob
   store (a directory or ``s3://``) and hashed: its key is its sha256;
3. the data set fingerprint, recomputed from the per-sample hashes in the
   ingested shards, and the model fingerprint, recomputed from the weights;
   shards are streamed one at a time through a temporary file (`check_data`),
   so memory holds one record and the per-sample hashes, not the data set;
4. the release's manifest.json against the lineage graph;
5. the Pachyderm commits of the run's stages, when a pachd is given: each
   finished, each file hashing to what the graph records.

A mismatch is a `Mismatch` naming the file, where it lives, the expected and
the found hash. The functions take explicit values: the command line
(``petseg verify``) finds them through the Metaflow Client (`petseg.lineage.runs`).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from petseg.data import shards as shard_files
from petseg.errors import LineageError, ModelError, PetsegError, StorageError
from petseg.lineage.graph import FORMAT, STAGES, as_file
from petseg.release import signing
from petseg.storage import BlobStore, Location, file_sha256

ArtifactReader = Callable[[str, str], object]
"""(step, artifact name) -> the run's artifact value."""


class Mismatch(PetsegError):
    """A stored file does not hash to what the run recorded for it."""

    def __init__(self, what: str, where: str, expected: str, found: str):
        super().__init__(f"{what} does not match: expected {expected}, found {found} ({where})")
        self.what, self.where, self.expected, self.found = what, where, expected, found


class Refusal(Mismatch):
    """A release whose signature or provenance does not verify (the message says which and why)."""

    def __init__(self, message: str, *, where: str):
        PetsegError.__init__(self, message)
        self.what, self.where, self.expected, self.found = "release signature", where, "a trusted signature", message


@dataclass
class Tally:
    """What was checked, for the one-line summary; the key that signed the release, when one was checked; the run
    proved, with its fingerprints, when one was."""

    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    signer: str = ""
    subject: str = ""

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n

    def summary(self, subject: str) -> str:
        parts = [f"{n} {kind}" for kind, n in self.counts.items()]
        signed = f", signed by key {self.signer[:16]}" if self.signer else ""
        return (f"verified {subject}{signed}: {', '.join(parts) or 'nothing'} match"
                + "".join(f"; {n}" for n in self.notes))


def _same(what: str, where: str, expected: str | None, found: str | None) -> None:
    if expected != found:
        raise Mismatch(what, where, expected or "(none recorded)", found or "(missing)")


def verify_run(pathspec: str, *, release: str, read_graph: Callable[[], dict], artifacts: ArtifactReader,
               blob_root: Callable[[], str], s3_endpoint_url: str | None = None, pachyderm_address: str | None = None,
               tally: Tally | None = None) -> Tally:
    """Prove one finished run (see the module docstring): its signed release first, then what it names.

    Args:
        pathspec: the run (``PetSegFlow/<id>``): its release must name it.
        release: where the run's release is (`petseg.layout.Layout.release`, found without reading an artifact).
        read_graph: reads the run's lineage graph (an artifact: called only once the release verified).
        artifacts: reads the run's artifacts, ``artifacts("train", "model_keras")`` (likewise).
        blob_root: reads the run's blob store (a directory or ``s3://`` prefix; likewise).
        s3_endpoint_url: endpoint of a non-AWS S3 server.
        pachyderm_address: a pachd to check the run's commits in, or None.
        tally: counts to add to (a new one by default).

    Raises:
        Mismatch: the first file that does not match (`Refusal` for the release's signature and provenance).
        LineageError: the graph has another format (`petseg.lineage.graph.FORMAT`), or Pachyderm could not be read.
    """
    tally = tally or Tally()
    proved = _proved_release(release, s3_endpoint_url=s3_endpoint_url, pathspec=pathspec, tally=tally)
    graph = read_graph()
    if graph.get("format") != FORMAT:
        raise LineageError(f"the lineage graph of {graph.get('pathspec')} has format {graph.get('format')}, and this "
                           f"petseg proves format {FORMAT} (stages named after their steps): verify that run with the "
                           f"petseg it was recorded by, code version {graph.get('code_version')}")
    tally.subject = (f"{pathspec} (dataset {str(graph.get('dataset_fingerprint'))[:12]}, "
                     f"model {str(graph.get('model_fingerprint'))[:12]})")
    for stage in STAGES:
        for name, recorded in graph["stages"].get(stage, {}).get("outputs", {}).items():
            artifact = STAGES[stage].outputs.get(name)
            where = f"artifact {pathspec}/{stage}/{artifact}" if artifact else f"lineage output {stage}/{name}"
            found = hashlib.sha256(as_file(artifacts(stage, artifact))).hexdigest() if artifact else None
            _same(f"{stage} output {name}", where, recorded["sha256"], found)
            tally.add("lineage outputs")
    report, splits = artifacts("ingest", "ingest_report"), artifacts("transform", "splits")
    check_data(BlobStore(blob_root(), s3_endpoint_url=s3_endpoint_url), report, splits, graph, tally)
    model_keras = artifacts("train", "model_keras")
    weights = _weights_fingerprint(model_keras, f"artifact {pathspec}/train/model_keras")
    _same("the model fingerprint", f"weights in artifact {pathspec}/train/model_keras",
          graph.get("model_fingerprint"), weights)
    tally.add("fingerprints")
    _check_lineage(proved, graph, tally)
    if pachyderm_address and graph.get("pachyderm"):
        _check_pachyderm(graph, pachyderm_address, tally)
    elif pachyderm_address:
        tally.notes.append("not mirrored into Pachyderm")
    return tally


def verify_release(location: str, *, s3_endpoint_url: str | None = None,
                   find_graph: Callable[[str], dict | None] | None = None, tally: Tally | None = None) -> Tally:
    """Prove a release directory or ``s3://`` prefix: its signature and provenance first (against the trusted
    keys, `petseg.release.bundle.verify_files`), then its files against its manifest and its weights against the
    model fingerprint, then the manifest against the lineage graph of the run that made it.

    Args:
        find_graph: finds the graph of the run the verified manifest names (None: no such run); called only
            once the release verified.

    Raises:
        Mismatch: the first check that failed (`Refusal` for the signature and provenance).
    """
    tally = tally or Tally()
    proved = _proved_release(location, s3_endpoint_url=s3_endpoint_url, tally=tally)
    if find_graph is not None:
        pathspec = proved.manifest.get("pathspec")
        graph = find_graph(pathspec) if pathspec else None
        if graph is None:
            raise Mismatch("the run the release names", proved.where.url("manifest.json"),
                           f"a finished run {pathspec} known to this Metaflow", "no such run")
        _check_lineage(proved, graph, tally)
    return tally


@dataclass(frozen=True)
class _Proved:
    """A release that verified: where it is, its verified manifest and the sha256 of its manifest.json."""

    where: Location
    manifest: dict
    manifest_sha256: str


def _proved_release(location: str, *, s3_endpoint_url: str | None, tally: Tally,
                    pathspec: str | None = None) -> _Proved:
    """Verify a release (signature, provenance, files, fingerprint; with ``pathspec``, that it is that run's)."""
    from petseg.release import bundle

    where = Location(location, s3_endpoint_url=s3_endpoint_url, what="release")
    try:
        files = bundle.release_bytes(location, s3_endpoint_url=s3_endpoint_url)
        verified = bundle.verify_files(files, uri=location)
    except ModelError as err:
        raise Refusal(str(err), where=location) from None
    manifest = verified.manifest
    tally.add("signatures", 2)
    tally.add("release files", len(bundle.RELEASE_FILES))
    tally.signer = verified.signer
    claimed = str(verified.provenance["predicate"]["runDetails"]["metadata"].get("invocationId"))
    _same("the provenance's run", where.url(signing.PROVENANCE), manifest.get("pathspec"), claimed)
    if pathspec is not None:
        _same("the run the release names", where.url("manifest.json"), pathspec, manifest.get("pathspec"))
    weights = _weights_fingerprint(files["model.keras"], where.url("model.keras"))
    _same("the release's model fingerprint", f"architecture and weights in {where.url('model.keras')}",
          manifest.get("model_fingerprint"), weights)
    tally.add("fingerprints")
    return _Proved(where, manifest, hashlib.sha256(files["manifest.json"]).hexdigest())


def _check_lineage(proved: _Proved, graph: dict, tally: Tally) -> None:
    """The release's manifest.json and fingerprints against the lineage graph of its run."""
    where = proved.where.url("manifest.json")
    entry = graph["stages"].get("release", {}).get("outputs", {}).get("manifest.json")
    _same("release manifest.json", where, entry["sha256"] if entry else None, proved.manifest_sha256)
    for key in ("model_fingerprint", "dataset_fingerprint"):
        _same(f"the release's {key.replace('_', ' ')}", where, graph.get(key), proved.manifest.get(key))
    tally.add("lineage records")


def check_data(store: BlobStore, report: dict, splits: dict, graph: dict, tally: Tally) -> str:
    """Re-hash the ingested and split shards and recompute the data set fingerprint, in constant memory.

    Each shard is downloaded to one temporary file, hashed in chunks, and
    (for the ingest stage) read record by record for its samples' hashes; only
    those hashes (one line per sample) stay in memory.

    Args:
        store: The run's blob store.
        report: The ingest report (``shards``, ``fingerprint``).
        splits: The transform's result (``splits``: per split, shard records).
        graph: The run's lineage graph.
        tally: Counts to add to.

    Returns:
        The recomputed data set fingerprint.

    Raises:
        Mismatch: the first shard or fingerprint that does not match.
    """
    pathspec = graph.get("pathspec", "the run")
    with tempfile.TemporaryDirectory(prefix="petseg-verify-") as work:
        scratch = Path(work) / "shard.tfrecord"
        hashes: list[str] = []
        _check_shards(store, report["shards"], graph, "ingest", tally, scratch, hashes)
        for records in splits["splits"].values():
            _check_shards(store, records, graph, "transform", tally, scratch, None)
    dataset = shard_files.fingerprint(hashes)
    for what, expected in (("the ingest report's data set fingerprint", report.get("fingerprint")),
                           ("the lineage graph's data set fingerprint", graph.get("dataset_fingerprint"))):
        _same(what, f"{len(report['shards'])} ingested shards of {pathspec}", expected, dataset)
    tally.add("fingerprints")
    return dataset


def _check_shards(store: BlobStore, records: list[dict], graph: dict, stage: str, tally: Tally, scratch: Path,
                  hashes: list[str] | None) -> None:
    """Re-hash shards in the blob store one at a time through ``scratch``; their samples' hashes into ``hashes``."""
    written = {blob["sha256"] for blob in graph["stages"].get(stage, {}).get("blobs", [])}
    for record in records:
        key, url = record["sha256"], store.url(record["sha256"])
        if written and key not in written:
            raise Mismatch(f"shard {record['name']}", url, f"a shard the lineage graph's {stage} stage wrote",
                           f"{key}, which it does not list")
        found = _download(store.location, f"{key[:2]}/{key}", scratch)
        _same(f"shard {record['name']}", url, key, file_sha256(scratch) if found else None)
        if hashes is not None:
            hashes.extend(shard_files.decode(sample)["sha256"] for sample in shard_files.read_records([scratch]))
        scratch.unlink()
        tally.add("shards")


def _download(location: Location, name: str, dest: Path) -> bool:
    """Copies ``name`` to ``dest``, streaming; False when it is not there (any other failure is raised)."""
    try:
        location.download(name, dest)
    except StorageError as err:
        if "not found" in str(err) or "No such file" in str(err):
            return False
        raise
    return True


def _weights_fingerprint(model_keras: bytes | None, where: str) -> str | None:
    """The model fingerprint of ``.keras`` bytes, or None when they are missing or no model."""
    if model_keras is None:
        return None
    from petseg.model import unet as models  # Keras: only the weight check needs it

    try:
        return models.fingerprint(models.from_bytes(model_keras))
    except PetsegError as err:
        return f"(not a loadable model: {err})"


def _check_pachyderm(graph: dict, address: str, tally: Tally) -> None:
    from petseg.lineage import pachyderm

    commits = pachyderm.commit_digests(graph, address=address)
    for stage, entry in graph["stages"].items():
        mirror = entry.get("pachyderm") or {}
        if not mirror.get("mirrored"):
            continue
        got = commits.get(stage) or {"finished": False, "files": {}}
        where = f"Pachyderm {mirror['project']}/{stage}@{mirror['commit']} at {address}"
        if not got["finished"]:
            raise Mismatch(f"{stage} commit", where, "a finished commit", "an open commit")
        for name, recorded in entry["outputs"].items():
            _same(f"{stage} file {name}", where, recorded["sha256"], got["files"].get(name))
        extra = sorted(set(got["files"]) - set(entry["outputs"]))
        if extra:
            raise Mismatch(f"{stage} commit", where, "only the stage's outputs", f"also {', '.join(extra)}")
        tally.add("Pachyderm commits")
