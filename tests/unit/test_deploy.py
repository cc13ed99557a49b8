"""Deployment: SeldonDeployment rendering and applying (against a stand-in API), local process control."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client as k8s

from petseg import servers
from petseg.deploy import client, deployment, kubernetes, local, rollout
from petseg.deploy import pod as pods
from petseg.errors import ConfigError, ServingError

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

MANIFEST = {
    "version": "petseg-1732791234567890",
    "pathspec": "PetSegFlow/1732791234567890",
    "run_id": "1732791234567890",
    "model_fingerprint": "a" * 64,
    "dataset_fingerprint": "b" * 64,
    "code_version": "0.1.0+g1a2b3c4",
    "model_uri": "s3://bucket/metaflow/releases/petseg-1732791234567890",
}


SCRATCH_HOME = {"AWS_DEFAULT_REGION": "us-east-1", "HOME": "/tmp", "TMPDIR": "/tmp", "PETSEG_HOST": "0.0.0.0",
                "MLSERVER_HOST": "0.0.0.0"}


def _container(rendered: dict) -> dict:
    return rendered["spec"]["predictors"][0]["componentSpecs"][0]["spec"]["containers"][0]


# -- names and labels -------------------------------------------------------------------------------


def test_name_is_petseg_and_the_run_id():
    assert kubernetes.deployment_name("petseg-1732791234567890") == "petseg-1732791234567890"
    assert kubernetes.deployment_name("petseg-argo-petsegflow-x7k2p") == "petseg-argo-petsegflow-x7k2p"


@pytest.mark.parametrize("version", ["petseg-Run_42", "petseg-" + "x" * 80, "petseg-a.b.c", "petseg--", "petseg-ÄÖ"])
def test_name_is_a_short_dns_label_and_stays_distinct(version):
    name = kubernetes.deployment_name(version)
    assert DNS_LABEL.match(name) and len(name) <= 40 and name.startswith("petseg-")
    assert name != kubernetes.deployment_name(version + "1")


@pytest.mark.parametrize("value", ["a" * 64, "0.1.0+g1a2b3c4", "--weird value!--", "PetSegFlow/12", ""])
def test_label_values_are_valid(value):
    assert LABEL_VALUE.match(kubernetes.label_value(value)) and len(kubernetes.label_value(value)) <= 63


# -- rendering --------------------------------------------------------------------------------------


def test_inference_service_runs_the_mlserver_launcher_with_the_release():
    rendered = kubernetes.render_inference_service(MANIFEST, image="registry/petseg:1.0", namespace="serving",
                                                   secrets=["petseg-s3"], s3_endpoint_url="http://minio:9000")
    assert (rendered["apiVersion"], rendered["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert rendered["metadata"]["name"] == "petseg-1732791234567890"
    assert rendered["metadata"]["annotations"]["petseg/model-fingerprint"] == "a" * 64
    (container,) = rendered["spec"]["predictor"]["containers"]
    assert container["command"] == ["python", "-m", "petseg.entrypoints.mlserver_runtime", "/app/serving/mlserver"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env == {"MODEL_URI": MANIFEST["model_uri"], "MODEL_FINGERPRINT": "a" * 64, **SCRATCH_HOME,
                   "MLSERVER_HTTP_PORT": "8080", "AWS_ENDPOINT_URL": "http://minio:9000",
                   "PETSEG_TRUSTED_KEYS": "/etc/petseg/trusted-keys",
                   "AWS_SHARED_CREDENTIALS_FILE": "/var/run/secrets/petseg-s3/credentials"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/petseg/ready"
    assert "envFrom" not in container  # the credential is a file, never environment variables
    (credential,) = [v for v in rendered["spec"]["predictor"]["volumes"] if v["name"] == "s3-credentials"]
    assert credential["secret"]["secretName"] == "petseg-s3"


def test_a_tokens_secret_is_mounted_read_only_and_named_by_the_setting():
    for render, pod in ((kubernetes.render_seldon_deployment, lambda r: r["spec"]["predictors"][0][
            "componentSpecs"][0]["spec"]), (kubernetes.render_inference_service, lambda r: r["spec"]["predictor"])):
        rendered = render(MANIFEST, image="registry/petseg:1.0", tokens_secret="petseg-serving-tokens")
        spec = pod(rendered)
        (container,) = spec["containers"]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["PETSEG_TOKENS_FILE"] == pods.TOKENS_MOUNT + "/tokens.json"
        assert {"name": "petseg-tokens", "mountPath": pods.TOKENS_MOUNT,
                "readOnly": True} in container["volumeMounts"]
        assert all(mount["readOnly"] for mount in container["volumeMounts"] if mount["name"] != "scratch")
        # Root's file, readable by the pod's group (fsGroup 1000) alone: the server runs as uid 1000.
        assert {"name": "petseg-tokens", "secret": {"secretName": "petseg-serving-tokens", "defaultMode": 0o440,
                                                    "items": [{"key": "tokens.json", "path": "tokens.json"}]}} \
            in spec["volumes"]
        plain = pod(render(MANIFEST, image="registry/petseg:1.0"))
        assert "petseg-tokens" not in str(plain["volumes"]) and "PETSEG_TOKENS_FILE" not in str(plain["containers"][0]["env"])


def test_seldon_v2_model_and_server_meet_on_the_petseg_capability():
    model = kubernetes.render_seldon_model(MANIFEST, namespace="serving")
    server = kubernetes.render_seldon_server(image="registry/petseg:1.0", namespace="serving")
    assert (model["apiVersion"], model["kind"], server["kind"]) == ("mlops.seldon.io/v1alpha1", "Model", "Server")
    assert model["spec"]["storageUri"] == "s3://bucket/metaflow/seldon-models/petseg-1732791234567890/"
    assert model["spec"]["requirements"] == server["spec"]["extraCapabilities"] == ["petseg"]
    assert server["spec"]["podSpec"]["containers"][0]["image"] == "registry/petseg:1.0"
    settings = kubernetes.model_settings(MANIFEST)
    assert settings["implementation"] == "petseg.entrypoints.mlserver_runtime.PetSegRuntime"
    assert settings["parameters"]["extra"]["model_fingerprint"] == "a" * 64
    assert settings["parameters"]["uri"] == MANIFEST["model_uri"]


def test_model_settings_are_written_beside_the_release_never_into_it(tmp_path):
    release = tmp_path / "releases" / "petseg-1"
    release.mkdir(parents=True)
    written = kubernetes.write_model_settings(MANIFEST, model_uri=str(release))
    assert written == str(tmp_path / "seldon-models" / "petseg-1" / "model-settings.json")
    assert json.loads(Path(written).read_text()) == kubernetes.model_settings(MANIFEST, model_uri=str(release))
    assert json.loads(Path(written).read_text())["parameters"]["uri"] == str(release)
    assert list(release.iterdir()) == []


def test_render_fills_the_template():
    rendered = kubernetes.render_seldon_deployment(MANIFEST, image="registry/petseg:1.0", namespace="serving")
    assert rendered["apiVersion"] == "machinelearning.seldon.io/v1" and rendered["kind"] == "SeldonDeployment"
    assert rendered["metadata"]["name"] == "petseg-1732791234567890"
    assert rendered["metadata"]["namespace"] == "serving"
    container = _container(rendered)
    assert container["image"] == "registry/petseg:1.0"
    assert container["name"] == rendered["spec"]["predictors"][0]["graph"]["name"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env == {"MODEL_URI": MANIFEST["model_uri"], "MODEL_FINGERPRINT": "a" * 64, **SCRATCH_HOME,
                   "MLSERVER_HTTP_PORT": "9000", "FEEDBACK_URI": "s3://bucket/metaflow/feedback/petseg-1732791234567890",
                   "PETSEG_TRUSTED_KEYS": "/etc/petseg/trusted-keys", "AWS_SHARED_CREDENTIALS_FILE": "/var/run/secrets/petseg-s3/credentials"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == 9000
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/status"  # one prediction
    assert container["resources"] == pods.DEFAULT_RESOURCES
    assert "envFrom" not in container


def _pod(rendered: dict) -> dict:
    if rendered["kind"] == "SeldonDeployment":
        return rendered["spec"]["predictors"][0]["componentSpecs"][0]["spec"]
    return rendered["spec"]["predictor"] if rendered["kind"] == "InferenceService" else rendered["spec"]["podSpec"]


@pytest.mark.parametrize("render", ["seldon", "kserve", "seldon-v2-server"])
def test_serving_pods_get_least_privilege(render):
    """Read-only credentials of their own as a file, public keys only (mounted read-only), feedback outside the
    release, the image's user with Secrets readable by its group, no service-account token."""
    rendered = {"seldon": lambda: kubernetes.render_seldon_deployment(MANIFEST, image="petseg:1"),
                "kserve": lambda: kubernetes.render_inference_service(MANIFEST, image="petseg:1"),
                "seldon-v2-server": lambda: kubernetes.render_seldon_server(image="petseg:1")}[render]()
    pod = _pod(rendered)
    (container,) = pod["containers"]
    assert "envFrom" not in container
    secrets = [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v]
    assert secrets == ["petseg-serving-s3"]  # never the flow's petseg-s3, never the signing key
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["PETSEG_TRUSTED_KEYS"] == "/etc/petseg/trusted-keys"
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/var/run/secrets/petseg-s3/credentials"
    assert not any(name.startswith("PETSEG_SIGNING") or name.startswith("AWS_SECRET") for name in env)
    assert all(m["readOnly"] for m in container["volumeMounts"] if m["name"] != "scratch")
    assert {v["name"]: v.get("configMap") for v in pod["volumes"]}["trusted-keys"] == {"name": "petseg-trusted-keys"}
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}
    assert container["securityContext"] == {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"]}}
    # Seldon's agent, in the Server's pod beside MLServer, reads Secrets with the pod's token.
    assert pod.get("automountServiceAccountToken", True) is (render == "seldon-v2-server")
    if "FEEDBACK_URI" in env:
        assert not env["FEEDBACK_URI"].startswith(MANIFEST["model_uri"])  # a separate prefix


SAME_POD = {"image": "registry/petseg:1.0", "namespace": "serving", "s3_endpoint_url": "http://minio:9000",
            "tokens_secret": "petseg-serving-tokens", "resources": {"limits": {"memory": "4Gi"}}}


@pytest.mark.parametrize("server, render", [("seldon", kubernetes.render_seldon_deployment),
                                            ("mlserver", kubernetes.render_inference_service)])
def test_an_operator_object_describes_the_plain_deployments_pod(server, render):
    """Image, command, working directory, environment, ports, probes, mounts, resources, security context, and
    the pod's volumes, user and token: all the plain Deployment's; only the container's name is the operator's."""
    plain = deployment.render_deployment(MANIFEST, server=server, endpoint="pets", **SAME_POD)
    expected_pod = plain["spec"]["template"]["spec"]
    spec = _pod(render(MANIFEST, **SAME_POD))
    [container], [expected] = spec["containers"], expected_pod["containers"]
    assert {**container, "name": ""} == {**expected, "name": ""}
    assert container["name"] == {"seldon": "petseg", "mlserver": "kserve-container"}[server]
    assert {k: v for k, v in spec.items() if k not in ("containers", "minReplicas")} == \
        {k: v for k, v in expected_pod.items() if k != "containers"}


def test_a_seldon_v2_server_runs_the_plain_deployments_mlserver_container_where_seldon_leaves_it():
    """Seldon's agent loads the Models (``mlserver start`` on its folder, not petseg's launcher, which closes the
    repository API); ports, probes and MLServer's port are its ServerConfig's; each Model names its release."""
    options = {key: value for key, value in SAME_POD.items() if key != "namespace"}
    plain = deployment.render_deployment(MANIFEST, server="mlserver", endpoint="pets", **options)
    expected_pod = plain["spec"]["template"]["spec"]
    spec = kubernetes.render_seldon_server(**options)["spec"]["podSpec"]
    [container], [expected] = spec["containers"], expected_pod["containers"]
    seldons = {"name", "command", "env", "ports", "readinessProbe", "livenessProbe"}
    assert {k: v for k, v in container.items() if k not in seldons} == \
        {k: v for k, v in expected.items() if k not in seldons}
    assert (container["name"], container["command"]) == ("mlserver", ["mlserver", "start", "/mnt/agent/models"])
    assert not {"ports", "readinessProbe", "livenessProbe"} & set(container)
    release_env = {"MODEL_URI", "MODEL_FINGERPRINT", "MLSERVER_HTTP_PORT"}
    assert container["env"] == [e for e in expected["env"] if e["name"] not in release_env] + [
        {"name": "MLSERVER_PARALLEL_WORKERS", "value": "0"}]
    assert spec["volumes"] == expected_pod["volumes"]
    assert {k: v for k, v in spec.items() if k not in ("containers", "volumes")} == \
        {k: v for k, v in expected_pod.items() if k not in ("containers", "volumes", "automountServiceAccountToken")}


def test_feedback_goes_beside_the_releases_not_into_one():
    assert local.default_feedback_uri("s3://b/m/petseg/releases/petseg-7/") == "s3://b/m/petseg/feedback/petseg-7"
    assert local.default_feedback_uri("/data/releases/petseg-7") == "/data/feedback/petseg-7"
    assert local.default_feedback_uri("/data/my-release") == "/data/my-release-feedback"


def test_render_labels_provenance_shortened_and_annotates_it_in_full():
    rendered = kubernetes.render_seldon_deployment(MANIFEST, image="petseg:latest")
    labels, annotations = rendered["metadata"]["labels"], rendered["metadata"]["annotations"]
    assert labels["petseg/run-id"] == "1732791234567890"
    assert labels["petseg/model-fingerprint"] == "a" * 12
    assert labels["petseg/dataset-fingerprint"] == "b" * 12
    assert labels["petseg/code-version"] == "0.1.0-g1a2b3c4"
    assert all(LABEL_VALUE.match(v) and len(v) <= 63 for v in labels.values())
    assert annotations["petseg/model-fingerprint"] == "a" * 64
    assert annotations["petseg/dataset-fingerprint"] == "b" * 64
    assert annotations["petseg/pathspec"] == "PetSegFlow/1732791234567890"
    assert annotations["petseg/code-version"] == "0.1.0+g1a2b3c4"
    # The pods carry the same provenance.
    assert rendered["spec"]["predictors"][0]["componentSpecs"][0]["metadata"]["labels"] == labels


def test_render_options():
    rendered = kubernetes.render_seldon_deployment(
        MANIFEST, image="petseg:latest", replicas=3, feedback_uri="s3://bucket/feedback/",
        s3_endpoint_url="http://minio:9000", secrets=["s3-credentials"],
        resources={"limits": {"nvidia.com/gpu": 1}}, model_uri="s3://copies/petseg-1732791234567890/")
    container = _container(rendered)
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["MODEL_URI"] == "s3://copies/petseg-1732791234567890/"
    assert env["FEEDBACK_URI"] == "s3://bucket/feedback/" and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert [v["secret"]["secretName"] for v in _pod(rendered)["volumes"] if "secret" in v] == ["s3-credentials"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert rendered["spec"]["predictors"][0]["replicas"] == 3


def test_render_keeps_hostile_values_as_plain_strings():
    hostile = dict(MANIFEST, code_version='1"\nkind: Secret\n# ${name} : [', dataset_fingerprint="x: {y}")
    rendered = kubernetes.render_seldon_deployment(hostile, image="petseg:latest")
    assert rendered["kind"] == "SeldonDeployment"
    assert rendered["metadata"]["annotations"]["petseg/code-version"] == hostile["code_version"]
    assert rendered["metadata"]["annotations"]["petseg/dataset-fingerprint"] == "x: {y}"
    assert all(LABEL_VALUE.match(v) for v in rendered["metadata"]["labels"].values())


@pytest.mark.parametrize(
    "options",
    [
        {"model_uri": "/home/me/release"},
        {"model_uri": "PetSegFlow/1732791234567890"},  # a run's artifacts are pickles: pods load releases only
        {"namespace": "Not_A_Namespace"},
        {"replicas": 0},
        {"image": "has space"},
    ],
)
def test_render_rejects_what_kubernetes_or_the_pod_cannot_use(options):
    with pytest.raises(ConfigError):
        kubernetes.render_seldon_deployment(MANIFEST, **{"image": "petseg:latest", **options})


# -- applying ---------------------------------------------------------------------------------------


class StandInApi:
    """CustomObjectsApi for SeldonDeployments, with scripted states and conflicts."""

    def __init__(self, states=("Available",), conflicts=0, refuse=None):
        self.objects, self.calls = {}, []
        self.states, self.conflicts, self.refuse = list(states), conflicts, refuse
        self.version = 0

    def _key(self, group, version, namespace, plural, name):
        assert (group, version, plural) == ("machinelearning.seldon.io", "v1", "seldondeployments")
        return namespace, name

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        key = self._key(group, version, namespace, plural, name)
        if key not in self.objects:
            raise k8s.ApiException(status=404, reason="Not Found")
        current = self.objects[key]
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if state:
            current["status"] = {"state": state, "description": f"operator says {state}"}
        return current

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", body))
        if self.refuse:
            raise k8s.ApiException(status=self.refuse, reason="Forbidden")
        self._store(self._key(group, version, namespace, plural, body["metadata"]["name"]), body)

    def replace_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.calls.append(("replace", body))
        key = self._key(group, version, namespace, plural, name)
        if self.conflicts:
            self.conflicts -= 1
            self.version += 1
            self.objects[key]["metadata"]["resourceVersion"] = str(self.version)
            raise k8s.ApiException(status=409, reason="Conflict")
        assert body["metadata"]["resourceVersion"] == self.objects[key]["metadata"]["resourceVersion"]
        self._store(key, body)

    def _store(self, key, body):
        self.version += 1
        stored = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.version)}}
        self.objects[key] = stored


