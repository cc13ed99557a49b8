"""A real run's signed release, tried as an attacker would: each forgery is refused by `petseg verify` and by
both model servers at start-up, naming what failed; the upstream model signing CLI accepts the real release.

The session's released run is copied to a temporary directory and forged there; the run's own release is
changed (and put back) only to check that `petseg verify RUN` and `--model` refuse it the same way.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO
from petseg import keys
from petseg.deploy import local
from petseg.errors import ServingError
from petseg.release import bundle, signing


def petseg(*args):
    return subprocess.run([sys.executable, "-m", "petseg", *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def release_dir(released_run) -> Path:
    return Path(released_run["release"].task.data.manifest["location"])


def _copy(release_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / release_dir.name
    shutil.copytree(release_dir, copy)
    return copy


def _unsigned(folder: Path, tmp_path: Path) -> str:
    (folder / signing.SIGNATURE).unlink()
    return f"is not signed: it has no {signing.SIGNATURE}"


def _untrusted_key(folder: Path, tmp_path: Path) -> str:
    """Signed again, properly, by a key nobody trusts."""
    stranger, _ = keys.create(private=tmp_path / "stranger" / "signing.key", trusted=tmp_path / "stranger" / "trusted")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("sha256")
    files, signer = bundle.signed_files(model_keras=(folder / "model.keras").read_bytes(),
                                        calibration=json.loads((folder / "calibration.json").read_text()),
                                        manifest=manifest, signing_key=str(stranger))
    for name in bundle.ALL_FILES:
        (folder / name).write_bytes(files[name])
    return f"signed by key {signer[:16]}, which is not trusted"


def _consistent_forgery(folder: Path, tmp_path: Path) -> str:
    """A rewritten calibration table, and the manifest's hash of it rewritten to match."""
    table = json.loads((folder / "calibration.json").read_text())
    forged = bundle.calibration_bytes({**table, "forged": True})
    (folder / "calibration.json").write_bytes(forged)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"]["calibration.json"] = hashlib.sha256(forged).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    assert bundle.check_files(manifest, {name: (folder / name).read_bytes() for name in bundle.HASHED_FILES},
                              uri=str(folder)) is None  # the hashes alone would pass
    return f"calibration.json hashes to {hashlib.sha256(forged).hexdigest()} but was signed as"


def _other_provenance(folder: Path, tmp_path: Path) -> str:
    """The provenance statement of another release, signed by the trusted key."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("sha256")
    other = dict(manifest, pathspec="PetSegFlow/1", run_id="1", version="petseg-1")
    files, _ = bundle.signed_files(model_keras=(folder / "model.keras").read_bytes(),
                                   calibration=json.loads((folder / "calibration.json").read_text()),
                                   manifest=other, signing_key=keys.signing_key_setting())
    (folder / signing.PROVENANCE).write_bytes(files[signing.PROVENANCE])
    return f"{signing.PROVENANCE} hashes to"


def _missing_run(folder: Path, tmp_path: Path) -> str:
    """The manifest's run pathspec pointed at a run that does not exist."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["pathspec"] = "PetSegFlow/999999999"
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return "manifest.json hashes to"


def _file_added(folder: Path, tmp_path: Path) -> str:
    """One file more, which Python would run at start-up if the folder were on its path."""
    (folder / "sitecustomize.py").write_text("import os\n")
    return "holds sitecustomize.py, which its signature does not cover"


FORGERIES = {"unsigned": _unsigned, "untrusted key": _untrusted_key, "rewritten file and hash": _consistent_forgery,
             "provenance of another release": _other_provenance, "run that does not exist": _missing_run,
             "a file added": _file_added}


@pytest.fixture(scope="module", params=list(FORGERIES))
def forged(request, release_dir, tmp_path_factory) -> tuple[Path, str]:
    tmp_path = tmp_path_factory.mktemp("forged")
    folder = _copy(release_dir, tmp_path)
    return folder, FORGERIES[request.param](folder, tmp_path)


def test_the_upstream_model_signing_cli_verifies_the_release(release_dir):
    signer = signing.signer_of((release_dir / signing.SIGNATURE).read_bytes())
    public_key = keys.trusted_keys()[signer]
    result = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(release_dir),
                             "--signature", str(release_dir / signing.SIGNATURE), "--public_key", str(public_key)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verification succeeded" in result.stdout + result.stderr


def test_verify_names_the_signer_of_the_real_release(released_run, release_dir):
    signer = signing.signer_of((release_dir / signing.SIGNATURE).read_bytes())
    for args in (("--release", str(release_dir)), (released_run.id,)):
        result = petseg("verify", *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f", signed by key {signer[:16]}: " in result.stdout
    assert sorted(path.name for path in release_dir.iterdir()) == sorted(bundle.ALL_FILES)


def test_verify_refuses_the_forgery(forged):
    folder, reason = forged
    result = petseg("verify", "--release", str(folder))
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"REFUSED release {folder} ") and reason in line


@pytest.mark.parametrize("server", local.SERVERS)
def test_servers_refuse_to_start_from_the_forgery(forged, server, tmp_path):
    folder, reason = forged
    log = tmp_path / "serving.log"
    with pytest.raises(ServingError) as refused:
        local.deploy_local(folder, server=server, log_path=log, timeout=300)
    assert "exited with status" in str(refused.value)
    assert f"refusing to serve {folder}" in log.read_text() and reason in log.read_text()


def test_a_signed_release_of_a_run_that_does_not_exist_fails_verify(release_dir, tmp_path):
    """Signed with the trusted key (someone who holds it), naming a run this Metaflow does not know."""
    manifest = json.loads((release_dir / "manifest.json").read_text())
    manifest.pop("sha256")
    manifest["pathspec"] = "PetSegFlow/999999999"
    files, _ = bundle.signed_files(model_keras=(release_dir / "model.keras").read_bytes(),
                                   calibration=json.loads((release_dir / "calibration.json").read_text()),
                                   manifest=manifest, signing_key=keys.signing_key_setting())
    target = bundle.write(str(tmp_path / "ghost"), files)
    result = petseg("verify", "--release", target)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("MISMATCH the run the release names does not match: expected a finished run "
                                    "PetSegFlow/999999999 known to this Metaflow, found no such run")


def test_verify_of_the_run_and_of_its_model_refuse_its_release_unsigned(released_run, release_dir):
    signature = release_dir / signing.SIGNATURE
    original = signature.read_bytes()
    fingerprint = released_run["release"].task.data.manifest["model_fingerprint"]
    signature.unlink()
    try:
        results = [petseg("verify", released_run.id), petseg("verify", "--model", fingerprint[:16])]
    finally:
        signature.write_bytes(original)
    for result in results:
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"REFUSED release {release_dir} is not signed" in result.stdout
    assert petseg("verify", released_run.id).returncode == 0
