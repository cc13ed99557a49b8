"""One stable local endpoint: a release switched in, and rolled back, while clients keep sending requests."""

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from serving_support import bearer

from petseg import layout, tokens
from petseg.deploy import endpoints, local, local_endpoint
from petseg.errors import ConfigError
from petseg.release import bundle

REQUEST = {"data": {"ndarray": np.full((24, 24, 3), 0.5).tolist()}}


@pytest.fixture(scope="module")
def releases(release_dir, manifest, tmp_path_factory):
    """Two releases for the endpoint: a copy of the session's (each local deployment keeps a record per release
    directory), and the same model released again by run 5678."""
    copy = shutil.copytree(release_dir, tmp_path_factory.mktemp("first") / release_dir.name)
    target = tmp_path_factory.mktemp("second") / "petseg-5678"
    second = bundle.build_manifest(
        run_id="5678", flow_name="PetSegFlow", model_fingerprint=manifest["model_fingerprint"],
        dataset_fingerprint="e" * 64, code_version="0.1.0+test", metrics={}, settings={}, location=str(target),
        image_size=manifest["image_size"])
    bundle.export(str(target), model_keras=(release_dir / "model.keras").read_bytes(),
                  calibration=json.loads((release_dir / "calibration.json").read_text()), manifest=second)
    return [{**endpoints.entry(manifest), "location": str(copy)},
            endpoints.entry(json.loads((target / "manifest.json").read_text()))]


class Clients:
    """Two threads sending predictions to one address until stopped; every answer's status and release."""

    def __init__(self, url: str):
        self.url, self.answers, self.stopped = url, [], threading.Event()
        self.threads = [threading.Thread(target=self._send) for _ in range(2)]
        for thread in self.threads:
            thread.start()

    def _send(self):
        with requests.Session() as session:
            session.headers.update(bearer())
            while not self.stopped.is_set():
                try:
                    answer = session.post(self.url + "/api/v1.0/predictions", json=REQUEST, timeout=60)
                    tags = answer.json().get("meta", {}).get("tags", {})
                    self.answers.append((answer.status_code, tags.get("model_version")))
                except requests.RequestException as err:
                    self.answers.append((type(err).__name__, None))

    def stop(self) -> list:
        time.sleep(1.0)  # a few answers after the switch
        self.stopped.set()
        for thread in self.threads:
            thread.join()
        return self.answers


def _versions(answers: list) -> list:
    assert answers and all(status == 200 for status, _ in answers), sorted({status for status, _ in answers}, key=str)
    return [version for _, version in answers]


def test_switch_and_rollback_drop_no_request(releases, tokens_file):
    first, second = releases
    name = "swap"
    try:
        started = local_endpoint.roll_out(name, first, timeout=300)
        url = started["url"]
        assert started["release"] == first["version"] and started["replaced"] is None
        clients = Clients(url)
        switched = local_endpoint.roll_out(name, second, timeout=300)
        versions = _versions(clients.stop())
        assert switched["url"] == url and switched["replaced"] == first["version"]
        assert set(versions) == {first["version"], second["version"]} and versions[-1] == second["version"]
        # Once the switch returned, the old server is gone.
        assert local.stop_local(started["backend"]["pid"]) is False

        [row] = local_endpoint.status(name)
        assert row["up"] and row["url"] == url and row["history"] == [first["version"]]
        assert row["serving"]["version"] == second["version"] and row["serving"]["since"]
        assert row["serving"]["model_fingerprint"] == first["model_fingerprint"]

        clients = Clients(url)
        back = local_endpoint.rollback(name, timeout=300)
        versions = _versions(clients.stop())
        assert back["release"] == first["version"] and back["replaced"] == second["version"]
        assert versions[-1] == first["version"]
        [row] = local_endpoint.status(name)
        assert row["serving"]["version"] == first["version"] and row["history"] == []
        with pytest.raises(ConfigError, match=f"no earlier release to roll back to \\(serving: {first['version']}\\)"):
            local_endpoint.rollback(name)
    finally:
        local_endpoint.stop(name)
    [row] = local_endpoint.status(name)
    assert not row["up"] and row["serving"] is None
    # Serving wrote its record and log in the state directory, and nothing into the releases.
    for served in (first, second):
        assert sorted(path.name for path in Path(served["location"]).iterdir()) == sorted(bundle.ALL_FILES)
        record = layout.deployment_dir(served["location"])
        assert {"deployment.json", "serving.log"} <= {path.name for path in record.iterdir()}
    assert back["backend"]["log"] == str(layout.deployment_dir(first["location"]) / "serving.log")


def test_a_stopped_endpoint_answers_that_nothing_serves(releases, tokens_file):
    from petseg.entrypoints.endpoint_proxy import Front

    front = Front("nothing-here", ("127.0.0.1", 0), table=tokens.load(tokens_file))
    thread = threading.Thread(target=front.serve_forever)
    thread.start()
    try:
        url = f"http://127.0.0.1:{front.server_address[1]}"
        answer = requests.post(url + "/api/v1.0/predictions", json=REQUEST, headers=bearer(), timeout=10)
        assert answer.status_code == 503 and answer.json()["status"]["reason"] == "NO_RELEASE"
        assert "nothing serves under endpoint nothing-here" in answer.json()["status"]["info"]
        status = requests.get(url + endpoints.STATUS_PATH, headers=bearer(), timeout=10).json()
        assert status == {"name": "nothing-here", "version": None, "backend": None, "in_flight": {}}
    finally:
        front.shutdown()
        thread.join()
        front.server_close()
