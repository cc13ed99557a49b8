"""An endpoint on a cluster without an operator: the Service's record of what serves, what is staged, what served
before (`petseg.deploy.deployment`), the accepted releases' ConfigMap (`petseg.deploy.cluster_endpoint`), and how a
run chooses where its champion comes from. The cluster tier runs them against a real API server and kube-proxy."""

import json
import types

import pytest

from petseg.deploy import cluster_endpoint, deployment
from petseg.errors import ConfigError

A, B, C = "petseg-1", "petseg-2", "petseg-3"


def _manifest(version: str) -> dict:
    return {"version": version, "pathspec": f"PetSegFlow/{version[7:]}", "run_id": version[7:],
            "model_fingerprint": "a" * 64, "dataset_fingerprint": "b" * 64, "code_version": "0.1.0",
            "model_uri": f"s3://bucket/releases/{version}/", "location": f"s3://bucket/releases/{version}/"}


def _deployment(version: str) -> dict:
    return deployment.render_deployment(_manifest(version), server="seldon", endpoint="pets", image="petseg:1",
                                        namespace="serving", tokens_secret="tokens")


def test_a_first_release_is_served_with_an_empty_history_and_signed():
    service = deployment.switch(None, _deployment(A), endpoint="pets", who="ana", change="rolled-out")
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "petseg", "petseg/endpoint": "pets",
                                           "petseg/version": A}
    assert deployment.serving_of(service) == A and deployment.history_of(service) == []
    assert deployment.candidate_of(service) == ""
    annotations = service["metadata"]["annotations"]
    assert annotations["petseg/rolled-out-by"] == "ana" and annotations["petseg/changed-by"] == "ana"
    assert annotations["petseg/model-uri"] == f"s3://bucket/releases/{A}/"


def test_switches_push_what_served_onto_the_history_and_a_rollback_takes_it_off():
    first = deployment.switch(None, _deployment(A), endpoint="pets", who="ana", change="rolled-out")
    second = deployment.switch(first, _deployment(B), endpoint="pets", who="ana", change="promoted")
    third = deployment.switch(second, _deployment(C), endpoint="pets", who="ana", change="promoted")
    assert deployment.history_of(third) == [A, B]
    back = deployment.switch(third, _deployment(B), endpoint="pets", who="bo", change="rolled-back", rollback=True)
    assert deployment.serving_of(back) == B and deployment.history_of(back) == [A]
    assert back["metadata"]["annotations"]["petseg/rolled-back-by"] == "bo"
    again = deployment.switch(back, _deployment(B), endpoint="pets", who="bo", change="rolled-out")
    assert deployment.history_of(again) == [A]  # the same release again is not its own history


def test_the_history_keeps_the_last_releases_only():
    service = deployment.switch(None, _deployment("petseg-0"), endpoint="pets", who="ana", change="rolled-out")
    for index in range(1, 9):
        service = deployment.switch(service, _deployment(f"petseg-{index}"), endpoint="pets", who="ana",
                                    change="rolled-out")
    assert deployment.history_of(service) == [f"petseg-{i}" for i in range(8 - deployment.HISTORY, 8)]


def test_a_deployment_remembers_its_replicas_for_a_rollback_from_zero():
    rendered = deployment.render_deployment(_manifest(A), server="mlserver", endpoint="pets", image="petseg:1",
                                            replicas=3)
    assert rendered["metadata"]["annotations"]["petseg/replicas"] == "3"


def _config_map(text: str):
    return types.SimpleNamespace(data={"releases.json": text})


def test_the_accepted_releases_record_names_what_is_wrong_with_it():
    assert cluster_endpoint.record_name("pets") == "petseg-endpoint-pets"
    with pytest.raises(ConfigError, match="petseg-endpoint-pets key releases.json is not JSON"):
        cluster_endpoint._releases(_config_map("{"), "serving", "pets")
    with pytest.raises(ConfigError, match="not a list of releases with versions"):
        cluster_endpoint._releases(_config_map(json.dumps([{"location": "s3://x/"}])), "serving", "pets")
    assert cluster_endpoint._releases(_config_map(json.dumps([{"version": A}])), "serving", "pets") == [
        {"version": A}]
    with pytest.raises(ConfigError, match="endpoint name 'Pets!'"):
        cluster_endpoint.record_name("Pets!")


@pytest.mark.parametrize("deploy, where", [("kubernetes", "cluster"), ("operator", "cluster"), ("local", "machine"),
                                           ("none", "machine")])
def test_a_run_takes_its_champion_from_where_it_deploys(monkeypatch, deploy, where):
    from petseg.flow import stages

    monkeypatch.setattr(cluster_endpoint, "champion", lambda endpoint, namespace, kind: {"version": "cluster"})
    monkeypatch.setattr(stages.endpoints, "champion", lambda endpoint: {"version": "machine"})
    assert stages.champion(endpoint="pets", choice="auto", deploy=deploy) == {"version": where}
    assert stages.champion(endpoint="pets", choice="none", deploy=deploy) is None
    assert stages.champion(endpoint="pets", choice="s3://b/r/", deploy=deploy) == {"version": "", "location": "s3://b/r/"}


def test_promote_and_rollback_on_the_command_line_move_a_plain_deployments_endpoint(monkeypatch, capsys):
    from petseg.cli import endpoint as commands

    calls = []

    def promote(name, *, who, namespace):
        calls.append(("promote", name, who, namespace))
        return {"traffic": {B: 100}, "candidate": ""}

    monkeypatch.setattr(deployment, "promote", promote)
    args = types.SimpleNamespace(name="pets", namespace="serving", kind="deployment", by="ops")
    assert commands.promote_command(args) == 0
    assert calls == [("promote", "pets", "ops", "serving")]
    assert capsys.readouterr().out == f"pets: promoted by ops; traffic {B} 100 %\n"
