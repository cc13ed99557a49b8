"""Every tier's fixtures: a private Metaflow datastore per session, tier markers, an S3 server.

Tests live in tiers, one directory each, and each directory is a marker:
``unit`` (the library, fast), ``serving`` (real model-server processes),
``flow`` (the workflow end to end, a few shared runs), ``cluster`` (a
throwaway Kubernetes control plane). Harnesses are under tests/support/.
"""

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Before Metaflow is imported anywhere: a private datastore for this session.
os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = tempfile.mkdtemp(prefix="petseg-tests-")
# The user's keys, tokens and deployments stay out of the tests, and the tests' out of the user's.
os.environ["PETSEG_CONFIG_DIR"] = tempfile.mkdtemp(prefix="petseg-tests-config-")
os.environ["PETSEG_STATE_DIR"] = tempfile.mkdtemp(prefix="petseg-tests-state-")
os.environ.setdefault("METAFLOW_USER", "petseg-tests")  # Metaflow refuses to run as "root"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

import pytest  # noqa: E402

from harness import free_port  # noqa: E402

TIERS = ("unit", "serving", "flow", "cluster")


def pytest_collection_modifyitems(items):
    """Mark every test with its tier, the name of the directory it lives in."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real moto S3 server on a free loopback port."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.3)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def s3(moto_endpoint, monkeypatch, tmp_path):
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)
    return boto3.client("s3", endpoint_url=moto_endpoint)


@pytest.fixture(autouse=True)
def _openlineage_settings_stay_in_their_test():
    """openlineage-python's client writes OPENLINEAGE__TRANSPORT__* into os.environ when it reads
    OPENLINEAGE_URL; without this, a test that builds a client would configure a transport for every
    flow run later in the session."""
    before = {key: value for key, value in os.environ.items() if key.startswith("OPENLINEAGE")}
    yield
    for key in [key for key in os.environ if key.startswith("OPENLINEAGE") and key not in before]:
        del os.environ[key]
    os.environ.update(before)