@pytest.fixture
def rendered():
    return kubernetes.render_seldon_deployment(MANIFEST, image="petseg:latest", namespace="serving")


def _use(monkeypatch, api: StandInApi) -> StandInApi:
    monkeypatch.setattr(k8s, "CustomObjectsApi", lambda api_client=None: api)
    return api


def test_apply_creates_then_waits_until_available(monkeypatch, rendered):
    api = _use(monkeypatch, StandInApi(states=["Creating", "Creating", "Available"]))
    applied = kubernetes.apply_object(rendered, namespace="serving", api_client=object(), poll_interval=0)
    assert [call for call, _ in api.calls] == ["create"]
    assert applied["status"]["state"] == "Available"
    assert api.calls[0][1]["metadata"]["namespace"] == "serving"


def test_apply_twice_replaces_with_the_current_resource_version(monkeypatch, rendered):
    api = _use(monkeypatch, StandInApi())
    kubernetes.apply_object(rendered, namespace="serving", api_client=object(), poll_interval=0)
    kubernetes.apply_object(rendered, namespace="serving", api_client=object(), poll_interval=0)
    assert [call for call, _ in api.calls] == ["create", "replace"]
    assert api.calls[1][1]["metadata"]["resourceVersion"] == "1"
    assert "resourceVersion" not in rendered["metadata"]  # the caller's object is left alone


