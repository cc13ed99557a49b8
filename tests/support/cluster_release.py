"""What the cluster tier's serving pods serve: a small model's signed release in the cluster's S3, bearer tokens."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PREDICT = "predict-" + "p" * 40
FEEDBACK = "feedback-" + "f" * 40
TOKENS_SECRET = "petseg-serving-tokens"
REPO = Path(__file__).resolve().parents[2]
RELEASE_SCRIPT = (
    "import json, sys\n"
    "import keras, numpy as np\n"
    "from petseg.model import calibration, unet as models\n"
    "from petseg.release import bundle\n"
    "target, key = sys.argv[1], sys.argv[2]\n"
    "keras.utils.set_random_seed(0)\n"
    "rng = np.random.default_rng(0)\n"
    "images = rng.random((4, 128, 128, 3), dtype=np.float32)\n"
    "masks = (rng.random((4, 128, 128, 3)) > 0.5).astype(np.float32)\n"
    "small = models.build('small')\n"
    "small.compile(optimizer='adam', loss='binary_crossentropy')\n"
    "small.fit(images, masks, batch_size=2, epochs=1, verbose=0)\n"
    "fitted = calibration.fit(small.predict_on_batch(images)[:, ::8, ::8], masks[:, ::8, ::8])\n"
    "manifest = bundle.build_manifest(run_id='4242', flow_name='PetSegFlow',\n"
    "    model_fingerprint=models.fingerprint(small), dataset_fingerprint='d' * 64, code_version='0.1.0+test',\n"
    "    metrics={'raw': {}, 'calibrated': {}}, settings={}, location=target, image_size=128)\n"
    "bundle.export(target, model_keras=models.to_bytes(small), calibration=fitted.to_dict(), manifest=manifest,\n"
    "              signing_key=key)\n")


def upload(cluster: dict, directory: Path, prefix: str) -> str:
    """Every file of ``directory`` under ``prefix`` of the cluster's bucket; the ``s3://`` prefix."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=cluster["PETSEG_S3_ENDPOINT"], region_name="us-east-1",
                      aws_access_key_id=cluster["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=cluster["AWS_SECRET_ACCESS_KEY"])
    for path in sorted(directory.iterdir()):
        s3.put_object(Bucket=cluster["PETSEG_S3_BUCKET"], Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"s3://{cluster['PETSEG_S3_BUCKET']}/{prefix}/"


def signed_release(cluster: dict, admin: dict, directory: Path) -> tuple[dict, str, Path]:
    """A small model's release (petseg-4242), signed with the cluster's key (the ``petseg-signing`` Secret's), in the
    cluster's S3: (manifest, location, local directory)."""
    secret = admin["core"].read_namespaced_secret("petseg-signing", cluster["PETSEG_K8S_NAMESPACE"])
    key = directory / "signing.pem"
    key.write_bytes(base64.b64decode(secret.data["PETSEG_SIGNING_KEY"]))
    key.chmod(0o600)
    target = directory / "release" / "petseg-4242"
    target.parent.mkdir()
    subprocess.run([sys.executable, "-c", RELEASE_SCRIPT, str(target), str(key)], check=True, timeout=300)
    location = upload(cluster, target, "metaflow/petseg/releases/petseg-4242")
    return {**json.loads((target / "manifest.json").read_text()), "model_uri": location}, location, target


def tokens_secret(cluster: dict, admin: dict) -> str:
    """The Secret of the serving pods' bearer tokens, made from its template in k8s/base (the name a run's
    release deploys with): ``client`` may predict, ``labeller`` send feedback."""
    import yaml

    body = yaml.safe_load((REPO / "k8s" / "base" / "serving-tokens-secret.template.yaml").read_text())
    assert body["metadata"]["name"] == TOKENS_SECRET
    tokens = {"tokens": [{"identity": "client", "token": PREDICT, "roles": ["predict"]},
                         {"identity": "labeller", "token": FEEDBACK, "roles": ["feedback"]}]}
    body["stringData"] = {"tokens.json": json.dumps(tokens)}
    admin["core"].create_namespaced_secret(cluster["PETSEG_K8S_NAMESPACE"], body)
    return TOKENS_SECRET


def png(seed: int = 3) -> bytes:
    """A random 96 x 80 RGB PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def local_server(cluster: dict, release_dir: Path, directory: Path, *, fingerprint: str, server: str = "seldon"):
    """A server of the release on this machine, trusting the cluster's signing key and the ``client`` token, as
    the cluster's pods do: its URL."""
    import pytest

    from petseg.deploy import local

    tokens = directory / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [{"identity": "client", "token": PREDICT, "roles": ["predict"]}]}))
    tokens.chmod(0o600)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PETSEG_TRUSTED_KEYS", cluster["PETSEG_TRUSTED_KEYS"])
        here = local.deploy_local(release_dir, server=server, log_path=directory / f"{server}.log", timeout=300,
                                  tokens_file=tokens, fingerprint=fingerprint)
    try:
        yield f"http://127.0.0.1:{here['port']}"
    finally:
        local.stop_local(here["pid"])
