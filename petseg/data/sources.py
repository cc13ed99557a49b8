"""Bring a data source into a local directory in the Oxford-IIIT Pet layout.

Sources: the embedded synthetic set, local archives or directories, http(s)
and S3 prefixes, and tensorflow-datasets. `petseg.data.warehouse.ingest` then checks and
shards what lands here.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

from petseg import oxford, storage
from petseg.data import archive, synth
from petseg.errors import DataError

ACCEPTED_SOURCES = (
    "synth:COUNT (the embedded data set), a directory holding images.tar.gz and annotations.tar.gz "
    "or the extracted images/ and annotations/, a path to images.tar.gz (annotations.tar.gz beside it), "
    "http(s)://HOST/DIR/ holding both archives, s3://BUCKET/PREFIX/ holding both archives or the extracted layout, "
    "tfds:oxford_iiit_pet"
)


_DOWNLOAD_TIMEOUT_S = 60


def stage(
    source: str, dest: Path, *, seed: int = 0, s3_endpoint_url: str | None = None, data_dir: str | None = None
) -> Path:
    """Bring a source into a local directory in the Oxford layout.

    Args:
        source: one of :data:`ACCEPTED_SOURCES`.
        dest: scratch directory for downloads and extraction.
        seed: seed of the embedded data set (``synth:COUNT``).
        s3_endpoint_url: endpoint of a non-AWS S3 server.
        data_dir: tensorflow-datasets data directory.

    Returns:
        A directory holding ``images/`` and ``annotations/`` (``dest``, or
        the source itself when it is an extracted local directory).

    Raises:
        DataError: the source does not exist, cannot be fetched, or is of no
            accepted form.
    """
    if source.startswith("synth:"):
        count = source.removeprefix("synth:")
        if not count.isdigit() or int(count) < 1:
            raise DataError(f"source {source!r}: expected synth:COUNT with COUNT a positive integer")
        images, annotations = synth.write_archives(dest / "archives", count=int(count), seed=seed)
        return _extract_pair(images, annotations, dest)
    if source.startswith(("http://", "https://")):
        return _from_http(source, dest)
    if source.startswith("s3://"):
        return _from_s3(source, dest, endpoint_url=s3_endpoint_url)
    if source.startswith("tfds:"):
        return _from_tfds(source, dest, data_dir=data_dir)
    path = Path(source)
    if path.is_file():
        return _extract_pair(path, path.with_name("annotations.tar.gz"), dest)
    if (path / "images.tar.gz").is_file():
        return _extract_pair(path / "images.tar.gz", path / "annotations.tar.gz", dest)
    if (path / "images").is_dir():
        return path
    what = "holds neither images.tar.gz nor images/" if path.is_dir() else "does not exist"
    raise DataError(f"source {source!r} {what}; accepted sources: {ACCEPTED_SOURCES}")


def _extract_pair(images: Path, annotations: Path, dest: Path) -> Path:
    if not annotations.is_file():
        raise DataError(f"{annotations} not found: annotations.tar.gz must sit beside {images.name}")
    archive.safe_extract(images, dest)
    archive.safe_extract(annotations, dest)
    return dest


def _from_http(source: str, dest: Path) -> Path:
    base = source.rsplit("/", 1)[0] if source.endswith(".tar.gz") else source.rstrip("/")
    downloads = dest / "archives"
    downloads.mkdir(parents=True)
    for name in ("images.tar.gz", "annotations.tar.gz"):
        url = f"{base}/{name}"
        try:
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                with open(downloads / name, "wb") as sink:
                    shutil.copyfileobj(response, sink)
        except urllib.error.HTTPError as exc:
            raise DataError(f"{url}: HTTP {exc.code} {exc.reason}; "
                            f"expected {base}/ to hold images.tar.gz and annotations.tar.gz") from exc
        except OSError as exc:  # URLError included: no connection, bad host, timeout
            raise DataError(f"{url}: cannot download ({getattr(exc, 'reason', exc)})") from exc
    return _extract_pair(downloads / "images.tar.gz", downloads / "annotations.tar.gz", dest)


def _from_s3(source: str, dest: Path, *, endpoint_url: str | None) -> Path:
    """Download both archives under the prefix, or else its images/ and annotations/ objects."""
    location = storage.Location(source, s3_endpoint_url=endpoint_url, what="source")
    present = set(location.names())
    archives = "images.tar.gz" in present
    if archives:
        wanted, downloads = ["images.tar.gz", "annotations.tar.gz"], dest / "archives"
    else:
        wanted, downloads = sorted(name for name in present if name.startswith(("images/", "annotations/"))), dest
    for name in wanted:
        if name not in present:
            raise DataError(f"{location.url(name)} not found: annotations.tar.gz must sit beside images.tar.gz")
        location.download(name, downloads.joinpath(*archive.safe_relative_path(name, where=source).parts))
    if archives:
        return _extract_pair(downloads / "images.tar.gz", downloads / "annotations.tar.gz", dest)
    return dest


def _from_tfds(source: str, dest: Path, *, data_dir: str | None) -> Path:
    """Write the builder's examples, with their original encoded bytes, in the Oxford layout."""
    name = source.removeprefix("tfds:")
    if name.split(":")[0] != "oxford_iiit_pet":
        raise DataError(f"source {source!r}: only tfds:oxford_iiit_pet (optionally :VERSION) is supported")
    import tensorflow_datasets as tfds  # slow to import; only this source needs it
    builder = tfds.builder(name, data_dir=data_dir)
    try:
        builder.download_and_prepare()
    except OSError as exc:
        raise DataError(f"{source}: cannot prepare the data set ({exc}); prepare it on a machine with network access "
                        "(`tfds build oxford_iiit_pet --data_dir DIR`) and pass data_dir") from exc
    # Skipping decoding keeps the JPEG and PNG bytes as released, so content hashes match the archives.
    raw = {"image": tfds.decode.SkipDecoding(), "segmentation_mask": tfds.decode.SkipDecoding()}
    (dest / "images").mkdir(parents=True)
    (dest / "annotations" / "trimaps").mkdir(parents=True)
    lines = []
    official = {"trainval": [], "test": []}  # tfds' train and test splits are the official lists
    examples = ((name, example) for name, split in (("trainval", "train"), ("test", "test"))
                for example in builder.as_dataset(split=split, decoders=raw, shuffle_files=False).as_numpy_iterator())
    for split_name, example in examples:
        file_name = example["file_name"].decode()
        if "/" in file_name or not file_name.endswith(".jpg"):
            raise DataError(f"{source}: example file_name {file_name!r} is not an Oxford image name "
                            "like Abyssinian_1.jpg")
        sample_id = file_name.removesuffix(".jpg")
        (dest / "images" / file_name).write_bytes(example["image"])
        (dest / "annotations" / "trimaps" / f"{sample_id}.png").write_bytes(example["segmentation_mask"])
        lines.append(oxford.list_line(sample_id, oxford.BREEDS[int(example["label"])]))
        official[split_name].append(lines[-1])
    (dest / oxford.LIST_FILE).write_text(oxford.LIST_HEADER + "".join(sorted(lines)))
    for name, listed in official.items():
        (dest / "annotations" / f"{name}.txt").write_text("".join(sorted(listed)))
    return dest
