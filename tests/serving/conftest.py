"""What the serving tier shares: one release, and one server of each kind for the whole session.

The release is a small model trained for two steps on random data, with its
calibration. Both servers (`petseg.deploy.local.deploy_local`) serve it with
small limits, so that "too large" is cheap to send (and MLServer reads
`MAX_BODIES` bodies at once): ``server`` is the Seldon
microservice, ``mlserver`` the MLServer runtime (Open Inference Protocol).
Both take the session's tokens file (`petseg.tokens`, where clients read it
too): ``tester`` may predict and send feedback, ``viewer`` only predict,
``ops`` is an operator; ``http`` sends the tester's token.
"""

import json
import shutil

import keras
import numpy as np
import pytest
import requests
from serving_support import FEEDBACK_QUOTA, MAX_BODIES, MAX_IMAGE_BYTES, MAX_LIST_PIXELS, MAX_PIXELS, TOKENS

from petseg import tokens
from petseg.deploy import local
from petseg.model import calibration
from petseg.model import unet as models
from petseg.release import bundle


@pytest.fixture(scope="session")
def tokens_file():
    """The session's tokens file, where servers and clients find it by default."""
    path = tokens.tokens_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"identity": name, "token": secret, "roles": roles} for name, (secret, roles) in TOKENS.items()]
    path.write_text(json.dumps({"tokens": entries}))
    path.chmod(0o600)  # servers refuse a tokens file others can read
    yield path
    path.unlink()


@pytest.fixture(scope="session")
def release_dir(tmp_path_factory):
    """A release of a small model trained for two steps on random data, with its calibration."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.random((4, 128, 128, 3), dtype=np.float32)
    masks = (rng.random((4, 128, 128, 3)) > 0.5).astype(np.float32)
    small = models.build("small")
    small.compile(optimizer="adam", loss="binary_crossentropy")
    small.fit(images, masks, batch_size=2, epochs=1, verbose=0)
    # A subsample keeps the isotonic fit quick.
    fitted = calibration.fit(small.predict_on_batch(images)[:, ::8, ::8], masks[:, ::8, ::8])
    target = tmp_path_factory.mktemp("release") / "petseg-test"
    manifest = bundle.build_manifest(
        run_id="1234", flow_name="PetSegFlow", model_fingerprint=models.fingerprint(small),
        dataset_fingerprint="d" * 64, code_version="0.1.0+test", metrics={"raw": {}, "calibrated": {}},
        settings={}, location=str(target), image_size=small.input_shape[1])
    bundle.export(str(target), model_keras=models.to_bytes(small), calibration=fitted.to_dict(), manifest=manifest)
    return target


@pytest.fixture(scope="session")
def manifest(release_dir):
    return json.loads((release_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tags(release_dir, manifest):
    """The provenance every answer carries: the release's tags, which name what the manifest records."""
    recorded = {
        "model_version": manifest["version"],
        "model_fingerprint": manifest["model_fingerprint"],
        "dataset_fingerprint": manifest["dataset_fingerprint"],
        "pathspec": manifest["pathspec"],
        "code_version": manifest["code_version"],
    }
    released = bundle.load_release(str(release_dir)).tags()
    assert {key: released[key] for key in recorded} == recorded
    return released


def _deploy(release_dir, manifest, tmp_path_factory, **options) -> dict:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MAX_PIXELS", str(MAX_PIXELS))
        env.setenv("MAX_IMAGE_BYTES", str(MAX_IMAGE_BYTES))
        env.setenv("FEEDBACK_QUOTA", str(FEEDBACK_QUOTA))
        env.setenv("MAX_LIST_PIXELS", str(MAX_LIST_PIXELS))
        env.setenv("MAX_BODIES", str(MAX_BODIES))
        return local.deploy_local(
            release_dir, log_path=tmp_path_factory.mktemp("logs") / "serving.log", timeout=300,
            fingerprint=manifest["model_fingerprint"], **options)


@pytest.fixture(scope="session")
def server(release_dir, manifest, tmp_path_factory, tokens_file):
    """The Seldon microservice, with a feedback store."""
    feedback_dir = tmp_path_factory.mktemp("feedback")
    deployment = _deploy(release_dir, manifest, tmp_path_factory, feedback_uri=str(feedback_dir))
    deployment["feedback_dir"] = feedback_dir
    yield deployment
    local.stop_local(deployment["pid"])


@pytest.fixture(scope="session")
def mlserver(release_dir, manifest, tmp_path_factory, tokens_file):
    """MLServer with the petseg runtime: Open Inference Protocol over REST (``url``) and gRPC (``grpc_port``)."""
    feedback_dir = tmp_path_factory.mktemp("feedback-v2")
    # A copy of the release: each local deployment records itself in its release directory.
    copy = shutil.copytree(release_dir, tmp_path_factory.mktemp("release-v2") / release_dir.name)
    deployment = _deploy(copy, manifest, tmp_path_factory, server="mlserver", feedback_uri=str(feedback_dir))
    deployment["feedback_dir"] = feedback_dir
    yield deployment
    local.stop_local(deployment["pid"])


@pytest.fixture(scope="session")
def http(tokens_file):
    """A session that sends the ``tester`` token."""
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {TOKENS['tester'][0]}"
        yield session
