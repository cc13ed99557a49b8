"""Check every sample of a data source and shard it; route shards into splits.

``ingest`` is the ingest stage (the warehouse): it brings a source (`petseg.data.sources`) into a
local directory in the Oxford-IIIT Pet layout (``images/<id>.jpg``,
``annotations/trimaps/<id>.png``, ``annotations/list.txt``), checks each
sample, resizes it to ``image_size`` and streams it into TFRecord shards,
sorted by id. ``transform`` then routes the shards' records into per-split
shards by the rule in :mod:`petseg.data.split`.

Both write into a scratch directory beside ``out_dir`` and rename it into
place only when everything succeeded, so a failure leaves no partial output.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from petseg import oxford, storage
from petseg.data import reviews
from petseg.data import shards as shard_files
from petseg.data.sources import ACCEPTED_SOURCES, stage
from petseg.data.split import split_of
from petseg.errors import ConfigError, DataError
from petseg.oxford import SPLITS

IMAGE_SIZE = 128
"""Default side of the square images and trimaps in shards (a run records its own, see the flow's --image_size)."""


@dataclass(frozen=True)
class Sample:
    """One image and its trimap in a directory laid out like Oxford-IIIT Pet.

    Attributes:
        id: image stem, e.g. ``Abyssinian_12``.
        root: the directory holding ``images/`` and ``annotations/``.
        origin: the source it came from, for messages.
    """

    id: str
    root: Path
    origin: str

    @property
    def image(self) -> str:
        """Path of the image relative to ``root``."""
        return oxford.image_file(self.id)

    @property
    def trimap(self) -> str:
        """Path of the trimap relative to ``root``."""
        return oxford.trimap_file(self.id)


class BadSample(Exception):
    """A sample that fails a check; ``file`` is relative to its root."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


def ingest(
    source: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    skip_bad: bool = False,
    feedback: str | None = None,
    image_size: int = IMAGE_SIZE,
    shard_size: int = 128,
    s3_endpoint_url: str | None = None,
    data_dir: str | None = None,
    trusted_keys: str | None = None,
) -> dict:
    """Read, check, preprocess and shard a data source.

    Args:
        source: where the data is, one of :data:`ACCEPTED_SOURCES`.
        out_dir: directory for the shards; must not exist or be empty.
        seed: seed of the embedded data set (``synth:COUNT`` only).
        skip_bad: leave bad samples out (listed under ``"skipped"``)
            instead of stopping at the first one.
        feedback: optional feedback store (directory or ``s3://`` prefix,
            `petseg.serving.quarantine`): only its accepted samples (``accepted/``, in
            the Oxford layout) whose acceptance a trusted reviewer's key signed
            (`petseg.data.reviews`) are added to the source; any other sample there
            stops the ingest, ``skip_bad`` or not.
        image_size: side of the stored square images and trimaps.
        shard_size: records per shard file.
        s3_endpoint_url: endpoint of a non-AWS S3 server (None for AWS).
        data_dir: tensorflow-datasets data directory (``tfds:`` only).
        trusted_keys: the reviewers' public keys, a file or directory; default
            `petseg.keys.trusted_keys_setting`.

    Returns:
        The ingest report: ``source``, ``feedback``, ``feedback_samples``
        (the accepted samples added, from their signed review records: id, sender,
        received, release, content hash, breed, accepted_by, accepted_at and the
        reviewer's key, ``accepted_key``; `transform` puts them in training only), ``samples`` (count
        written), ``skipped`` (``file``, ``source``, ``reason`` of each left
        out), ``fingerprint`` (sha256 over the sorted per-sample content
        hashes), ``shards`` (sorted paths) and ``species`` (counts of cat,
        dog, and samples missing from ``annotations/list.txt``).

    Raises:
        DataError: the source is missing, unreadable or empty, an archive is
            unsafe, a sample is bad and ``skip_bad`` is false, or an accepted
            feedback sample's acceptance does not verify (naming it).
        ConfigError: ``image_size`` or ``shard_size`` is below 1.
    """
    for name, value in (("image_size", image_size), ("shard_size", shard_size)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    out_dir = Path(out_dir)
    fetch = {"seed": seed, "s3_endpoint_url": s3_endpoint_url, "data_dir": data_dir}
    with _output_dir(out_dir) as (work, out):
        root = stage(source, work / "source", **fetch)
        samples = find_samples(root, origin=source)
        if not samples:
            raise DataError(f"{source}: no samples found (expected images/<id>.jpg with annotations/trimaps/<id>.png); "
                            f"accepted sources: {ACCEPTED_SOURCES}")
        species = read_species(root)
        official_test = read_official_test(root)
        accepted = []
        if feedback:
            accepted = reviews.stage_accepted(feedback, work / "feedback", s3_endpoint_url=s3_endpoint_url,
                                              trusted_keys=trusted_keys)
            samples = _merge(samples, find_samples(work / "feedback", origin=feedback))
            # The species of a feedback sample is its signed breed's.
            species.update({sample["id"]: oxford.species_of(sample["breed"]) for sample in accepted
                            if sample.get("breed")})

        hashes, skipped = [], []
        counts = {"cat": 0, "dog": 0, "unlisted": 0}
        with shard_files.ShardWriter(out, "samples", shard_size) as writer:
            for sample in samples:
                try:
                    record, digest = prepare(sample, image_size=image_size)
                except BadSample as bad:
                    if not skip_bad:
                        raise DataError(f"{sample.origin}: {bad}; fix or remove the sample, "
                                        "or skip bad samples to leave them out and list them in the report") from None
                    skipped.append({"file": bad.file, "source": sample.origin, "reason": bad.reason})
                    continue
                writer.write(record)
                hashes.append(digest)
                counts[species.get(sample.id, "unlisted")] += 1
        if not hashes:
            first = skipped[0]
            raise DataError(f"{source}: all {len(samples)} samples are bad (first: {first['file']}: {first['reason']})")
        names = writer.names
    return {
        "source": source,
        "feedback": feedback,
        "feedback_samples": accepted,
        "samples": len(hashes),
        "official_test": official_test,
        "skipped": skipped,
        "fingerprint": shard_files.fingerprint(hashes),
        "shards": [str(out_dir / name) for name in names],
        "species": counts,
    }


def transform(shards: list[str], out_dir: str | Path, *, shard_size: int = 128,
              official_test: list[str] | None = None, training_only: list[str] = ()) -> dict:
    """Split ingest shards into training, validation, test and calibration shards.

    Records are copied unchanged and in order, streaming.

    Args:
        shards: shard files written by :func:`ingest`.
        official_test: the official test ids (the ``official`` rule of
            :mod:`petseg.data.split`); None for the ``md5`` rule.
        training_only: ids that go to training only (accepted feedback, see :mod:`petseg.data.split`).
        out_dir: directory for ``<split>/<split>-NNNNN.tfrecord``; must not
            exist or be empty.
        shard_size: records per shard file.

    Returns:
        ``{"splits": {split: [paths]}, "counts": {split: n}, "manifest": {sample_id: split}}``
        with every split of :data:`petseg.data.split.SPLITS` present (possibly empty).

    Raises:
        DataError: a shard is missing or unreadable.
        ConfigError: ``shard_size`` is below 1.
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, got {shard_size}")
    out_dir = Path(out_dir)
    manifest = {}
    test_ids = frozenset(official_test) if official_test is not None else None
    training_ids = frozenset(training_only)
    with _output_dir(out_dir) as (_, out):
        writers = {split: shard_files.ShardWriter(out / split, split, shard_size) for split in SPLITS}
        try:
            for record in shard_files.read_records(shards):
                sample_id = shard_files.decode(record)["id"]
                manifest[sample_id] = split_of(sample_id, official_test=test_ids, training_only=training_ids)
                writers[manifest[sample_id]].write(record)
        finally:
            for writer in writers.values():
                writer.close()
    return {
        "splits": {split: [str(out_dir / split / name) for name in writers[split].names] for split in SPLITS},
        "counts": {split: writers[split].count for split in SPLITS},
        "manifest": manifest,
    }


# ---------------------------------------------------------------- samples


def find_samples(root: Path, *, origin: str) -> list[Sample]:
    """List the samples of an Oxford-layout directory, sorted by id.

    A sample is an ``images/*.jpg`` file; its trimap is checked later by
    :func:`prepare`. Other files in ``images/`` (the real release ships a few
    ``.mat`` files there) and macOS ``._*`` metadata files are not samples.

    Args:
        root: directory holding ``images/``.
        origin: the source it came from, for messages.

    Returns:
        Samples sorted by id.
    """
    images = root / "images"
    if not images.is_dir():
        return []
    return [Sample(path.stem, root, origin) for path in sorted(images.glob("*.jpg")) if not path.name.startswith("._")]


def read_species(root: Path) -> dict[str, str]:
    """Read ``annotations/list.txt`` into ``{sample_id: "cat" | "dog"}`` (empty if absent).

    Raises:
        DataError: a line is not ``Image CLASS-ID SPECIES BREED-ID`` with SPECIES 1 or 2.
    """
    listing = root / oxford.LIST_FILE
    return oxford.parse_species(listing.read_text()) if listing.is_file() else {}


def read_official_test(root: Path) -> list[str] | None:
    """The sorted ids of ``annotations/test.txt`` when the release ships both split files, else None.

    Raises:
        DataError: only one of ``trainval.txt`` and ``test.txt`` is present.
    """
    files = {name: root / "annotations" / f"{name}.txt" for name in oxford.OFFICIAL_LISTS}
    present = [name for name, path in files.items() if path.is_file()]
    if not present:
        return None
    if len(present) == 1:
        missing = next(name for name in files if name not in present)
        raise DataError(f"annotations/{present[0]}.txt is present but annotations/{missing}.txt is not: "
                        "the official split needs both files (or neither)")
    return sorted(oxford.listed_ids(files["test"].read_text()))


def _merge(samples: list[Sample], extra: list[Sample]) -> list[Sample]:
    known = {sample.id: sample for sample in samples}
    for sample in extra:
        if sample.id in known:
            raise DataError(f"{sample.origin}: {sample.image} has the same id as {known[sample.id].image} in "
                            f"{known[sample.id].origin}; feedback samples need new ids")
    return sorted(samples + extra, key=lambda sample: sample.id)


def prepare(sample: Sample, *, image_size: int) -> tuple[bytes, str]:
    """Check one sample and turn it into a shard record.

    Checks that the image decodes, its trimap exists and decodes as a
    single-channel image of the same size, and every trimap value is 1, 2
    or 3. The image is resized bilinearly and the trimap by nearest
    neighbour, with PIL, so the bytes are the same on every machine.

    Args:
        sample: the sample.
        image_size: side of the stored square image and trimap.

    Returns:
        The serialised record and the sample's content hash.

    Raises:
        BadSample: a check failed; names the file and what was wrong.
    """
    image_file = (sample.root / sample.image).read_bytes()
    image = _decode(image_file, sample.image, "image")
    trimap_path = sample.root / sample.trimap
    if not trimap_path.is_file():
        raise BadSample(sample.image, f"its trimap {sample.trimap} is missing")
    trimap_file = trimap_path.read_bytes()
    trimap = _decode(trimap_file, sample.trimap, "trimap")
    if trimap.mode not in ("L", "P"):
        raise BadSample(sample.trimap, f"trimap has mode {trimap.mode}; expected a single-channel 8-bit PNG")
    if trimap.size != image.size:
        raise BadSample(sample.trimap, f"trimap is {trimap.width}x{trimap.height} but {sample.image} is "
                                       f"{image.width}x{image.height} (width x height); expected the same size")
    labels = np.asarray(trimap)
    bad = ~np.isin(labels, oxford.TRIMAP_VALUES)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        values = np.unique(labels[bad]).tolist()
        raise BadSample(sample.trimap, f"trimap holds value {values[0] if len(values) == 1 else values} "
                                       f"(first at row {row}, column {column}); "
                                       "expected only 1 (pet), 2 (background), 3 (border)")

    size = (image_size, image_size)
    pixels = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR))
    mask = np.asarray(trimap.resize(size, Image.Resampling.NEAREST))
    digest = shard_files.sample_hash(sample.id, image_file, trimap_file)
    return shard_files.encode(sample.id, pixels, mask, digest), digest


def _decode(data: bytes, file: str, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:  # its message names the in-memory buffer, which differs per run
        raise BadSample(file, f"{what} does not decode (not a recognised image format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadSample(file, f"{what} does not decode ({exc})") from None
    return image


@contextmanager
def _output_dir(out_dir: Path) -> Iterator[tuple[Path, Path]]:
    """Yield ``(scratch, out)`` beside ``out_dir``; ``out`` becomes ``out_dir`` on success.

    The scratch directory is removed in every case, so a failure leaves
    ``out_dir`` as it was.
    """
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir())):
        raise DataError(f"output directory {out_dir} already exists and is not empty; choose a new or empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}-", dir=out_dir.parent) as scratch:
        with storage.staged_directory(out_dir) as out:
            yield Path(scratch), out
