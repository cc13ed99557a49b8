"""The release format, both ways: the manifest, `export` (signed) and `load_release` (verified).

A release directory holds everything the serving process needs and nothing it
has to unpickle: ``model.keras`` (Keras format, loaded with safe_mode),
``calibration.json`` (plain arrays), ``manifest.json`` (what was released, the
sha256 of the other two, the model fingerprint over architecture and weights),
``provenance.sigstore.json`` (SLSA v1 provenance, signed) and ``model.sig``
(the OpenSSF model signature over every file), and nothing else: what serving
it writes (a deployment's record and log, feedback) lives outside it
(`petseg.layout`). It lives in a local directory or under an ``s3://`` prefix
(`petseg.storage`), a run's under `petseg.layout.Layout.release`. (A finished
Metaflow run holds the same files as artifacts of its release step, but
artifacts are pickles: a release is never loaded from them.)

`load_release` reads every file once and refuses a release that does not
verify, in this order: a file that is not one of the release's (the signature
does not cover it), no signature or a signer that is not trusted
(`petseg.keys`), a file that differs from what was signed, provenance of other
files (`petseg.release.provenance`), a file whose bytes do not hash to what the
manifest records, another release than the model server was told to load, a
model whose fingerprint differs. The bytes it checked are the bytes it loads.
(``petseg verify`` also checks the manifest against the run's lineage graph.)
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from petseg import keys
from petseg.errors import ConfigError, ModelError
from petseg.layout import Layout, is_model_of, release_name
from petseg.model.calibration import MASK_SOURCES, Calibration
from petseg.release import provenance, signing
from petseg.storage import Location, failures, is_s3, staged_directory

if TYPE_CHECKING:
    import keras

RELEASE_FILES = ("model.keras", "calibration.json", "manifest.json")
"""The files a release is about (the provenance statement's subjects)."""
SIGNATURE_FILES = (signing.PROVENANCE, signing.SIGNATURE)
"""The signed provenance and the model signature over every file."""
ALL_FILES = RELEASE_FILES + SIGNATURE_FILES
"""Every file of a signed release, in the order it is written: model.sig last, so its presence means complete."""
HASHED_FILES = ("model.keras", "calibration.json")
"""The files whose sha256 the manifest records (under ``sha256``)."""

_RUN_PATHSPEC = re.compile(r"^PetSegFlow/[^/\s]+$")


def build_manifest(*, run_id: str, flow_name: str, model_fingerprint: str, dataset_fingerprint: str,
                   code_version: str, metrics: dict, settings: dict, location: str,
                   image_size: int, replaces: dict | None = None) -> dict:
    """Return the release manifest: what was released, from where, how good it is, which mask it serves
    (``mask_source``) and the champion it replaces (``replaces``: None for a first release)."""
    return {
        "version": release_name(run_id),
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
        "mask_source": metrics.get("mask", {}).get("source", "calibrated"),
        "replaces": replaces,
        "metrics": {key: metrics[key] for key in ("raw", "calibrated", "baselines", "validation", "mask")
                    if key in metrics},
    }


def release_files(*, model_keras: bytes, calibration: dict, manifest: dict) -> dict[str, bytes]:
    """The bytes of each release file; manifest.json records the sha256 of the others (``sha256``)."""
    files = {"model.keras": model_keras, "calibration.json": calibration_bytes(calibration)}
    sealed = {**manifest, "sha256": {name: hashlib.sha256(files[name]).hexdigest() for name in HASHED_FILES}}
    files["manifest.json"] = json.dumps(sealed, indent=2, sort_keys=True).encode()
    return files


def file_hashes(manifest: dict, signatures: dict[str, bytes]) -> dict[str, str]:
    """The sha256 of every file of a signed release, from its sealed manifest (which records the others') and
    its signature files."""
    hashes = {**manifest["sha256"], "manifest.json": hashlib.sha256(json.dumps(manifest, indent=2, sort_keys=True)
                                                                    .encode()).hexdigest()}
    return {**hashes, **{name: hashlib.sha256(data).hexdigest() for name, data in signatures.items()}}


def calibration_bytes(calibration: dict) -> bytes:
    """calibration.json as a release holds it."""
    return json.dumps(calibration, sort_keys=True).encode()


def signed_files(*, model_keras: bytes, calibration: dict, manifest: dict, signing_key: str,
                 build: dict | None = None) -> tuple[dict[str, bytes], str]:
    """Every file of a signed release, and the id of the key that signed it.

    The release files (`release_files`), the SLSA provenance statement about
    them signed as ``provenance.sigstore.json``, and the model signature over
    all of them, ``model.sig`` (`petseg.release.signing`).

    Args:
        signing_key: the P-256 private key: a path or PEM text (`petseg.keys.signing_key_setting`).
        build: what the provenance records beyond the manifest: ``parameters`` (every run
            parameter), ``environment`` (the training process's record) and ``started``
            (the run's start, RFC 3339); missing ones are recorded empty.

    Raises:
        ConfigError: the signing key is missing or not a P-256 private key.
    """
    build = build or {}
    files = release_files(model_keras=model_keras, calibration=calibration, manifest=manifest)
    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    statement = provenance.statement(files, manifest=json.loads(files["manifest.json"]),
                                     parameters=build.get("parameters") or {}, environment=build.get("environment"),
                                     started=build.get("started") or finished, finished=finished)
    private_pem = keys.private_pem(signing_key)
    with tempfile.TemporaryDirectory(prefix="petseg-sign-") as tmp:
        folder = Path(tmp)
        for name in RELEASE_FILES:
            (folder / name).write_bytes(files[name])
        signer = signing.sign_directory(folder, private_pem=private_pem, provenance=statement)
        for name in SIGNATURE_FILES:
            files[name] = (folder / name).read_bytes()
    return files, signer


def export(target: str, *, model_keras: bytes, calibration: dict, manifest: dict, signing_key: str | None = None,
           build: dict | None = None, s3_endpoint_url: str | None = None) -> str:
    """Write a signed release directory (local path or s3:// prefix) and return its location.

    Args:
        signing_key: a path or PEM text; default the user's key (`petseg.keys.ensure_signing_key`:
            made and trusted on first use).
        build: what the provenance records beyond the manifest (see `signed_files`).

    Raises:
        ConfigError: an S3 ``target`` without a bucket, or no usable signing key.
        StorageError: a file could not be written.
    """
    files, _ = signed_files(model_keras=model_keras, calibration=calibration, manifest=manifest,
                            signing_key=signing_key or keys.ensure_signing_key()[0], build=build)
    return write(target, files, s3_endpoint_url=s3_endpoint_url)


def publish(layout: Layout, *, run_id: str, flow_name: str, model_keras: bytes, calibration: dict, metrics: dict,
            settings: dict, dataset_fingerprint: str, model_fingerprint: str, signing_key: str, build: dict,
            replaces: dict | None = None, s3_endpoint_url: str | None = None) -> tuple[dict[str, bytes], str, str]:
    """Build a run's manifest, sign its release and write it to the run's release location (`Layout.release`).

    Returns:
        (every file's bytes by name, the release's location, the id of the key that signed it).
    """
    location = layout.release(run_id)
    document = build_manifest(run_id=run_id, flow_name=flow_name, model_fingerprint=model_fingerprint,
                              dataset_fingerprint=dataset_fingerprint, code_version=settings["code_version"],
                              metrics=metrics, settings=settings, location=location, image_size=settings["image_size"],
                              replaces=replaces)
    files, signer = signed_files(model_keras=model_keras, calibration=calibration, manifest=document,
                                 signing_key=signing_key, build=build)
    return files, write(location, files, s3_endpoint_url=s3_endpoint_url), signer


def write(target: str, files: dict[str, bytes], *, s3_endpoint_url: str | None = None) -> str:
    """Write the files of a signed release (`signed_files`) to a directory or s3:// prefix; its location.

    On S3 the files are written in `ALL_FILES` order, the signature last: its
    presence means the release is complete. A local release appears at once or
    not at all (`petseg.storage.staged_directory`).
    """
    if is_s3(target):
        location = Location(target, s3_endpoint_url=s3_endpoint_url, what="release location")
        for name in ALL_FILES:
            location.write_bytes(name, files[name])
        return target.rstrip("/") + "/"
    final = Path(target)
    with failures(str(final), "write the release"), staged_directory(final) as staging:
        for name in ALL_FILES:
            (staging / name).write_bytes(files[name])
    return str(final)


# -- loading ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Release:
    """A released model, ready to serve.

    Attributes:
        model: The Keras model.
        calibration: Its `petseg.model.calibration.Calibration`.
        manifest: The release manifest (version, pathspec, fingerprints, code version, ...).
        uri: Where it was loaded from.
        fingerprint: sha256 of the loaded architecture and weights (`petseg.model.unet.fingerprint`).
        signer: The id of the key that signed it (`petseg.keys.key_id`).
    """

    model: keras.Model
    calibration: Calibration
    manifest: dict
    uri: str
    fingerprint: str
    signer: str = ""

    @property
    def mask_source(self) -> str:
        """The probabilities its served mask comes from: ``calibrated`` or ``raw``, chosen on validation data
        (`petseg.model.calibration.mask_source`); releases from before the choice serve the calibrated mask."""
        return str(self.manifest.get("mask_source", "calibrated"))

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
            "signer": self.signer,
            "mask_source": self.mask_source,
        }


