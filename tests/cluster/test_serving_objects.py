"""Kubernetes objects petseg renders, on the real API server: the Argo template, the serving objects, the roles.

SeldonDeployment, KServe's InferenceService and Seldon Core v2's Model, Server
and Experiment are registered as resource types with no operator behind them:
those operators cannot run here (Seldon's are under the Business Source
License), so where a test needs one of these objects Ready it writes that
status itself, as the operator would, and says so. Nothing else's status is
written by a test.
"""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest

from cluster_client import petseg_cli, run_flow, wait_until
from harness import REPO

CLUSTER = REPO / "tests" / "support" / "cluster"
KSERVE_CRD = REPO / "tests" / "support" / "kserve" / "inferenceservices.serving.kserve.io.json"
SEG_FLOW = REPO / "flows" / "seg_flow.py"
COMPUTE_STEPS = {"trial", "train", "calibrate", "evaluate"}
SEG_STEPS = {"start", "ingest", "transform", "tune", "release", "end"} | COMPUTE_STEPS


# -- Argo Workflows rendering ---------------------------------------------------------------------

def test_argo_workflow_template_renders(cluster, workdir):
    code, output, _ = run_flow(cluster, workdir, SEG_FLOW, "argo-workflows", "create", "--only-json",
                               timeout=300)
    assert code == 0, output[-3000:]
    template = json.loads(output[output.index("{"):output.rindex("}") + 1])
    assert template["kind"] == "WorkflowTemplate"
    assert template["metadata"]["namespace"] == cluster["PETSEG_K8S_NAMESPACE"]
    containers = {t["name"]: t for t in template["spec"]["templates"] if "container" in t}
    assert SEG_STEPS <= set(containers)
    for name, task in containers.items():
        container = task["container"]
        assert container["image"] == cluster["PETSEG_IMAGE"]
        assert task.get("serviceAccountName") == ("petseg-release" if name == "release" else "petseg-step"), name
        assert "petseg-s3" in [e["secretRef"]["name"] for e in container.get("envFrom", []) if e.get("secretRef")]
        limits = container.get("resources", {}).get("limits", {})
        assert ("nvidia.com/gpu" in limits) == (name in COMPUTE_STEPS), name


# -- SeldonDeployment -------------------------------------------------------------------------------

RELEASE = {"version": "petseg-1764000000000001", "pathspec": "PetSegFlow/1764000000000001",
           "run_id": "1764000000000001", "model_fingerprint": "a" * 64, "dataset_fingerprint": "b" * 64,
           "code_version": "0.1.0", "model_uri": "s3://petseg/metaflow/release/"}


@pytest.fixture(scope="session")
def seldon_crd(cluster, admin):
    """The SeldonDeployment resource type, registered without an operator behind it."""
    import yaml

    crd = yaml.safe_load((CLUSTER / "seldondeployment-crd.yaml").read_text())
    admin["ext"].create_custom_resource_definition(crd)
    wait_until(lambda: any(c.type == "Established" and c.status == "True" for c in
                      admin["ext"].read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []),
          "the SeldonDeployment CRD")
    return crd


def _set_state(admin, namespace: str, name: str, state: str, description: str = "") -> None:
    """Write status.state as the Seldon operator would (none runs here)."""
    from petseg.deploy.kubernetes import GROUP, PLURAL, VERSION

    body = {"status": {"state": state, "description": description}}
    admin["custom"].patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body)


