"""One Kubernetes object per endpoint: rollouts, canaries, promotions and rollbacks, field by field; KServe objects
checked against KServe's published InferenceService schema (tests/support/kserve), Seldon Core v2 Experiments
against the stand-in schema the test cluster registers (tests/support/cluster/mlserver-crds.yaml)."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from petseg.deploy import kubernetes as k8s
from petseg.deploy import rollout
from petseg.errors import ConfigError

KSERVE_CRD = Path(__file__).resolve().parents[1] / "support" / "kserve" / "inferenceservices.serving.kserve.io.json"
SELDON_V2_CRDS = Path(__file__).resolve().parents[1] / "support" / "cluster" / "mlserver-crds.yaml"
WHEN = "2026-01-02T03:04:05+00:00"


def _release(run: int) -> dict:
    return {"version": f"petseg-{run}", "pathspec": f"PetSegFlow/{run}", "run_id": str(run),
            "model_fingerprint": f"{run % 10}" * 64, "dataset_fingerprint": "b" * 64, "code_version": "0.1.0",
            "model_uri": f"s3://petseg/releases/petseg-{run}/"}


def _render(kind: str, run: int) -> dict:
    if kind == "Experiment":  # the endpoint's Experiment routes to each release's own Model
        return k8s.render_seldon_model(_release(run), namespace="serving")
    render = k8s.render_seldon_deployment if kind == "SeldonDeployment" else k8s.render_inference_service
    return render(_release(run), image="petseg:test", namespace="serving")


@pytest.fixture(scope="module")
def kserve_schema():
    """The v1beta1 schema, its validator made once (checking a schema this size takes a while)."""
    crd = json.loads(KSERVE_CRD.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema = version["schema"]["openAPIV3Schema"]
    return schema, jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="module")
def experiment_schema():
    [crd] = [c for c in yaml.safe_load_all(SELDON_V2_CRDS.read_text()) if c["spec"]["names"]["kind"] == "Experiment"]
    [version] = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def check_experiment(body: dict, schema: dict) -> None:
    jsonschema.Draft4Validator(schema).validate(body)
    assert unknown_fields(body, schema) == []


def unknown_fields(value, schema: dict, where: str = "") -> list[str]:
    """Fields the schema does not declare (what the API server's strict field validation refuses)."""
    found = []
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{where}.{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{where}[{index}]")
    return found


def check_kserve(body: dict, kserve_schema: tuple) -> None:
    schema, validator = kserve_schema
    validator.validate(body)
    assert unknown_fields(body, schema) == []


def _versions(body: dict) -> dict:
    return rollout.traffic(body)


def test_a_first_rollout_is_one_object_named_after_the_endpoint():
    body = rollout.rollout(None, _render("SeldonDeployment", 1), endpoint="pets", canary=10, who="ana", when=WHEN)
    assert body["metadata"]["name"] == body["spec"]["name"] == "pets"
    assert body["metadata"]["labels"] == {"app.kubernetes.io/name": "petseg", "petseg/endpoint": "pets"}
    [predictor] = body["spec"]["predictors"]
    assert predictor["name"] == "petseg-1" and predictor["traffic"] == 100  # nothing to be a canary beside
    annotations = body["metadata"]["annotations"]
    assert annotations["petseg/serving"] == "petseg-1" and annotations["petseg/candidate"] == ""
    assert (annotations["petseg/changed-by"], annotations["petseg/changed-at"]) == ("ana", WHEN)
    assert (annotations["petseg/rolled-out-by"], annotations["petseg/rolled-out-at"]) == ("ana", WHEN)
    assert annotations["petseg/change"] == "rollout of petseg-1" and json.loads(annotations["petseg/history"]) == []


def test_seldon_canary_then_promote_retires_the_old_predictor():
    first = rollout.rollout(None, _render("SeldonDeployment", 1), endpoint="pets", who="ana", when=WHEN)
    canary = rollout.rollout(first, _render("SeldonDeployment", 2), endpoint="pets", canary=10, who="bo", when=WHEN)
    assert [(p["name"], p["traffic"]) for p in canary["spec"]["predictors"]] == [("petseg-1", 90), ("petseg-2", 10)]
    assert canary["spec"]["predictors"][1]["annotations"]["petseg/model-fingerprint"] == "2" * 64
    assert rollout.candidate_of(canary) == "petseg-2" and rollout.serving_of(canary) == "petseg-1"
    assert canary["metadata"]["annotations"]["petseg/change"] == "rollout of petseg-2, 10 % canary"
    with pytest.raises(ConfigError, match="canary of petseg-2 in progress: `petseg promote pets`"):
        rollout.rollout(canary, _render("SeldonDeployment", 3), endpoint="pets", who="bo")

    promoted = rollout.promote(canary, who="cy", when="2026-01-03T00:00:00+00:00")
    assert [(p["name"], p["traffic"]) for p in promoted["spec"]["predictors"]] == [("petseg-2", 100)]
    annotations = promoted["metadata"]["annotations"]
    assert (annotations["petseg/promoted-by"], annotations["petseg/promoted-at"]) == ("cy", "2026-01-03T00:00:00+00:00")
    assert annotations["petseg/rolled-out-by"] == "bo"  # the earlier change keeps its signature
    assert [p["name"] for p in json.loads(annotations["petseg/history"])] == ["petseg-1"]
    with pytest.raises(ConfigError, match="no canary to promote \\(serving: petseg-2\\)"):
        rollout.promote(promoted, who="cy")


def test_seldon_rollback_of_a_canary_leaves_the_serving_release_alone():
    first = rollout.rollout(None, _render("SeldonDeployment", 1), endpoint="pets", who="ana")
    canary = rollout.rollout(first, _render("SeldonDeployment", 2), endpoint="pets", canary=25, who="ana")
    back = rollout.rollback(canary, who="dee", when=WHEN)
    assert _versions(back) == {"petseg-1": 100} and rollout.candidate_of(back) == ""
    assert back["spec"]["predictors"] == [{**first["spec"]["predictors"][0], "traffic": 100}]
    assert (back["metadata"]["annotations"]["petseg/rolled-back-by"], back["metadata"]["annotations"]
            ["petseg/rolled-back-at"]) == ("dee", WHEN)


@pytest.mark.parametrize("kind", rollout.KINDS)
def test_consecutive_rollbacks_walk_back_one_release_each_and_leave_no_route_behind(kind, kserve_schema,
                                                                                    experiment_schema):
    body = None
    for run in (1, 2, 3):
        body = rollout.rollout(body, _render(kind, run), endpoint="pets", who="ana")
    assert _versions(body) == {"petseg-3": 100}
    body = rollout.rollback(body, who="bo")
    assert _versions(body) == {"petseg-2": 100} and rollout.serving_of(body) == "petseg-2"
    body = rollout.rollback(body, who="bo")
    assert _versions(body) == {"petseg-1": 100} and rollout.serving_of(body) == "petseg-1"
    assert json.loads(body["metadata"]["annotations"]["petseg/history"]) == []
    if kind == "SeldonDeployment":
        assert [p["name"] for p in body["spec"]["predictors"]] == ["petseg-1"]
    elif kind == "Experiment":
        assert body["spec"] == {"candidates": [{"name": "petseg-1", "weight": 100}]}
        check_experiment(body, experiment_schema)
    else:
        assert "canaryTrafficPercent" not in body["spec"]["predictor"]
        assert body["spec"]["predictor"]["annotations"]["petseg/version"] == "petseg-1"
        check_kserve(body, kserve_schema)
    with pytest.raises(ConfigError, match="no earlier release to roll back to \\(serving: petseg-1\\)"):
        rollout.rollback(body, who="bo")


def test_kserve_canary_promote_and_rollback_match_the_published_schema(kserve_schema):
    first = rollout.rollout(None, _render("InferenceService", 1), endpoint="pets", who="ana", when=WHEN)
    check_kserve(first, kserve_schema)
    assert first["metadata"]["name"] == "pets" and "canaryTrafficPercent" not in first["spec"]["predictor"]
    canary = rollout.rollout(first, _render("InferenceService", 2), endpoint="pets", canary=10, who="bo", when=WHEN)
    check_kserve(canary, kserve_schema)
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert _versions(canary) == {"petseg-1": 90, "petseg-2": 10}
    env = {item["name"]: item["value"] for item in canary["spec"]["predictor"]["containers"][0]["env"]}
    assert env["MODEL_URI"] == "s3://petseg/releases/petseg-2/" and env["MODEL_FINGERPRINT"] == "2" * 64

    promoted = rollout.promote(canary, who="cy", when=WHEN)
    check_kserve(promoted, kserve_schema)
    assert "canaryTrafficPercent" not in promoted["spec"]["predictor"] and _versions(promoted) == {"petseg-2": 100}

    back = rollout.rollback(canary, who="dee", when=WHEN)
    check_kserve(back, kserve_schema)
    assert back["spec"]["predictor"] == first["spec"]["predictor"] and _versions(back) == {"petseg-1": 100}


def test_the_schema_check_is_not_a_stand_in(kserve_schema):
    body = rollout.rollout(None, _render("InferenceService", 1), endpoint="pets", who="ana")
    body["spec"]["predictor"]["canaryTrafficPercent"] = "ten"
    with pytest.raises(jsonschema.ValidationError, match="'ten' is not of type 'integer'"):
        check_kserve(body, kserve_schema)
    body["spec"]["predictor"]["canaryTraficPercent"] = 10
    assert unknown_fields(body, kserve_schema[0]) == [".spec.predictor.canaryTraficPercent"]


@pytest.mark.parametrize("canary", [100, -1, True, 12.5])
def test_a_canary_is_a_percentage(canary):
    with pytest.raises(ConfigError, match=f"canary {canary!r} is not a share of traffic"):
        rollout.rollout(None, _render("SeldonDeployment", 1), endpoint="pets", canary=canary, who="ana")


def test_an_endpoint_keeps_its_kind_and_its_name_rules():
    seldon = rollout.rollout(None, _render("SeldonDeployment", 1), endpoint="pets", who="ana")
    with pytest.raises(ConfigError, match="endpoint pets is a SeldonDeployment; a InferenceService cannot"):
        rollout.rollout(seldon, _render("InferenceService", 2), endpoint="pets", who="ana")
    with pytest.raises(ConfigError, match="endpoint name 'Pets' is not accepted"):
        rollout.rollout(None, _render("SeldonDeployment", 1), endpoint="Pets", who="ana")


def test_an_experiment_routes_between_the_releases_models(experiment_schema):
    first = rollout.rollout(None, _render("Experiment", 1), endpoint="pets", canary=10, who="ana", when=WHEN)
    check_experiment(first, experiment_schema)
    assert (first["apiVersion"], first["kind"]) == ("mlops.seldon.io/v1alpha1", "Experiment")
    assert first["metadata"] == {"name": "pets", "namespace": "serving",
                                 "labels": {"app.kubernetes.io/name": "petseg", "petseg/endpoint": "pets"},
                                 "annotations": first["metadata"]["annotations"]}
    # No default: clients call the Experiment (pets.experiment), never one release's Model name.
    assert first["spec"] == {"candidates": [{"name": "petseg-1", "weight": 100}]}  # nothing to be a canary beside
    annotations = first["metadata"]["annotations"]
    assert (annotations["petseg/serving"], annotations["petseg/candidate"]) == ("petseg-1", "")
    assert (annotations["petseg/rolled-out-by"], annotations["petseg/rolled-out-at"]) == ("ana", WHEN)

    canary = rollout.rollout(first, _render("Experiment", 2), endpoint="pets", canary=10, who="bo", when=WHEN)
    check_experiment(canary, experiment_schema)
    assert canary["spec"]["candidates"] == [{"name": "petseg-1", "weight": 90}, {"name": "petseg-2", "weight": 10}]
    assert _versions(canary) == {"petseg-1": 90, "petseg-2": 10}
    assert (rollout.serving_of(canary), rollout.candidate_of(canary)) == ("petseg-1", "petseg-2")
    assert canary["metadata"]["annotations"]["petseg/change"] == "rollout of petseg-2, 10 % canary"
    with pytest.raises(ConfigError, match="canary of petseg-2 in progress: `petseg promote pets`"):
        rollout.rollout(canary, _render("Experiment", 3), endpoint="pets", who="bo")

    promoted = rollout.promote(canary, who="cy", when=WHEN)
    check_experiment(promoted, experiment_schema)
    assert promoted["spec"] == {"candidates": [{"name": "petseg-2", "weight": 100}]}
    assert (rollout.serving_of(promoted), rollout.candidate_of(promoted)) == ("petseg-2", "")
    assert json.loads(promoted["metadata"]["annotations"]["petseg/history"]) == [
        {"model": "petseg-1", "version": "petseg-1"}]
    assert promoted["metadata"]["annotations"]["petseg/promoted-by"] == "cy"

    dropped = rollout.rollback(canary, who="dee", when=WHEN)
    check_experiment(dropped, experiment_schema)
    assert dropped["spec"] == first["spec"] and _versions(dropped) == {"petseg-1": 100}
    assert json.loads(dropped["metadata"]["annotations"]["petseg/history"]) == []
    assert dropped["metadata"]["annotations"]["petseg/change"] == "rollback to petseg-1"


def test_an_experiment_replaced_outright_keeps_the_release_before_for_a_rollback(experiment_schema):
    body = rollout.rollout(None, _render("Experiment", 1), endpoint="pets", who="ana")
    body = rollout.rollout(body, _render("Experiment", 2), endpoint="pets", who="bo", when=WHEN)
    check_experiment(body, experiment_schema)
    assert body["spec"] == {"candidates": [{"name": "petseg-2", "weight": 100}]}
    assert body["metadata"]["annotations"]["petseg/change"] == "rollout of petseg-2"
    back = rollout.rollback(body, who="cy", when=WHEN)
    check_experiment(back, experiment_schema)
    assert back["spec"] == {"candidates": [{"name": "petseg-1", "weight": 100}]}
    assert rollout.serving_of(back) == "petseg-1" and back["metadata"]["annotations"]["petseg/rolled-back-by"] == "cy"
    with pytest.raises(ConfigError, match="no earlier release to roll back to \\(serving: petseg-1\\)"):
        rollout.rollback(back, who="cy")


def test_the_experiment_schema_refuses_what_seldon_does_not_know(experiment_schema):
    body = rollout.rollout(None, _render("Experiment", 1), endpoint="pets", who="ana")
    body["spec"]["candidates"][0]["weight"] = "all"
    with pytest.raises(jsonschema.ValidationError, match="'all' is not of type 'integer'"):
        check_experiment(body, experiment_schema)
    body["spec"]["candidates"][0] = {"modelName": "petseg-1", "weight": 100}
    assert unknown_fields(body, experiment_schema) == [".spec.candidates[0].modelName"]
    with pytest.raises(jsonschema.ValidationError, match="'name' is a required property"):
        check_experiment(body, experiment_schema)


def test_an_experiment_endpoint_keeps_its_kind():
    experiment = rollout.rollout(None, _render("Experiment", 1), endpoint="pets", who="ana")
    with pytest.raises(ConfigError, match="endpoint pets is a Experiment; a SeldonDeployment cannot"):
        rollout.rollout(experiment, _render("SeldonDeployment", 2), endpoint="pets", who="ana")
    with pytest.raises(ConfigError, match="server 'seldon2' is unknown: expected one of seldon, mlserver, seldon-v2"):
        rollout.roll_out(_release(1), endpoint="pets", who="ana", server="seldon2")


# -- a Seldon Core v2 rollout, against a real S3 server ---------------------------------------------------------


class ReadyObjects:
    """CustomObjectsApi of a cluster whose controllers report each object Ready at once; ``seen(body)`` is noted
    as each object is created (what S3 held then)."""

    def __init__(self, seen):
        self.objects, self.created, self.seen = {}, [], seen

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        from kubernetes import client

        if (plural, name) not in self.objects:
            raise client.ApiException(status=404, reason="Not Found")
        return self.objects[(plural, name)]

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append((body["kind"], self.seen(body)))
        self.objects[(plural, body["metadata"]["name"])] = {
            **body, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """A release of an untrained small model (version petseg-7), on this machine."""
    from releases import small_release

    return small_release(tmp_path_factory.mktemp("release") / "petseg-7")


def test_a_seldon_v2_rollout_writes_the_settings_its_model_loads_before_applying_it(s3, moto_endpoint, tiny_release,
                                                                                    monkeypatch, tmp_path):
    """What the flow passes for every server; the settings land where the Model's storageUri points before the
    Model exists, and MLServer, given them as Seldon's agent gives them (the model named after the Model and
    its generation), loads the release with petseg's runtime."""
    import asyncio

    from kubernetes import client
    from mlserver.repository.load import load_model_settings

    from petseg import layout
    from petseg.entrypoints.mlserver_runtime import PetSegRuntime

    s3.create_bucket(Bucket="petseg")
    for path in sorted(tiny_release.iterdir()):
        s3.upload_file(str(path), "petseg", f"metaflow/releases/petseg-7/{path.name}")
    manifest = {**json.loads((tiny_release / "manifest.json").read_text()),
                "model_uri": "s3://petseg/metaflow/releases/petseg-7/"}
    key = "metaflow/seldon-models/petseg-7/model-settings.json"
    api = ReadyObjects(lambda body: [o["Key"] for o in s3.list_objects_v2(Bucket="petseg", Prefix=key).get("Contents", [])])
    monkeypatch.setattr(client, "CustomObjectsApi", lambda api_client=None: api)

    result = rollout.roll_out(manifest, endpoint="pets", who="ana", server="seldon-v2", image="petseg:test",
                              namespace="serving", api_client=object(), timeout=5, s3_endpoint_url=moto_endpoint,
                              secrets=["petseg-serving-s3"])
    assert result["traffic"] == {"petseg-7": 100}
    assert api.created == [("Model", [key]), ("Experiment", [key])]
    model = api.objects[("models", "petseg-7")]
    assert model["spec"]["storageUri"] == "s3://petseg/metaflow/seldon-models/petseg-7/"
    release = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="petseg", Prefix="metaflow/releases/")["Contents"])
    assert release == [f"metaflow/releases/petseg-7/{p.name}" for p in sorted(tiny_release.iterdir())]  # untouched

    written = json.loads(s3.get_object(Bucket="petseg", Key=key)["Body"].read())
    assert written == k8s.model_settings(manifest)
    folder = tmp_path / "models" / "petseg-7_1"  # where the agent puts the Model's folder, named as it names it
    folder.mkdir(parents=True)
    (folder / "model-settings.json").write_text(json.dumps({**written, "name": "petseg-7_1"}))
    settings = load_model_settings(str(folder / "model-settings.json"))
    assert layout.is_model_of(settings.name, manifest["version"])
    monkeypatch.delenv("MODEL_URI", raising=False)  # the settings choose the release
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    runtime = PetSegRuntime(settings)
    assert asyncio.run(runtime.load())
    assert runtime._tags["model_version"] == "petseg-7" and runtime._fingerprint == manifest["model_fingerprint"]


@pytest.mark.parametrize("option", [{"tokens_secret": "petseg-serving-tokens"}, {"resources": {}},
                                    {"feedback_uri": "s3://petseg/feedback/"}])
def test_a_seldon_v2_model_refuses_what_only_its_servers_pod_takes(option):
    with pytest.raises(ConfigError, match=f"a Seldon Core v2 Model cannot take {next(iter(option))}: it runs in its "
                                          "Server's pod"):
        rollout.roll_out(_release(1), endpoint="pets", who="ana", server="seldon-v2", api_client=object(), **option)