def load_release(
    uri: str, *, expected_fingerprint: str | None = None, s3_endpoint_url: str | None = None,
    trusted_keys: str | None = None, model_name: str | None = None,
) -> Release:
    """Loads a release once it verifies: its files and signature first, then its hashes and fingerprint.

    Every file is read once into memory; those bytes are verified (`verify_files`)
    and those bytes are loaded, so a file cannot change between check and use.

    Args:
        uri: A local release directory or an ``s3://bucket/prefix`` holding the same files.
        expected_fingerprint: When given, the model's fingerprint must equal it.
        s3_endpoint_url: Endpoint of a non-AWS S3 server.
        trusted_keys: A public key file or directory; default `petseg.keys.trusted_keys_setting`.
        model_name: When given, the name a model server gives the model: it must be the signed
            manifest's release's (`petseg.layout.is_model_of`), checked before the model is loaded.

    Returns:
        The release.

    Raises:
        ModelError: The release is missing, incomplete or unreadable, or does
            not verify: a file the signature does not cover, unsigned, signed by a
            key that is not trusted, a file that differs from what was signed,
            provenance of other files, files that do not hash to what the manifest
            records, another release than ``model_name``'s, or weights and
            architecture that do not match ``expected_fingerprint`` or the manifest.
        StorageError: A file of an ``s3://`` release could not be read.
        ConfigError: ``uri`` is none of the accepted forms (a Metaflow run among them), or a trusted
            key is unreadable.
    """
    from petseg.model import unet as models  # Keras: only a loader needs it

    files = release_bytes(uri, s3_endpoint_url=s3_endpoint_url)
    verified = verify_files(files, uri=uri, trusted_keys=trusted_keys)
    if model_name is not None and not is_model_of(model_name, str(verified.manifest.get("version", ""))):
        raise ModelError(f"release {uri} is {verified.manifest.get('version')!r}, but the model server was told to "
                         f"serve it as model {model_name!r}, another release's: the model settings that name the "
                         "release point at another one than the Model; refusing it (write them again with "
                         "`petseg.deploy.kubernetes.write_model_settings`)")
    model = models.from_bytes(files["model.keras"])
    calibration = Calibration.from_dict(_parse_json(files["calibration.json"], f"{uri} calibration.json"))
    release = Release(model, calibration, verified.manifest, str(uri), models.fingerprint(model), verified.signer)
    _check_fingerprint(release, expected_fingerprint)
    return release


