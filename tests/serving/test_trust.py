"""What a server trusts: a signed release exactly as signed, never a file added to it, never a Metaflow run.

Both servers are started (`petseg.deploy.local.deploy_local`) on what someone who can write storage could leave:
a copy of the session's release with one file added, and a run whose artifacts are pickles that write a file when
they are unpickled (tests/support/flows/planted_run_flow.py, in a datastore of its own). Each server refuses to
start, naming what it refused, and nothing of the run is unpickled; nor by `petseg verify RUN` or
`petseg serve RUN`, which look for the run's signed release first.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO
from petseg.deploy import local
from petseg.errors import ServingError

PLANTED_FLOW = REPO / "tests" / "support" / "flows" / "planted_run_flow.py"
SERVERS = ("seldon", "mlserver")


@pytest.mark.parametrize("server_kind", SERVERS)
def test_a_release_with_a_file_added_starts_no_server_and_is_named(release_dir, tmp_path, server_kind):
    copy = shutil.copytree(release_dir, tmp_path / release_dir.name)
    (copy / "sitecustomize.py").write_text("import os\n")
    with pytest.raises(ServingError) as refused:
        local.deploy_local(copy, server=server_kind, log_path=tmp_path / "serving.log", timeout=300)
    assert "exited with status" in str(refused.value)
    assert f"release {copy} holds sitecustomize.py, which its signature does not cover" in str(refused.value)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> dict:
    """A run of the planted flow in a datastore of its own; the file its pickles write when unpickled."""
    root = tmp_path_factory.mktemp("planted-datastore")
    sentinel = root / "unpickled"
    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root), "PETSEG_PLANTED_SENTINEL": str(sentinel)}
    env.setdefault("USERNAME", "petseg-tests")
    result = subprocess.run([sys.executable, str(PLANTED_FLOW), "run", "--run-id-file", str(root / "run-id")],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not sentinel.exists()  # the run itself never unpickled its artifacts
    run_id = (root / "run-id").read_text().strip()
    return {"pathspec": f"PetSegFlow/{run_id}", "id": run_id, "root": root, "sentinel": sentinel, "env": env}


@pytest.mark.parametrize("server_kind", SERVERS)
def test_a_server_pointed_at_a_run_unpickles_nothing_of_it(planted_run, tmp_path, monkeypatch, server_kind):
    monkeypatch.setenv("METAFLOW_DATASTORE_SYSROOT_LOCAL", str(planted_run["root"]))
    with pytest.raises(ServingError) as refused:
        local.deploy_local(planted_run["pathspec"], server=server_kind, log_path=tmp_path / "serving.log",
                           timeout=300)
    assert f"model URI {planted_run['pathspec']} is a Metaflow run, whose artifacts are pickles" in str(refused.value)
    assert not planted_run["sentinel"].exists()


def _petseg(planted_run: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "petseg", *args], cwd=planted_run["root"], env=planted_run["env"],
                          capture_output=True, text=True, timeout=300)


def test_verify_and_serve_of_a_run_read_nothing_of_it_before_its_signed_release(planted_run, release_dir):
    release = Path(planted_run["root"]) / ".metaflow" / "petseg" / "releases" / f"petseg-{planted_run['id']}"
    for command in (("verify", planted_run["id"]), ("serve", planted_run["id"], "--port", "0")):
        result = _petseg(planted_run, *command)
        assert result.returncode == 2 and f"has no signed release at {release}" in result.stderr, result.stderr
    # Another run's release, signed by a trusted key, put where the run's would be: verify names the mismatch.
    shutil.copytree(release_dir, release)
    result = _petseg(planted_run, "verify", planted_run["id"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("MISMATCH the run the release names does not match: expected "
                                    f"{planted_run['pathspec']}, found PetSegFlow/1234")
    assert not planted_run["sentinel"].exists()


def test_model_settings_that_name_another_release_than_their_model_start_no_server(release_dir, manifest, tmp_path):
    """Seldon Core v2 names the model after its Model object; the unsigned settings beside it name the release."""
    from petseg.deploy import kubernetes

    folder = tmp_path / "models"
    shutil.copytree(local.MLSERVER_SETTINGS, folder)
    settings = {**kubernetes.model_settings(manifest, model_uri=str(release_dir)), "name": "petseg-999_1"}
    (folder / local.MODEL_NAME / "model-settings.json").write_text(json.dumps(settings))
    env = {name: value for name, value in local.child_environment().items() if name != "MODEL_URI"}
    ports = dict(zip(("MLSERVER_HTTP_PORT", "MLSERVER_GRPC_PORT", "MLSERVER_METRICS_PORT"),
                     map(str, local.free_ports(3))))
    result = subprocess.run([sys.executable, "-m", "petseg.entrypoints.mlserver_runtime", str(folder)],
                            cwd=tmp_path, env={**env, **ports}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert (f"release {release_dir} is 'petseg-1234', but the model server was told to serve it as model "
            "'petseg-999_1', another release's") in result.stdout + result.stderr


def test_a_resumed_run_leads_to_its_own_release_though_resume_cloned_its_first_steps(planted_run):
    """Its release is looked for under its own id, from its metadata, and nothing of it is unpickled."""
    id_file = Path(planted_run["root"]) / "resumed-id"
    result = subprocess.run([sys.executable, str(PLANTED_FLOW), "resume", "end", "--origin-run-id", planted_run["id"],
                             "--run-id-file", str(id_file)], cwd=planted_run["root"], env=planted_run["env"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = id_file.read_text().strip()
    result = _petseg(planted_run, "verify", resumed)
    release = Path(planted_run["root"]) / ".metaflow" / "petseg" / "releases" / f"petseg-{resumed}"
    assert result.returncode == 2 and f"has no signed release at {release}" in result.stderr, result.stderr
    assert not planted_run["sentinel"].exists()
