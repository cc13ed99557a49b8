"""The endpoint records: names, accepted releases, the champion, switches and rollbacks."""

import pytest

from petseg.deploy import endpoints
from petseg.errors import ConfigError


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("PETSEG_STATE_DIR", str(tmp_path))
    return tmp_path


def _manifest(run: int) -> dict:
    return {"version": f"petseg-{run}", "location": f"/releases/petseg-{run}", "pathspec": f"PetSegFlow/{run}",
            "model_fingerprint": f"{run}" * 4, "dataset_fingerprint": "d" * 64, "mask_source": "raw"}


def _serving(run: int) -> dict:
    return {**endpoints.entry(_manifest(run)), "since": endpoints.now(), "deployment": {"url": f"http://x/{run}"}}


@pytest.mark.parametrize("name", ["", "Petseg", "pets_eu", "-petseg", "petseg-", "a" * 41, "pets/eu", 7])
def test_bad_names_are_refused_naming_the_value(name):
    with pytest.raises(ConfigError, match=f"endpoint name {name!r} is not accepted"):
        endpoints.check_name(name)


def test_a_first_release_has_no_champion(state):
    assert endpoints.champion("petseg") is None
    assert endpoints.read("petseg") == {"name": "petseg", "releases": [], "serving": None, "history": [],
                                        "front": None}
    assert endpoints.names() == []


def test_the_champion_is_what_serves_else_the_last_accepted():
    endpoints.accept("petseg", _manifest(1))
    endpoints.accept("petseg", _manifest(2))
    assert endpoints.champion("petseg")["version"] == "petseg-2"
    champion = endpoints.champion("petseg")
    assert champion["run"] == "PetSegFlow/2" and champion["mask_source"] == "raw"
    endpoints.switch("petseg", _serving(1), front=None)
    assert endpoints.champion("petseg")["version"] == "petseg-1"
    assert endpoints.champion("other") is None and endpoints.names() == ["petseg"]


def test_switches_keep_a_history_and_rollbacks_walk_it_back():
    front = {"pid": 1, "port": 9000, "url": "http://127.0.0.1:9000"}
    for run in (1, 2, 3):
        endpoints.switch("petseg", _serving(run), front=front)
    record = endpoints.read("petseg")
    assert record["serving"]["version"] == "petseg-3" and record["front"] == front
    assert [entry["version"] for entry in record["history"]] == ["petseg-1", "petseg-2"]
    endpoints.switch("petseg", _serving(2), front=front, rollback=True)
    endpoints.switch("petseg", _serving(1), front=front, rollback=True)
    record = endpoints.read("petseg")
    assert record["serving"]["version"] == "petseg-1" and record["history"] == []


def test_a_stop_puts_what_served_onto_the_history():
    endpoints.switch("petseg", _serving(1), front=None)
    endpoints.switch("petseg", None, front=None)
    record = endpoints.read("petseg")
    assert record["serving"] is None and [entry["version"] for entry in record["history"]] == ["petseg-1"]


def test_an_unreadable_record_is_a_config_error_naming_the_file(state):
    (state / "endpoints").mkdir()
    (state / "endpoints" / "petseg.json").write_text("{not json")
    with pytest.raises(ConfigError, match="petseg.json is not readable JSON"):
        endpoints.read("petseg")
    (state / "endpoints" / "petseg.json").write_text('{"releases": {}}')
    with pytest.raises(ConfigError, match="lacks the lists 'releases' and 'history'"):
        endpoints.champion("petseg")