@dataclasses.dataclass(frozen=True)
class Verified:
    """What a verified release proved: its manifest, the id of the key that signed it, its provenance statement."""

    manifest: dict
    signer: str
    provenance: dict


def verify_files(files: dict[str, bytes], *, uri: str, trusted_keys: str | None = None) -> Verified:
    """Verify a release's files, in order: the model signature and the signed provenance (against the trusted
    keys), that the provenance is about these files, then the sha256 the manifest records.

    The bytes are written to a private temporary directory for the model
    signing library and checked there; the caller loads the same bytes.

    Raises:
        ModelError: the first check that failed, naming it.
        ConfigError: a trusted key is unreadable.
    """
    setting = trusted_keys or keys.trusted_keys_setting()
    trusted = keys.trusted_keys(setting)
    with tempfile.TemporaryDirectory(prefix="petseg-verify-release-") as tmp:
        folder = Path(tmp)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        signer, statement = signing.verify_directory(folder, trusted=trusted, where=uri, setting=setting)
    provenance.check(statement, files, where=uri)
    manifest = _parse_json(files["manifest.json"], f"{uri} manifest.json")
    check_files(manifest, files, uri=uri)
    return Verified(manifest, signer, statement)


def release_bytes(uri: str, *, s3_endpoint_url: str | None = None) -> dict[str, bytes]:
    """The bytes of a release's files (`ALL_FILES`, those present), read once.

    Raises:
        ModelError: the release is missing, lacks a file of `RELEASE_FILES`, or holds anything else
            (which its signature does not cover), naming it.
        StorageError: an ``s3://`` file could not be read.
        ConfigError: ``uri`` is none of the accepted forms: a Metaflow run ``PetSegFlow/<id>`` is refused,
            saying where its release is.
    """
    if not uri:
        raise ConfigError("no model to serve: expected a release directory or s3://bucket/prefix")
    if is_s3(uri):
        location = Location(uri, s3_endpoint_url=s3_endpoint_url, what="release")
        present = location.names()
        _refuse_unsigned(uri, present)
        files = {name: location.read_bytes(name) for name in ALL_FILES if name in present}
    elif Path(uri).is_dir():
        folder = Path(uri)
        with failures(uri, "read the release"):
            _refuse_unsigned(uri, [entry.name for entry in folder.iterdir()])
            files = {name: (folder / name).read_bytes() for name in ALL_FILES if (folder / name).is_file()}
    elif _RUN_PATHSPEC.match(uri):
        raise ConfigError(f"model URI {uri} is a Metaflow run, whose artifacts are pickles that nothing checked: "
                          "a model server loads only a signed release. Serve the run's release directory "
                          "(`petseg serve RUN` finds it: <datastore root>/petseg/releases/petseg-<run id>)")
    else:
        raise ConfigError(f"model URI {uri!r} is not a release directory or s3://bucket/prefix")
    missing = [name for name in RELEASE_FILES if name not in files]
    if missing:
        raise ModelError(f"release {uri} lacks {', '.join(missing)}: expected {', '.join(ALL_FILES)}")
    return files