def test_apply_waits_for_the_status_of_the_new_generation(monkeypatch, rendered):
    """Right after a replace the controller's status still describes the previous spec: it does not count."""
    api = _use(monkeypatch, StandInApi(states=["Available"]))
    observed, stored_get = iter([1, 1, 2]), api.get_namespaced_custom_object

    def get(*args):
        current = stored_get(*args)
        current["metadata"]["generation"] = 2
        current["status"]["observedGeneration"] = next(observed, 2)
        return current

    api.get_namespaced_custom_object = get
    applied = kubernetes.apply_object(rendered, namespace="serving", api_client=object(), poll_interval=0)
    assert applied["status"]["observedGeneration"] == 2


def test_apply_retries_after_a_conflict(monkeypatch, rendered):
    api = _use(monkeypatch, StandInApi(conflicts=1))
    kubernetes.apply_object(rendered, namespace="serving", api_client=object(), poll_interval=0)
    kubernetes.apply_object(rendered, namespace="serving", api_client=object(), poll_interval=0)
    assert [call for call, _ in api.calls] == ["create", "replace", "replace"]


def test_apply_times_out_naming_the_deployment_and_its_last_state(monkeypatch, rendered):
    _use(monkeypatch, StandInApi(states=["Creating"]))
    with pytest.raises(ServingError, match=r"SeldonDeployment serving/petseg-1732791234567890 .*last state: Creating"):
        kubernetes.apply_object(rendered, namespace="serving", api_client=object(), timeout=0.05,
                                poll_interval=0.01)


