"""The release format, both ways: the quality gate, the manifest, `export` (write) and `load_release` (read).

A release directory holds everything the serving process needs and nothing it
has to unpickle: ``model.keras`` (Keras format, loaded with safe_mode),
``calibration.json`` (plain arrays) and ``manifest.json`` (provenance). It
lives in a local directory or under an ``s3://`` prefix (`petseg.storage`);
a finished Metaflow run ``PetSegFlow/<id>`` holds the same three as artifacts
of its release step.

The manifest records the sha256 of the other two files (``sha256``), the
model fingerprint (a hash of the weights) and the code version. `load_release`
refuses a release that does not verify against it: a file whose bytes no
longer hash to what the manifest records, weights whose fingerprint differs,
or a manifest that records no hashes. (The manifest itself is checked against
the run's lineage graph by ``petseg verify``, which needs the run.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from petseg.calibration import Calibration
from petseg.errors import ConfigError, ModelError
from petseg.storage import Location, failures, is_s3, staged_directory

if TYPE_CHECKING:
    import keras

RELEASE_FILES = ("model.keras", "calibration.json", "manifest.json")
"""The files of a release, in the order they are written: manifest.json last, so its presence means complete."""
HASHED_FILES = ("model.keras", "calibration.json")
"""The files whose sha256 the manifest records (under ``sha256``)."""

_RUN_PATHSPEC = re.compile(r"^PetSegFlow/[^/\s]+$")


def gate(metrics: dict, *, min_miou: float, min_margin: float) -> tuple[bool, str]:
    """Decide whether a model is released, from validation figures only.

    The rule: on the validation split, the calibrated model's mIoU must reach
    the absolute floor ``min_miou`` and beat the best baseline's mIoU (see
    `petseg.baselines`) by at least ``min_margin``. The test split is not
    consulted: it stays an unbiased estimate of the released model.

    Args:
        metrics: the evaluate step's metrics, with ``metrics["validation"]["calibrated"]["miou"]``
            and ``metrics["validation"]["baselines"]``.
        min_miou: the floor.
        min_margin: the lead over the best baseline.

    Returns:
        (passed, a one-line message with the figures and the thresholds).
    """
    validation = metrics["validation"]
    miou = float(validation["calibrated"]["miou"])
    name, scored = max(validation["baselines"].items(), key=lambda item: item[1]["miou"])
    baseline = float(scored["miou"])
    figures = (f"validation mIoU {miou:.4f} (floor {min_miou:.2f}), best baseline {name} {baseline:.4f} "
               f"(required lead {min_margin:.2f}, got {miou - baseline:+.4f})")
    if miou >= min_miou and miou - baseline >= min_margin:
        return True, f"Release gate passed: {figures}."
    return False, (f"Release gate failed: {figures}; the model is not deployed "
                   "(train longer, or change --min_miou / --min_margin).")


def build_manifest(*, run_id: str, flow_name: str, model_fingerprint: str, dataset_fingerprint: str,
                   code_version: str, metrics: dict, settings: dict, location: str,
                   image_size: int) -> dict:
    """Return the release manifest: what was released, from where, and how good it is."""
    return {
        "version": f"petseg-{run_id}",
        "pathspec": f"{flow_name}/{run_id}",
        "run_id": str(run_id),
        "model_fingerprint": model_fingerprint,
        "dataset_fingerprint": dataset_fingerprint,
        "code_version": code_version,
        "location": location,
        "model_uri": location,
        "files": list(RELEASE_FILES),
        "image_size": image_size,
        "settings": settings,
        "metrics": {key: metrics[key] for key in ("raw", "calibrated", "baselines", "validation") if key in metrics},
    }


def release_files(*, model_keras: bytes, calibration: dict, manifest: dict) -> dict[str, bytes]:
    """The bytes of each release file; manifest.json records the sha256 of the others (``sha256``)."""
    files = {"model.keras": model_keras, "calibration.json": calibration_bytes(calibration)}
    sealed = {**manifest, "sha256": {name: hashlib.sha256(files[name]).hexdigest() for name in HASHED_FILES}}
    files["manifest.json"] = json.dumps(sealed, indent=2, sort_keys=True).encode()
    return files


def calibration_bytes(calibration: dict) -> bytes:
    """calibration.json as a release holds it."""
    return json.dumps(calibration, sort_keys=True).encode()


def export(target: str, *, model_keras: bytes, calibration: dict, manifest: dict,
           s3_endpoint_url: str | None = None) -> str:
    """Write a release directory (local path or s3:// prefix) and return its location.

    The manifest written records the sha256 of model.keras and calibration.json
    (`release_files`). On S3 the files are written in `RELEASE_FILES` order,
    manifest.json last: its presence means the release is complete. A local
    release appears at once or not at all (`petseg.storage.staged_directory`).

    Raises:
        ConfigError: an S3 ``target`` without a bucket.
        StorageError: a file could not be written.
    """
    files = release_files(model_keras=model_keras, calibration=calibration, manifest=manifest)
    if is_s3(target):
        location = Location(target, s3_endpoint_url=s3_endpoint_url, what="release location")
        for name in RELEASE_FILES:
            location.write_bytes(name, files[name])
        return target.rstrip("/") + "/"
    final = Path(target)
    with failures(str(final), "write the release"), staged_directory(final) as staging:
        for name in RELEASE_FILES:
            (staging / name).write_bytes(files[name])
    return str(final)


# -- loading ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Release:
    """A released model, ready to serve.

    Attributes:
        model: The Keras model.
        calibration: Its `petseg.calibration.Calibration`.
        manifest: The release manifest (version, pathspec, fingerprints, code version, ...).
        uri: Where it was loaded from.
        fingerprint: sha256 of the loaded weights (`petseg.model.fingerprint`).
    """

    model: keras.Model
    calibration: Calibration
    manifest: dict
    uri: str
    fingerprint: str

    @property
    def image_size(self) -> int:
        """Height and width of the model input, as the run recorded it in the manifest."""
        return int(self.manifest["image_size"])

    def tags(self) -> dict[str, str]:
        """The provenance every answer carries in ``meta.tags``."""
        return {
            "model_version": str(self.manifest.get("version", "")),
            "model_fingerprint": self.fingerprint,
            "dataset_fingerprint": str(self.manifest.get("dataset_fingerprint", "")),
            "pathspec": str(self.manifest.get("pathspec", "")),
            "code_version": str(self.manifest.get("code_version", "")),
            "code_package": str((self.manifest.get("settings") or {}).get("code", {}).get("code_package") or ""),
        }


def load_release(
    uri: str, *, expected_fingerprint: str | None = None, s3_endpoint_url: str | None = None
) -> Release:
    """Loads a release and checks its model fingerprint.

    Args:
        uri: A local release directory (model.keras, calibration.json,
            manifest.json), an ``s3://bucket/prefix`` holding the same files,
            or a Metaflow run ``PetSegFlow/<id>`` whose release step holds
            ``model_keras``, ``calibration`` and ``manifest``.
        expected_fingerprint: When given, the model's fingerprint must equal it.
        s3_endpoint_url: Endpoint of a non-AWS S3 server.

    Returns:
        The release.

    Raises:
        ModelError: The release is missing, incomplete or unreadable, or does
            not verify: its files do not hash to what its manifest records
            (or it records nothing), or its weights do not match
            ``expected_fingerprint`` or its manifest.
        StorageError: A file of an ``s3://`` release could not be read.
        ConfigError: ``uri`` is none of the accepted forms.
    """
    from petseg import model as models  # Keras: only a loader needs it

    if not uri:
        raise ConfigError("no model to serve: expected a release directory, s3://bucket/prefix or PetSegFlow/<id>")
    if is_s3(uri):
        with tempfile.TemporaryDirectory() as tmp:
            _download_release(Location(uri, s3_endpoint_url=s3_endpoint_url, what="release"), Path(tmp))
            model, calibration, manifest = _release_in_folder(Path(tmp), uri=uri)
    elif Path(uri).is_dir():
        model, calibration, manifest = _release_in_folder(Path(uri), uri=uri)
    elif _RUN_PATHSPEC.match(uri):
        model, calibration, manifest = _release_of_run(uri)
    else:
        raise ConfigError(f"model URI {uri!r} is not a directory, s3://bucket/prefix or PetSegFlow/<id>")
    release = Release(model, calibration, manifest, str(uri), models.fingerprint(model))
    _check_fingerprint(release, expected_fingerprint)
    return release


def _download_release(location: Location, folder: Path) -> None:
    missing = [name for name in RELEASE_FILES if not location.exists(name)]
    if missing:
        raise ModelError(f"release {location.root} lacks {', '.join(missing)}: expected {', '.join(RELEASE_FILES)}")
    for name in RELEASE_FILES:
        location.download(name, folder / name)


def _release_in_folder(folder: Path, *, uri: str) -> tuple[keras.Model, Calibration, dict]:
    from petseg import model as models

    missing = [name for name in RELEASE_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"release directory {folder} lacks {', '.join(missing)}: expected {', '.join(RELEASE_FILES)}")
    manifest = _read_json(folder / "manifest.json")
    check_files(manifest, {name: (folder / name).read_bytes() for name in HASHED_FILES}, uri=uri)
    model = models.load(folder / "model.keras")
    return model, Calibration.load(folder / "calibration.json"), manifest


def check_files(manifest: dict, files: dict[str, bytes], *, uri: str) -> None:
    """Check release files against the sha256 their manifest records.

    Raises:
        ModelError: the manifest records no hashes, or a file does not hash to
            its record (naming the file, the expected and the found hash).
    """
    recorded = manifest.get("sha256")
    if not isinstance(recorded, dict) or not all(recorded.get(name) for name in HASHED_FILES):
        raise ModelError(f"release {uri} does not verify: its manifest records no sha256 of "
                         f"{' and '.join(HASHED_FILES)}; export it again with this petseg")
    for name in HASHED_FILES:
        found = hashlib.sha256(files[name]).hexdigest()
        if found != recorded[name]:
            raise ModelError(f"release {uri} does not verify: {name} hashes to {found} but its manifest records "
                             f"{recorded[name]}; refusing to serve it (see `petseg verify --release {uri}`)")


def _check_fingerprint(release: Release, expected: str | None) -> None:
    size, model_size = release.manifest.get("image_size"), release.model.input_shape[1]
    if size != model_size:
        raise ModelError(f"release {release.uri} is inconsistent: its manifest records image_size {size!r} "
                         f"but the model takes {model_size}x{model_size} images")
    recorded = release.manifest.get("model_fingerprint")
    if expected and expected != release.fingerprint:
        raise ModelError(
            f"model fingerprint mismatch for {release.uri}: MODEL_FINGERPRINT is {expected} "
            f"but the model's weights hash to {release.fingerprint}; refusing to serve another model"
        )
    if recorded and recorded != release.fingerprint:
        raise ModelError(
            f"release {release.uri} is inconsistent: its manifest records model fingerprint {recorded} "
            f"but the model's weights hash to {release.fingerprint}"
        )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"release file {path} is not readable JSON: {err}") from None


def _release_of_run(pathspec: str) -> tuple[keras.Model, Calibration, dict]:
    # Metaflow only here: a server of a release directory or S3 prefix never imports it.
    from metaflow import Run
    from metaflow.exception import MetaflowException

    from petseg import model as models

    try:
        # Serve a run of any user or namespace: the pathspec names it exactly.
        data = Run(pathspec, _namespace_check=False)["release"].task.data
        model_keras, calibration, manifest = data.model_keras, data.calibration, data.manifest
    except (MetaflowException, KeyError, AttributeError) as err:
        raise ModelError(
            f"run {pathspec} has no released model ({type(err).__name__}: {err}); "
            "expected a finished run whose release step passed the quality gate"
        ) from None
    if not manifest:
        raise ModelError(f"run {pathspec} did not release a model: its quality gate failed")
    check_files(manifest, {"model.keras": model_keras, "calibration.json": calibration_bytes(calibration)},
                uri=pathspec)
    return models.from_bytes(model_keras), Calibration.from_dict(calibration), manifest