def test_seldon_deployment_create_replace_andwait_until(cluster, admin, seldon_crd):
    import threading

    from kubernetes import config

    from petseg.deploy.kubernetes import GROUP, PLURAL, VERSION, apply_object, render_seldon_deployment
    from petseg.errors import ServingError

    namespace = cluster["PETSEG_K8S_NAMESPACE"]
    runner = config.new_client_from_config(config_file=cluster["KUBECONFIG"])  # the petseg service account
    rendered = render_seldon_deployment(RELEASE, image="petseg:test", namespace=namespace,
                                        secrets=["petseg-s3"], s3_endpoint_url=cluster["PETSEG_S3_ENDPOINT"])
    name = rendered["metadata"]["name"]

    # Created, then waited on until the (stand-in) operator reports it Available.
    outcome = {}
    waiter = threading.Thread(target=lambda: outcome.update(
        applied=apply_object(rendered, namespace=namespace, api_client=runner, timeout=60,
                             poll_interval=0.2)))
    waiter.start()
    wait_until(lambda: admin["custom"].list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"],
          "the SeldonDeployment")
    _set_state(admin, namespace, name, "Available")
    waiter.join(timeout=60)
    assert outcome["applied"]["status"]["state"] == "Available"
    created = outcome["applied"]

    # Applying again replaces it in place: one object, same uid, new spec.
    rendered_again = render_seldon_deployment(RELEASE, image="petseg:test", namespace=namespace,
                                              replicas=2, secrets=["petseg-s3"])
    again = apply_object(rendered_again, namespace=namespace, api_client=runner, timeout=5)
    items = admin["custom"].list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    assert [item["metadata"]["name"] for item in items] == [name]
    assert again["metadata"]["uid"] == created["metadata"]["uid"]
    assert again["spec"]["predictors"][0]["replicas"] == 2
    assert again["metadata"]["annotations"]["petseg/model-fingerprint"] == "a" * 64

    # A deployment that Seldon reports Failed is an error that says why.
    _set_state(admin, namespace, name, "Failed", "image pull failed")
    with pytest.raises(ServingError, match="image pull failed"):
        apply_object(rendered_again, namespace=namespace, api_client=runner, timeout=5)
    admin["custom"].delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def without_empty_defaults(schema):
    """A published CRD as the test cluster's API server (1.20) can take it: that version reads an empty-string
    ``default`` as null and refuses it (fixed in 1.21). KServe's CRD has such defaults only on the ``name`` of
    references (secrets, config maps), a probe's gRPC ``service`` and the status's ``targetModelState``,
    none of which petseg renders; every other constraint of the schema stays."""
    if isinstance(schema, dict):
        return {key: without_empty_defaults(value) for key, value in schema.items()
                if not (key == "default" and value == "")}
    if isinstance(schema, list):
        return [without_empty_defaults(value) for value in schema]
    return schema


@pytest.fixture(scope="session")
def mlserver_crds(cluster, admin):
    """The InferenceService (KServe's published definition and schema), Model and Server resource types,
    registered without a controller behind them."""
    import yaml

    crds = [without_empty_defaults(json.loads(KSERVE_CRD.read_text())),
            *yaml.safe_load_all((CLUSTER / "mlserver-crds.yaml").read_text())]
    for crd in crds:
        admin["ext"].create_custom_resource_definition(crd)
    for crd in crds:
        wait_until(lambda: any(c.type == "Established" and c.status == "True" for c in
                          admin["ext"].read_custom_resource_definition(crd["metadata"]["name"]).status.conditions
                          or []), f"the {crd['spec']['names']['kind']} CRD")
    return crds