def test_apply_reports_a_failed_deployment(monkeypatch, rendered):
    _use(monkeypatch, StandInApi(states=["Failed"]))
    with pytest.raises(ServingError, match="failed: operator says Failed"):
        kubernetes.apply_object(rendered, namespace="serving", api_client=object(), poll_interval=0)


def test_apply_reports_a_refusal(monkeypatch, rendered):
    _use(monkeypatch, StandInApi(refuse=403))
    with pytest.raises(ServingError, match="refused SeldonDeployment serving/petseg-1732791234567890: 403"):
        kubernetes.apply_object(rendered, namespace="serving", api_client=object(), poll_interval=0)


def test_a_rollout_returns_what_the_flow_records(monkeypatch):
    from petseg.deploy import rollout

    api = _use(monkeypatch, StandInApi())
    result = rollout.roll_out(MANIFEST, endpoint="pets", who="ana", namespace="serving",
                              api_client=object(), timeout=5)
    assert result == {"kind": "kubernetes", "server": "seldon", "endpoint": "pets", "name": "pets",
                      "namespace": "serving", "traffic": {"petseg-1732791234567890": 100},
                      "url": "/seldon/serving/pets/api/v1.0/predictions"}
    [(call, body)] = api.calls
    assert call == "create" and body["metadata"]["annotations"]["petseg/rolled-out-by"] == "ana"


