"""The container each operator object describes is the plain Deployment's: run, exactly as described, on the real node.

No operator runs here (Seldon's are under the Business Source License; KServe needs Knative). For the
SeldonDeployment and the InferenceService the test takes the pod spec the object holds (its container and the
pod's volumes, security context and token setting), runs exactly that as a Pod, waits until the Pod is Ready
through its own readiness probe, and checks that a tokened prediction answers the local server's mask, byte
for byte (the plain Deployment's pod answers that same mask in test_serving_pods.py).

Seldon Core v2: the Server's MLServer is driven by Seldon's agent, which cannot run here. The test plays the
agent and nothing else: the Pod is the Server's podSpec merged into what Seldon's mlserver ServerConfig sets on
its mlserver container (`SERVER_CONFIG`: environment, ports, probes, the agent's models volume), as Seldon's
operator merges them; an init container of the same image copies the Model's folder (its storageUri: the
model-settings.json a rollout writes) to where the agent puts it, named as the agent names it (``<Model>_1``);
and the test asks MLServer to load it through the model repository API, as the agent does (REST here, gRPC
there). The prediction is then the local MLServer's mask.
"""

from __future__ import annotations

import base64
import contextlib

import pytest
import requests

from cluster_client import wait_until
from cluster_release import PREDICT, local_server, png

SERVER_CONFIG = {
    "env": [{"name": "MLSERVER_HTTP_PORT", "value": "9000"}, {"name": "MLSERVER_GRPC_PORT", "value": "9500"},
            {"name": "MLSERVER_MODELS_DIR", "value": "/mnt/agent/models"},
            {"name": "MLSERVER_MODEL_PARALLEL_WORKERS", "value": "1"},
            {"name": "MLSERVER_LOAD_MODELS_AT_STARTUP", "value": "false"}],
    "ports": [{"containerPort": 9500, "name": "server-grpc", "protocol": "TCP"},
              {"containerPort": 9000, "name": "server-http", "protocol": "TCP"}],
    "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "server-http"}, "initialDelaySeconds": 5,
                       "periodSeconds": 5},
    "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "server-http"}},
    "volumeMounts": [{"mountPath": "/mnt/agent", "name": "mlserver-models", "readOnly": True}],
}
"""What Seldon Core v2's mlserver ServerConfig (operator/config/serverconfigs/mlserver.yaml) sets on its mlserver
container, which a Server's podSpec is merged into; its models volume is a claim per pod there, scratch here."""
AGENT = ("import json, os, pathlib\n"
         "from petseg.storage import Location\n"
         "settings = json.loads(Location(os.environ['STORAGE_URI']).read_bytes('model-settings.json'))\n"
         "folder = pathlib.Path('/mnt/agent/models', os.environ['MODEL'])\n"
         "folder.mkdir(parents=True)\n"
         "(folder / 'model-settings.json').write_text(json.dumps({**settings, 'name': os.environ['MODEL']}))\n")
"""The agent's part: the Model's folder, copied where MLServer's models are, the model named as the agent names it."""


@pytest.fixture(scope="module")
def local_masks(signed_release, cluster, tmp_path_factory):
    """The local servers' answers to a tokened prediction of one image: {server: mask}."""
    _, _, release_dir = signed_release
    directory = tmp_path_factory.mktemp("local")
    masks = {}
    for server in ("seldon", "mlserver"):
        with local_server(cluster, release_dir, directory, server=server,
                          fingerprint=signed_release[0]["model_fingerprint"]) as url:
            masks[server] = _mask(server, url)
    return masks


def _mask(server: str, url: str, model: str = "petseg") -> list | str:
    """The mask a tokened prediction of `png` gets: Seldon's PNG (base64), or the v2 ``mask`` tensor's data."""
    headers = {"Authorization": f"Bearer {PREDICT}"}
    image = base64.b64encode(png()).decode()
    if server == "seldon":
        answer = requests.post(url + "/api/v1.0/predictions", json={"binData": image}, headers=headers, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()["binData"]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}],
            "outputs": [{"name": "mask"}]}
    answer = requests.post(f"{url}/v2/models/{model}/infer", json=body, headers=headers, timeout=120)
    assert answer.status_code == 200, answer.text
    [mask] = answer.json()["outputs"]
    return mask["data"]


@contextlib.contextmanager
def running(admin, cluster, name: str, pod_spec: dict, timeout: float = 420):
    """``pod_spec`` run as the Pod ``name`` until it is Ready through its own probe; the Pod, deleted on exit."""
    namespace = cluster["PETSEG_K8S_NAMESPACE"]
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app.kubernetes.io/name": name}},
            "spec": {**pod_spec, "restartPolicy": "Always"}}
    admin["core"].create_namespaced_pod(namespace, body)
    try:
        def ready():
            pod = admin["core"].read_namespaced_pod(name, namespace)
            return pod if any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []) else None

        yield wait_until(ready, f"pod {name} to be Ready through its own probe", timeout=timeout)
    finally:
        admin["core"].delete_namespaced_pod(name, namespace, grace_period_seconds=0)