def test_mlserver_objects_are_applied_with_the_release_role(cluster, admin, mlserver_crds):
    """The InferenceService, Model and Server of the MLServer runtime, as the petseg service account applies them."""
    import threading

    from kubernetes import config

    from petseg.deploy import kubernetes as k8s

    namespace = cluster["PETSEG_K8S_NAMESPACE"]
    runner = config.new_client_from_config(config_file=cluster["KUBECONFIG"])  # the petseg service account
    objects = [
        k8s.render_inference_service(RELEASE, image="petseg:test", namespace=namespace, secrets=["petseg-s3"],
                                     s3_endpoint_url=cluster["PETSEG_S3_ENDPOINT"]),
        k8s.render_seldon_server(image="petseg:test", namespace=namespace, secrets=["petseg-s3"]),
        k8s.render_seldon_model(RELEASE, namespace=namespace),
    ]
    for rendered in objects:
        group, version, plural = k8s.RESOURCES[rendered["kind"]]
        name = rendered["metadata"]["name"]
        outcome = {}
        waiter = threading.Thread(target=lambda: outcome.update(applied=k8s.apply_object(
            rendered, namespace=namespace, api_client=runner, timeout=60, poll_interval=0.2)))
        waiter.start()
        wait_until(lambda: [item for item in admin["custom"].list_namespaced_custom_object(
            group, version, namespace, plural)["items"] if item["metadata"]["name"] == name], f"the {plural}")
        # Report it Ready, as KServe's or Seldon's controller would (none runs here).
        admin["custom"].patch_namespaced_custom_object_status(
            group, version, namespace, plural, name,
            {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Loaded"}]}})
        waiter.join(timeout=60)
        created = outcome["applied"]
        assert created["spec"] == rendered["spec"], rendered["kind"]
        assert created["metadata"]["labels"] == rendered["metadata"]["labels"]

        # Applying again replaces it in place: same uid.
        again = k8s.apply_object(rendered, namespace=namespace, api_client=runner, timeout=5)
        assert again["metadata"]["uid"] == created["metadata"]["uid"]
        admin["custom"].delete_namespaced_custom_object(group, version, namespace, plural, name)

    # Not ready in time: an error naming the object and its last condition.
    rendered = objects[0]
    with pytest.raises(Exception, match=r"InferenceService .* was not Ready after 1 s; last state: no Ready"):
        k8s.apply_object(rendered, namespace=namespace, api_client=runner, timeout=1, poll_interval=0.2)
    group, version, plural = k8s.RESOURCES["InferenceService"]
    admin["custom"].delete_namespaced_custom_object(group, version, namespace, plural, rendered["metadata"]["name"])


def _release(run: int) -> dict:
    return {**RELEASE, "version": f"petseg-{run}", "pathspec": f"PetSegFlow/{run}", "run_id": str(run),
            "model_fingerprint": f"{run}" * 64, "model_uri": f"s3://petseg/metaflow/releases/petseg-{run}/"}


@contextlib.contextmanager
def ready_controller(admin, namespace: str, kind: str, name: str):
    """Report the endpoint's object ready whenever it exists, as its controller would (none runs here)."""
    import threading

    from kubernetes import client

    from petseg.deploy import kubernetes as k8s

    group, version, plural = k8s.RESOURCES[kind]
    # Seldon Core v1 reports a state; KServe, and Seldon Core v2 for a Model or an Experiment, a Ready condition.
    status = ({"status": {"state": "Available"}} if kind == "SeldonDeployment"
              else {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Loaded"}]}})
    stopped = threading.Event()

    def report():
        while not stopped.wait(0.2):
            with contextlib.suppress(client.ApiException):
                admin["custom"].patch_namespaced_custom_object_status(group, version, namespace, plural, name, status)

    thread = threading.Thread(target=report)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()
        with contextlib.suppress(client.ApiException):
            admin["custom"].delete_namespaced_custom_object(group, version, namespace, plural, name)


@pytest.mark.parametrize("kind", ["SeldonDeployment", "InferenceService"])
def test_an_endpoint_is_one_object_through_canary_promote_and_consecutive_rollbacks(cluster, admin, workdir,
                                                                                    seldon_crd, mlserver_crds, kind):
    """Each change as the API server stores it, field by field; KServe's object under KServe's own schema."""
    from kubernetes import config

    from petseg.deploy import kubernetes as k8s
    from petseg.deploy import rollout

    namespace, name = cluster["PETSEG_K8S_NAMESPACE"], f"pets-{kind.lower()}"
    runner = config.new_client_from_config(config_file=cluster["KUBECONFIG"])  # the petseg service account
    group, version, plural = k8s.RESOURCES[kind]
    server = "seldon" if kind == "SeldonDeployment" else "mlserver"
    options = {"endpoint": name, "server": server, "image": "petseg:test", "namespace": namespace,
               "secrets": ["petseg-s3"], "api_client": runner, "timeout": 30}

    def stored() -> dict:  # one object for the endpoint, whatever the release
        [item] = admin["custom"].list_namespaced_custom_object(group, version, namespace, plural,
                                                               label_selector=f"petseg/endpoint={name}")["items"]
        assert item["metadata"]["name"] == name
        return item

    def change(step, who: str) -> dict:
        return rollout.apply(name, lambda current: step(current, who=who), namespace=namespace, kind=kind,
                             api_client=runner, timeout=30, poll_interval=0.2)

    with ready_controller(admin, namespace, kind, name):
        first = rollout.roll_out(_release(1), who="ana", **options)
        assert first["traffic"] == {"petseg-1": 100} and first["name"] == name
        uid = stored()["metadata"]["uid"]
        assert rollout.roll_out(_release(2), who="bo", canary=10, **options)["traffic"] == \
            {"petseg-1": 90, "petseg-2": 10}
        body = stored()
        if kind == "SeldonDeployment":
            assert [(p["name"], p["traffic"]) for p in body["spec"]["predictors"]] == [("petseg-1", 90),
                                                                                       ("petseg-2", 10)]
        else:  # nothing the published schema does not know was pruned
            assert body["spec"]["predictor"]["canaryTrafficPercent"] == 10
            env = {item["name"]: item["value"] for item in body["spec"]["predictor"]["containers"][0]["env"]}
            assert env["MODEL_URI"] == _release(2)["model_uri"] and env["MODEL_FINGERPRINT"] == "2" * 64
            assert body["spec"]["predictor"]["annotations"]["petseg/version"] == "petseg-2"
        assert body["metadata"]["annotations"]["petseg/rolled-out-by"] == "bo"

        result = petseg_cli(cluster, workdir, "promote", name, "--namespace", namespace, "--by", "cy",
                            "--kind", "seldon" if kind == "SeldonDeployment" else "kserve")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{name}: promoted by cy; traffic petseg-2 100 %"
        body = stored()
        assert rollout.traffic(body) == {"petseg-2": 100}
        assert body["metadata"]["annotations"]["petseg/promoted-by"] == "cy"
        assert "canaryTrafficPercent" not in body["spec"].get("predictor", {})

        rollout.roll_out(_release(3), who="dee", **options)
        for expected in ("petseg-2", "petseg-1"):  # consecutive rollbacks, one release back each
            change(rollout.rollback, "eve")
            body = stored()
            assert rollout.traffic(body) == {expected: 100} and rollout.serving_of(body) == expected
            assert body["metadata"]["annotations"]["petseg/rolled-back-by"] == "eve"
            assert body["metadata"]["annotations"]["petseg/rolled-back-at"]
        if kind == "SeldonDeployment":
            assert [p["name"] for p in body["spec"]["predictors"]] == ["petseg-1"]
        else:
            assert "canaryTrafficPercent" not in body["spec"]["predictor"]
        assert body["metadata"]["uid"] == uid
        result = petseg_cli(cluster, workdir, "rollback", name, "--kubernetes", "--namespace", namespace,
                            "--kind", "seldon" if kind == "SeldonDeployment" else "kserve")
        assert result.returncode == 2 and "no earlier release to roll back to (serving: petseg-1)" in result.stderr



def test_a_seldon_v2_endpoint_is_one_experiment_through_canary_promote_and_consecutive_rollbacks(
        cluster, admin, workdir, mlserver_crds, monkeypatch):
    """Each release's Model, and the endpoint's Experiment between them, as the API server stores them (under a
    schema that prunes what it does not know), field by field; each Model's settings in the cluster's S3."""
    from kubernetes import config

    from cluster_client import s3_keys
    from petseg.deploy import kubernetes as k8s
    from petseg.deploy import rollout

    namespace, name = cluster["PETSEG_K8S_NAMESPACE"], "pets-experiment"
    runner = config.new_client_from_config(config_file=cluster["KUBECONFIG"])  # the petseg service account
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):  # the flow's credential
        monkeypatch.setenv(variable, cluster[variable])
    options = {"endpoint": name, "server": "seldon-v2", "namespace": namespace, "api_client": runner, "timeout": 30,
               "s3_endpoint_url": cluster["PETSEG_S3_ENDPOINT"], "secrets": ["petseg-serving-s3"]}

    def stored(kind: str = "Experiment", **selector) -> list[dict]:
        group, version, plural = k8s.RESOURCES[kind]
        return admin["custom"].list_namespaced_custom_object(group, version, namespace, plural, **selector)["items"]

    def experiment() -> dict:  # one object for the endpoint, whatever the release
        [item] = stored(label_selector=f"petseg/endpoint={name}")
        assert item["metadata"]["name"] == name
        return item

    def cli(*args: str) -> subprocess.CompletedProcess:
        return petseg_cli(cluster, workdir, *args, name, "--namespace", namespace, "--kind", "seldon-v2")

    with contextlib.ExitStack() as controllers:
        for kind, ready in [("Experiment", name), *(("Model", f"petseg-{run}") for run in (1, 2, 3))]:
            controllers.enter_context(ready_controller(admin, namespace, kind, ready))
        first = rollout.roll_out(_release(1), who="ana", **options)
        assert first["traffic"] == {"petseg-1": 100} and first["name"] == name
        assert first["headers"] == {"seldon-model": f"{name}.experiment"}
        body = experiment()
        assert body["spec"] == {"candidates": [{"name": "petseg-1", "weight": 100}]}
        uid = body["metadata"]["uid"]
        [model] = [m for m in stored("Model") if m["metadata"]["name"] == "petseg-1"]
        assert model["spec"] == k8s.render_seldon_model(_release(1), namespace=namespace)["spec"]
        assert s3_keys(cluster, "metaflow/seldon-models/petseg-1/") == ["metaflow/seldon-models/petseg-1/model-settings.json"]

        assert rollout.roll_out(_release(2), who="bo", canary=10, **options)["traffic"] == \
            {"petseg-1": 90, "petseg-2": 10}
        body = experiment()  # nothing pruned: the stored candidates are the rendered ones
        assert body["spec"] == {"candidates": [{"name": "petseg-1", "weight": 90}, {"name": "petseg-2", "weight": 10}]}
        assert body["metadata"]["annotations"]["petseg/rolled-out-by"] == "bo"
        assert {m["metadata"]["name"] for m in stored("Model")} >= {"petseg-1", "petseg-2"}

        result = cli("promote", "--by", "cy")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{name}: promoted by cy; traffic petseg-2 100 %"
        body = experiment()
        assert body["spec"] == {"candidates": [{"name": "petseg-2", "weight": 100}]}
        assert body["metadata"]["annotations"]["petseg/promoted-by"] == "cy"

        rollout.roll_out(_release(3), who="dee", **options)
        for expected in ("petseg-2", "petseg-1"):  # consecutive rollbacks, one release back each
            result = cli("rollback", "--kubernetes", "--by", "eve")
            assert result.returncode == 0, result.stderr
            body = experiment()
            assert body["spec"] == {"candidates": [{"name": expected, "weight": 100}]}  # no stale candidate
            assert rollout.traffic(body) == {expected: 100} and rollout.serving_of(body) == expected
            assert body["metadata"]["annotations"]["petseg/rolled-back-by"] == "eve"
            assert body["metadata"]["annotations"]["petseg/rolled-back-at"]
        assert body["metadata"]["uid"] == uid
        result = cli("rollback", "--kubernetes")
        assert result.returncode == 2 and "no earlier release to roll back to (serving: petseg-1)" in result.stderr

def test_service_account_has_no_rights_beyond_its_roles(cluster):
    from kubernetes import client, config

    runner = config.new_client_from_config(config_file=cluster["KUBECONFIG"])
    core = client.CoreV1Api(runner)
    with pytest.raises(client.ApiException) as denied:
        core.list_namespaced_secret(cluster["PETSEG_K8S_NAMESPACE"])
    assert denied.value.status == 403
    with pytest.raises(client.ApiException) as denied:
        client.BatchV1Api(runner).list_namespaced_job("default")
    assert denied.value.status == 403
    assert core.list_namespaced_pod(cluster["PETSEG_K8S_NAMESPACE"]).items is not None


# -- kustomize ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_kustomize_renders(cluster, target):
    import yaml

    result = subprocess.run([cluster["PETSEG_KUBECTL"], "kustomize", str(REPO / "k8s" / target)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(result.stdout)}
    assert ("Namespace", "petseg") in objects and ("ServiceAccount", "petseg") in objects
    assert all(o["metadata"].get("namespace") == "petseg" for (kind, _), o in objects.items() if kind != "Namespace")
    assert not [kind for kind, _ in objects if kind == "Secret"]  # credentials are never part of the base
    settings = objects[("ConfigMap", "petseg-metaflow")]["data"]
    assert settings["METAFLOW_KUBERNETES_SERVICE_ACCOUNT"] == "petseg-step"
    assert {("ServiceAccount", "petseg-step"), ("ServiceAccount", "petseg-release")} <= set(objects)
    if target == "overlays/gpu":
        assert settings["METAFLOW_KUBERNETES_NODE_SELECTOR"] == "nvidia.com/gpu.present=true"
        assert json.loads(settings["METAFLOW_KUBERNETES_TOLERATIONS"])[0]["key"] == "nvidia.com/gpu"
    else:
        assert "METAFLOW_KUBERNETES_TOLERATIONS" not in settings
