"""Signing keys and signed releases: key files, trusted keys, rotation, and what a forger cannot get past."""

import json
import os
import shutil
import stat

import numpy as np
import pytest

from petseg import keys
from petseg.cli import main as petseg
from petseg.errors import ConfigError, ModelError
from petseg.lineage import verify
from petseg.release import bundle, provenance, signing


@pytest.fixture
def key_home(tmp_path, monkeypatch):
    """A configuration directory of this test's own: no key yet, nothing trusted."""
    monkeypatch.setenv("PETSEG_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv(keys.SIGNING_KEY_SETTING, raising=False)
    monkeypatch.delenv(keys.TRUSTED_KEYS_SETTING, raising=False)
    return tmp_path / "config" / "keys"


@pytest.fixture(scope="module")
def parts():
    """A small model's release files (not yet signed)."""
    import keras

    from petseg.model import calibration
    from petseg.model import unet as models

    keras.utils.set_random_seed(1)
    small = models.build("small", image_size=32, width=4)
    rng = np.random.default_rng(1)
    probs = rng.random((2, 8, 8, 3)).astype(np.float32)
    fitted = calibration.fit(probs / probs.sum(-1, keepdims=True), (rng.random((2, 8, 8, 3)) > 0.5).astype(np.float32))
    manifest = bundle.build_manifest(
        run_id="9", flow_name="PetSegFlow", model_fingerprint=models.fingerprint(small), dataset_fingerprint="d" * 64,
        code_version="c" * 40, metrics={}, settings={"seed": 1, "code": {"commit": "c" * 40, "dirty": False}},
        location="unused", image_size=32)
    return {"model_keras": models.to_bytes(small), "calibration": fitted.to_dict(), "manifest": manifest}


def test_keys_init_makes_a_private_key_only_its_owner_reads_and_trusts_its_public_key(key_home, capsys):
    assert petseg(["keys", "init"]) == 0
    private = key_home / "signing.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    identifier = keys.key_id((key_home / "signing.pub").read_bytes())
    assert identifier[:16] in capsys.readouterr().out
    assert list(keys.trusted_keys()) == [identifier]
    assert petseg(["keys", "init"]) == 2  # an existing key is kept
    assert "exists" in capsys.readouterr().err


def test_a_first_release_makes_the_key_and_a_setting_names_another(key_home, tmp_path, monkeypatch):
    setting, made = keys.ensure_signing_key()
    assert made and setting == str(key_home / "signing.key")
    assert keys.ensure_signing_key() == (setting, False)
    monkeypatch.setenv(keys.SIGNING_KEY_SETTING, str(tmp_path / "absent.key"))
    with pytest.raises(ConfigError, match="absent.key does not exist"):
        keys.ensure_signing_key()
    # A Kubernetes Secret hands the PEM itself.
    monkeypatch.setenv(keys.SIGNING_KEY_SETTING, (key_home / "signing.key").read_text())
    assert keys.private_pem(keys.ensure_signing_key()[0]) == (key_home / "signing.key").read_bytes()


def test_a_key_that_is_not_p256_is_refused(key_home, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "p384.key").write_bytes(other)
    with pytest.raises(ConfigError, match="not a P-256"):
        keys.private_pem(str(tmp_path / "p384.key"))
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(ConfigError, match="junk.key is not an unencrypted PEM private key"):
        keys.private_pem(str(tmp_path / "junk.key"))


def test_rotation_keeps_old_releases_until_the_old_key_is_retired(key_home, parts, tmp_path, capsys):
    old_release = tmp_path / "old"
    bundle.export(str(old_release), **parts)
    old = keys.key_id((key_home / "signing.pub").read_bytes())
    assert petseg(["keys", "rotate"]) == 0
    new = keys.key_id((key_home / "signing.pub").read_bytes())
    assert new != old and set(keys.trusted_keys()) == {old, new}
    new_release = tmp_path / "new"
    bundle.export(str(new_release), **parts)
    assert bundle.load_release(str(old_release)).signer == old
    assert bundle.load_release(str(new_release)).signer == new
    assert petseg(["keys", "retire", old[:12]]) == 0
    with pytest.raises(ModelError) as refused:
        bundle.load_release(str(old_release))
    assert f"signed by key {old[:16]}, which is not trusted" in str(refused.value)
    assert new[:16] in str(refused.value)  # and says which keys are
    assert bundle.load_release(str(new_release)).signer == new
    capsys.readouterr()
    assert petseg(["verify", "--release", str(old_release)]) == 1
    assert f"REFUSED release {old_release} is signed by key {old[:16]}" in capsys.readouterr().out


def test_the_trusted_keys_setting_names_a_file_or_a_directory(key_home, parts, tmp_path, monkeypatch):
    target = tmp_path / "r"
    bundle.export(str(target), **parts)
    signer = keys.key_id((key_home / "signing.pub").read_bytes())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv(keys.TRUSTED_KEYS_SETTING, str(elsewhere))
    with pytest.raises(ModelError, match=f"which is not trusted \\(trusted keys in {elsewhere}: none\\)"):
        bundle.load_release(str(target))
    monkeypatch.setenv(keys.TRUSTED_KEYS_SETTING, str(key_home / "signing.pub"))
    assert bundle.load_release(str(target)).signer == signer
    with pytest.raises(ModelError, match="which is not trusted"):
        bundle.load_release(str(target), trusted_keys=str(elsewhere / "absent.pub"))
    (elsewhere / "bad.pub").write_text("no key")
    with pytest.raises(ConfigError, match="bad.pub is not a PEM public key"):
        bundle.load_release(str(target), trusted_keys=str(elsewhere))


def test_a_release_holds_signed_slsa_provenance_of_its_files(key_home, parts, tmp_path):
    target = tmp_path / "r"
    build = {"parameters": {"seed": 1, "source": "synth:48"}, "environment": {"packages": {"keras": "3"}},
             "started": "2026-01-01T00:00:00+00:00"}
    bundle.export(str(target), build=build, **parts)
    assert sorted(p.name for p in target.iterdir()) == sorted(bundle.ALL_FILES)
    statement = signing.decode_envelope((target / signing.PROVENANCE).read_bytes())
    assert statement["_type"] == provenance.STATEMENT_TYPE and statement["predicateType"] == provenance.PREDICATE_TYPE
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    import hashlib

    assert subjects == {name: hashlib.sha256((target / name).read_bytes()).hexdigest()
                        for name in bundle.RELEASE_FILES}
    definition, details = statement["predicate"]["buildDefinition"], statement["predicate"]["runDetails"]
    assert definition["externalParameters"]["parameters"]["source"] == "synth:48"
    assert definition["internalParameters"]["environment"] == {"packages": {"keras": "3"}}
    commit = next(d for d in definition["resolvedDependencies"] if "gitCommit" in d["digest"])
    assert commit["digest"]["gitCommit"] == "c" * 40 and commit["annotations"]["dirty"] is False
    dataset = next(d for d in definition["resolvedDependencies"] if d.get("name") == "dataset")
    assert dataset["uri"] == "synth:48" and dataset["digest"]["sha256"] == "d" * 64
    assert details["metadata"]["invocationId"] == "PetSegFlow/9"
    assert details["metadata"]["startedOn"] == "2026-01-01T00:00:00+00:00" and details["metadata"]["finishedOn"]


def test_a_provenance_bundle_of_another_release_is_refused(key_home, parts, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    bundle.export(str(first), **parts)
    other = dict(parts, calibration={**parts["calibration"], "note": "other"})
    bundle.export(str(second), **other)
    forged = tmp_path / "forged"
    shutil.copytree(first, forged)
    shutil.copy(second / signing.PROVENANCE, forged / signing.PROVENANCE)
    # The model signature covers the provenance bundle: swapping it is caught there ...
    with pytest.raises(ModelError, match=f"{signing.PROVENANCE} hashes to"):
        bundle.load_release(str(forged))
    # ... and a validly signed statement about other files is caught by its subjects.
    files = bundle.release_bytes(str(first))
    statement = signing.decode_envelope((second / signing.PROVENANCE).read_bytes())
    with pytest.raises(ModelError, match="provenance statement is for another release: it records calibration.json"):
        provenance.check(statement, files, where=str(first))


def test_an_unsigned_release_is_refused(key_home, parts, tmp_path):
    target = tmp_path / "r"
    bundle.export(str(target), **parts)
    (target / signing.SIGNATURE).unlink()
    with pytest.raises(ModelError, match=f"is not signed: it has no {signing.SIGNATURE}"):
        bundle.load_release(str(target))
    with pytest.raises(verify.Refusal, match="is not signed"):
        verify.verify_release(str(target))


def test_a_rewired_model_over_the_same_weights_has_another_fingerprint():
    import keras

    from petseg.model import unet as models

    keras.utils.set_random_seed(2)
    small = models.build("small", image_size=32, width=4)
    config = json.loads(small.to_json())
    config["config"]["layers"][-1]["config"]["activation"] = "linear"  # same weights, another function
    rewired = keras.models.model_from_json(json.dumps(config))
    rewired.set_weights(small.get_weights())
    assert [w.path for w in rewired.weights] == [w.path for w in small.weights]
    assert models.fingerprint(rewired) != models.fingerprint(small)


def test_key_files_stay_private_when_the_umask_is_open(key_home):
    previous = os.umask(0)
    try:
        path, _ = keys.create()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