# -- local processes --------------------------------------------------------------------------------


def test_microservice_command_serves_the_component_on_the_given_ports():
    command = local.microservice_command(port=1, grpc_port=2, metrics_port=3, cores=2)
    assert command[1:3] == ["-m", "petseg.entrypoints.seldon_launcher"]
    assert command[3:6] == ["PetSegModel", "--service-type", "MODEL"]
    assert command[6:12] == ["--http-port", "1", "--grpc-port", "2", "--metrics-port", "3"]
    assert command[12:] == ["--workers", "1", "--threads", "4"]
    assert (local.SERVING_DIR / "PetSegModel.py").is_file()


@pytest.mark.parametrize("cores, sizing", [(1, (1, 4)), (2, (1, 4)), (3, (1, 4)), (8, (4, 4))])
def test_gunicorn_is_sized_from_the_cores(cores, sizing):
    assert local.gunicorn_sizing(cores) == sizing


def test_mlserver_command_serves_the_settings_folder():
    command = local.mlserver_command()
    assert command[1:] == ["-m", "petseg.entrypoints.mlserver_runtime", str(local.MLSERVER_SETTINGS)]
    settings = json.loads((local.MLSERVER_SETTINGS / "petseg" / "model-settings.json").read_text())
    assert (settings["name"], settings["implementation"]) == ("petseg", "petseg.entrypoints.mlserver_runtime.PetSegRuntime")


def test_an_unknown_server_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="server 'triton' is unknown"):
        local.deploy_local(tmp_path, server="triton")
    with pytest.raises(ConfigError, match="server 'seldon-v2' is unknown: expected one of seldon, mlserver"):
        local.deploy_local(tmp_path, server="seldon-v2")  # Kubernetes only


def test_every_module_takes_its_servers_from_one_list():
    assert local.SERVERS == ("seldon", "mlserver") == servers.LOCAL
    assert rollout.SERVERS == {"seldon": "SeldonDeployment", "mlserver": "InferenceService",
                               "seldon-v2": "Experiment"}
    assert client.PROTOCOLS == ("seldon", "v2")
    assert {name: server.protocol for name, server in servers.SERVERS.items()} == {
        "seldon": "seldon", "mlserver": "v2", "seldon-v2": "v2"}


def test_stop_local_leaves_other_processes_alone():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        with pytest.raises(ServingError, match=f"process {other.pid} is not a petseg deployment"):
            local.stop_local(other.pid)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    assert local.stop_local(other.pid) is False
