"""The embedded stand-in for the Oxford-IIIT Pet data set: archives in the release's layout.

``write_archives`` draws photos of cats and dogs of the 37 Oxford breeds
(`petseg.data.scenes`) and packs them exactly as the real release does:
``images.tar.gz`` with ``images/<Breed_name>_<n>.jpg`` and
``annotations.tar.gz`` with ``annotations/list.txt``, the official split files
``annotations/trainval.txt`` and ``annotations/test.txt``, and
``annotations/trimaps/<id>.png`` (1 = pet, 2 = background, 3 = a border band a
few pixels wide). Anything that reads the real archives reads these, so the
whole workflow runs offline.

Everything comes from one ``numpy`` Generator per sample, seeded by
``(seed, index)``; archives are written with fixed tar and gzip metadata, so
the same seed gives byte-identical files.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import numpy as np

from petseg import oxford, storage
from petseg.data.scenes import BREEDS, Breed, render
from petseg.errors import ConfigError

_MTIME = 0
"""Modification time stored for every tar member (fixed for reproducible bytes)."""


def write_archives(out_dir: str | os.PathLike, *, count: int, seed: int) -> tuple[Path, Path]:
    """Write ``images.tar.gz`` and ``annotations.tar.gz`` in the Oxford layout.

    Samples are streamed into both archives one at a time, so memory does not
    grow with ``count``. The archives appear under their final names only
    when complete.

    Args:
        out_dir: directory to write into (created if missing).
        count: number of samples, at least 1.
        seed: seed of the generator; the same seed gives byte-identical files.

    Returns:
        Paths of ``images.tar.gz`` and ``annotations.tar.gz``.

    Raises:
        ConfigError: ``count`` is below 1 or ``seed`` is negative.
    """
    if count < 1:
        raise ConfigError(f"synthetic sample count must be at least 1, got {count}")
    if seed < 0:
        raise ConfigError(f"synthetic data seed must be 0 or more, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(count, seed)
    ordered = sorted(plan, key=lambda entry: entry[0])
    by_breed = sorted(plan, key=lambda e: (oxford.BREEDS.index(e[2].name), e[0]))
    listing = "".join(oxford.list_line(sid, breed.name) for sid, _, breed in by_breed)
    # The official split files (no header): within a breed, every other sample is a test sample.
    halves = {"trainval": [], "test": []}
    for sid, _, breed in by_breed:
        halves["test" if int(sid.rsplit("_", 1)[1]) % 2 == 0 else "trainval"].append(oxford.list_line(sid, breed.name))

    images_path, annotations_path = out / "images.tar.gz", out / "annotations.tar.gz"
    with (storage.replacing(images_path) as partial_images, storage.replacing(annotations_path) as partial_annotations,
          _DeterministicTar(partial_images) as images, _DeterministicTar(partial_annotations) as annotations):
        _add_dir(images, "images")
        _add_dir(annotations, "annotations")
        _add_file(annotations, oxford.LIST_FILE, (oxford.LIST_HEADER + listing).encode())
        for name, lines in sorted(halves.items()):  # members in sorted order: test.txt, then trainval.txt
            _add_file(annotations, f"annotations/{name}.txt", "".join(lines).encode())
        _add_dir(annotations, "annotations/trimaps")
        for sample_id, index, breed in ordered:
            photo, trimap = render(np.random.default_rng([seed, index]), breed)
            _add_file(images, oxford.image_file(sample_id), photo)
            _add_file(annotations, oxford.trimap_file(sample_id), trimap)
        # The partial files are private (0600); the archives are data for anyone, as open() would make them.
        for partial in (partial_images, partial_annotations):
            partial.chmod(_new_file_mode())
    return images_path, annotations_path


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process's umask."""
    umask = os.umask(0o022)  # read by setting; put back at once
    os.umask(umask)
    return 0o666 & ~umask


def _plan(count: int, seed: int) -> list[tuple[str, int, Breed]]:
    """Choose each sample's breed and name it ``<breed>_<n>`` with n counted per breed."""
    choices = np.random.default_rng(seed).integers(len(BREEDS), size=count)
    numbers: dict[str, int] = {}
    plan = []
    for index, choice in enumerate(choices):
        breed = BREEDS[int(choice)]
        numbers[breed.name] = numbers.get(breed.name, 0) + 1
        plan.append((f"{breed.name}_{numbers[breed.name]}", index, breed))
    return plan


class _DeterministicTar:
    """A gzip'd ustar archive whose bytes depend only on what is added."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        # filename="" leaves the name out of the gzip header; mtime=0 fixes its time.
        self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, mtime=0)
        self.tar = tarfile.open(fileobj=self._gzip, mode="w", format=tarfile.USTAR_FORMAT)

    def __enter__(self) -> tarfile.TarFile:
        return self.tar

    def __exit__(self, *exc_info) -> None:
        self.tar.close()
        self._gzip.close()
        self._file.close()


def _member(name: str, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime, info.mode = _MTIME, mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = _member(name, 0o755)
    info.type = tarfile.DIRTYPE
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = _member(name, 0o644)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
