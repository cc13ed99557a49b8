"""A signed release served by a plain Deployment on the real node: no operator, the image's server, a real probe.

The release is a small model signed with the cluster's signing key (the key of the ``petseg-signing``
Secret; the ``petseg-trusted-keys`` ConfigMap holds its public half), put in the cluster's S3. The
Deployment and the endpoint's Service are applied as the ``petseg`` service account. The pod reads
the release with the serving credential (a file), verifies it, and becomes Ready when it predicts.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from cluster_client import container_spec, kubectl, wait_until
from cluster_release import FEEDBACK, PREDICT, local_server, png, upload


def _runner(cluster):
    from kubernetes import config

    return config.new_client_from_config(config_file=cluster["KUBECONFIG"])  # the petseg service account


def _pod_of(admin, cluster, deployment: dict):
    selector = ",".join(f"{k}={v}" for k, v in deployment["spec"]["selector"]["match_labels"].items())
    (pod,) = admin["core"].list_namespaced_pod(cluster["PETSEG_K8S_NAMESPACE"], label_selector=selector).items
    return pod


@pytest.fixture(scope="module")
def served(cluster, admin, signed_release, tokens_secret):
    """The release rolled out to endpoint ``pets`` as a plain Deployment (Seldon's server) and its Service."""
    from petseg.deploy import deployment

    manifest, location, _ = signed_release
    result = deployment.roll_out(manifest, endpoint="pets", who="tester", server="seldon",
                                 image=cluster["PETSEG_IMAGE"], namespace=cluster["PETSEG_K8S_NAMESPACE"],
                                 api_client=_runner(cluster), timeout=300,
                                 s3_endpoint_url=cluster["PETSEG_S3_ENDPOINT"], tokens_secret=tokens_secret)
    rendered = deployment.render_deployment(manifest, server="seldon", endpoint="pets", image=cluster["PETSEG_IMAGE"],
                                            namespace=cluster["PETSEG_K8S_NAMESPACE"])
    applied = admin["apps"].read_namespaced_deployment(rendered["metadata"]["name"], cluster["PETSEG_K8S_NAMESPACE"])
    pod = _pod_of(admin, cluster, applied.to_dict())
    yield {"result": result, "pod": pod, "url": f"http://{pod.status.pod_ip}:9000", "manifest": manifest}
    # Its CPU request would keep later tests' steps from being scheduled on the 2-CPU node.
    admin["apps"].delete_namespaced_deployment(rendered["metadata"]["name"], cluster["PETSEG_K8S_NAMESPACE"])
    admin["core"].delete_namespaced_service("pets", cluster["PETSEG_K8S_NAMESPACE"])


def test_a_plain_deployment_serves_the_release_ready_through_its_probe(served, cluster, admin):
    assert served["result"]["traffic"] == {served["manifest"]["version"]: 100}
    pod = served["pod"]
    assert pod.status.phase == "Running"
    assert all(c.ready for c in pod.status.container_statuses)
    service = admin["core"].read_namespaced_service("pets", cluster["PETSEG_K8S_NAMESPACE"])
    assert service.spec.selector["petseg/endpoint"] == "pets"
    assert service.metadata.annotations["petseg/version"] == served["manifest"]["version"]
    endpoints = admin["core"].read_namespaced_endpoints("pets", cluster["PETSEG_K8S_NAMESPACE"])
    assert [a.ip for s in endpoints.subsets for a in s.addresses] == [pod.status.pod_ip]


def test_the_pod_answers_a_tokened_prediction_with_the_local_servers_mask_and_refuses_strangers(
        served, signed_release, cluster, tmp_path):
    image = png()
    message = {"binData": base64.b64encode(image).decode()}
    stranger = requests.post(served["url"] + "/api/v1.0/predictions", json=message, timeout=60)
    assert stranger.status_code == 401
    answer = requests.post(served["url"] + "/api/v1.0/predictions", json=message, timeout=60,
                           headers={"Authorization": f"Bearer {PREDICT}"})
    assert answer.status_code == 200, answer.text
    _, _, release_dir = signed_release
    with local_server(cluster, release_dir, tmp_path, fingerprint=served["manifest"]["model_fingerprint"]) as url:
        expected = requests.post(url + "/api/v1.0/predictions", json=message, timeout=60,
                                 headers={"Authorization": f"Bearer {PREDICT}"})
    assert expected.status_code == 200
    assert answer.json()["binData"] == expected.json()["binData"]  # the same mask PNG, byte for byte


def test_feedback_with_a_feedback_token_is_held_pending(served, cluster):
    from cluster_client import s3_keys

    truth = np.full((96, 80), 2, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(truth).save(buffer, format="PNG")
    message = {"request": {"binData": base64.b64encode(png(5)).decode()},
               "truth": {"binData": base64.b64encode(buffer.getvalue()).decode()}, "reward": 1.0}
    answer = requests.post(served["url"] + "/api/v1.0/feedback", json=message, timeout=60,
                           headers={"Authorization": f"Bearer {FEEDBACK}"})
    assert answer.status_code == 200, answer.text
    pending = s3_keys(cluster, f"metaflow/petseg/feedback/{served['manifest']['version']}/pending/")
    assert any("/pending/labeller/" in key for key in pending), pending


def test_the_serving_pod_runs_with_least_privilege(served, cluster):
    pod = served["pod"]
    assert pod.spec.automount_service_account_token is False
    spec = container_spec(cluster, pod.status.container_statuses[0].container_id)
    assert spec["process"]["user"]["uid"] == 1000 and 1000 in spec["process"]["user"].get("additionalGids", [1000])
    assert spec["root"]["readonly"] is True
    assert not spec["process"]["capabilities"].get("effective")
    env = {item.split("=", 1)[0] for item in spec["process"]["env"]}
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env
    mounts = {m["destination"] for m in spec["mounts"]}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" not in mounts
    assert {"/var/run/secrets/petseg-s3", "/var/run/secrets/petseg-tokens", "/etc/petseg/trusted-keys"} <= mounts


def test_a_release_changed_in_s3_after_signing_never_becomes_ready(cluster, admin, signed_release, tokens_secret):
    from petseg.deploy import deployment
    from petseg.errors import ServingError

    manifest, _, release_dir = signed_release
    tampered = release_dir.parent / "tampered"
    tampered.mkdir()
    for path in release_dir.iterdir():
        (tampered / path.name).write_bytes(path.read_bytes())
    calibration = json.loads((tampered / "calibration.json").read_text())
    (tampered / "calibration.json").write_text(json.dumps({**calibration, "tampered": True}, sort_keys=True))
    location = upload(cluster, tampered, "metaflow/petseg/releases/petseg-4243")
    manifest = {**manifest, "version": "petseg-4243", "model_uri": location}
    rendered = deployment.render_deployment(manifest, server="seldon", endpoint="tampered",
                                            image=cluster["PETSEG_IMAGE"], namespace=cluster["PETSEG_K8S_NAMESPACE"],
                                            s3_endpoint_url=cluster["PETSEG_S3_ENDPOINT"], tokens_secret=tokens_secret)
    with pytest.raises(ServingError, match="was not Ready after 60 s"):
        deployment.apply_deployment(rendered, namespace=cluster["PETSEG_K8S_NAMESPACE"], api_client=_runner(cluster),
                                    timeout=60)
    pods = admin["core"].list_namespaced_pod(cluster["PETSEG_K8S_NAMESPACE"],
                                             label_selector="petseg/endpoint=tampered").items
    assert pods and not any(c.ready for p in pods for c in (p.status.container_statuses or []))

    def logs():
        result = kubectl(cluster, "logs", pods[0].metadata.name, "--previous", check=False)
        return result.stdout if "calibration.json" in result.stdout else \
            kubectl(cluster, "logs", pods[0].metadata.name, check=False).stdout

    assert "calibration.json" in wait_until(lambda: "calibration.json" in logs() and logs(), "the log to name the file",
                                            timeout=60)
    admin["apps"].delete_namespaced_deployment(rendered["metadata"]["name"], cluster["PETSEG_K8S_NAMESPACE"])