def _refuse_unsigned(uri: str, names: list[str]) -> None:
    """Refuse a release holding anything but `ALL_FILES`: its signature covers those and nothing else."""
    extra = sorted(set(names) - set(ALL_FILES))
    if extra:
        raise ModelError(f"release {uri} holds {', '.join(extra)}, which its signature does not cover (a signed "
                         f"release holds {', '.join(ALL_FILES)} and nothing else); refusing it: remove what was added")


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
    if release.mask_source not in MASK_SOURCES:
        raise ModelError(f"release {release.uri} is inconsistent: its manifest field 'mask_source' is "
                         f"{release.manifest.get('mask_source')!r}, expected one of {', '.join(MASK_SOURCES)}")
    size, model_size = release.manifest.get("image_size"), release.model.input_shape[1]
    if size != model_size:
        raise ModelError(f"release {release.uri} is inconsistent: its manifest records image_size {size!r} "
                         f"but the model takes {model_size}x{model_size} images")
    recorded = release.manifest.get("model_fingerprint")
    if expected and expected != release.fingerprint:
        raise ModelError(
            f"model fingerprint mismatch for {release.uri}: MODEL_FINGERPRINT is {expected} "
            f"but the model's architecture and weights hash to {release.fingerprint}; refusing to serve another model"
        )
    if recorded and recorded != release.fingerprint:
        raise ModelError(
            f"release {release.uri} is inconsistent: its manifest records model fingerprint {recorded} "
            f"but the model's architecture and weights hash to {release.fingerprint}"
        )


def _parse_json(data: bytes, what: str) -> dict:
    try:
        return json.loads(data)
    except ValueError as err:
        raise ModelError(f"release file {what} is not readable JSON: {err}") from None