def _options(cluster, tokens_secret) -> dict:
    return {"image": cluster["PETSEG_IMAGE"], "namespace": cluster["PETSEG_K8S_NAMESPACE"],
            "s3_endpoint_url": cluster["PETSEG_S3_ENDPOINT"], "tokens_secret": tokens_secret}


@pytest.mark.parametrize("kind", ["SeldonDeployment", "InferenceService"])
def test_an_operator_objects_pod_runs_and_answers_the_local_servers_mask(kind, cluster, admin, signed_release,
                                                                       tokens_secret, local_masks):
    from petseg.deploy import deployment, kubernetes

    manifest = signed_release[0]
    server = "seldon" if kind == "SeldonDeployment" else "mlserver"
    if kind == "SeldonDeployment":
        rendered = kubernetes.render_seldon_deployment(manifest, **_options(cluster, tokens_secret))
        pod_spec = rendered["spec"]["predictors"][0]["componentSpecs"][0]["spec"]
    else:
        rendered = kubernetes.render_inference_service(manifest, **_options(cluster, tokens_secret))
        pod_spec = {k: v for k, v in rendered["spec"]["predictor"].items() if k != "minReplicas"}
    plain = deployment.render_deployment(manifest, server=server, endpoint="pets", **_options(cluster, tokens_secret))
    [container], [expected] = pod_spec["containers"], plain["spec"]["template"]["spec"]["containers"]
    assert {**container, "name": ""} == {**expected, "name": ""}  # the plain Deployment's, which this node runs

    with running(admin, cluster, f"operator-{server}", pod_spec) as pod:
        port = container["ports"][0]["containerPort"]
        assert _mask(server, f"http://{pod.status.pod_ip}:{port}") == local_masks[server]


def test_a_seldon_v2_servers_mlserver_loads_the_models_folder_and_answers_the_local_mask(
        cluster, admin, signed_release, tokens_secret, local_masks, monkeypatch):
    from petseg.deploy import kubernetes

    manifest = signed_release[0]
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):  # the flow's credential
        monkeypatch.setenv(variable, cluster[variable])
    kubernetes.write_model_settings(manifest, s3_endpoint_url=cluster["PETSEG_S3_ENDPOINT"])  # as a rollout does
    model = kubernetes.render_seldon_model(manifest, namespace=cluster["PETSEG_K8S_NAMESPACE"])
    server = kubernetes.render_seldon_server(**_options(cluster, tokens_secret))
    pod_spec = server["spec"]["podSpec"]
    [container] = pod_spec["containers"]
    merged = {**container, "env": SERVER_CONFIG["env"] + container["env"], "ports": SERVER_CONFIG["ports"],
              "readinessProbe": SERVER_CONFIG["readinessProbe"], "livenessProbe": SERVER_CONFIG["livenessProbe"],
              "volumeMounts": SERVER_CONFIG["volumeMounts"] + container["volumeMounts"]}
    name = f"{model['metadata']['name']}_1"
    agent = {"name": "agent", "image": container["image"], "imagePullPolicy": "IfNotPresent",
             "command": ["python", "-c", AGENT], "workingDir": "/tmp", "securityContext": container["securityContext"],
             "env": [e for e in container["env"] if e["name"].startswith(("AWS_", "HOME", "TMPDIR"))]
             + [{"name": "STORAGE_URI", "value": model["spec"]["storageUri"]}, {"name": "MODEL", "value": name}],
             "volumeMounts": [{"mountPath": "/mnt/agent", "name": "mlserver-models"}]
             + [m for m in container["volumeMounts"] if m["name"] in ("s3-credentials", "scratch")]}
    spec = {**pod_spec, "volumes": pod_spec["volumes"] + [{"name": "mlserver-models", "emptyDir": {}}],
            "initContainers": [agent], "containers": [merged]}

    with running(admin, cluster, "operator-seldon-v2", spec) as pod:
        url = f"http://{pod.status.pod_ip}:9000"
        loaded = requests.post(f"{url}/v2/repository/models/{name}/load", timeout=300)  # the agent's call
        assert loaded.status_code == 200, loaded.text
        assert requests.get(f"{url}/v2/models/{name}/ready", timeout=30).status_code == 200
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(png()).decode()]}]}
        assert requests.post(f"{url}/v2/models/{name}/infer", json=body, timeout=60).status_code == 401
        assert _mask("mlserver", url, model=name) == local_masks["mlserver"]
