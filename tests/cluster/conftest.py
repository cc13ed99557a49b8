"""The cluster tier's shared cluster: one real single-node Kubernetes cluster per session.

``tests/support/cluster/`` starts it: etcd, kube-apiserver, kube-scheduler and
kube-controller-manager, a kubelet running pods in containerd and runc from
the project's image (built by ``image.sh`` from the Dockerfile), a closed pod
bridge, S3 on that bridge, and a device plugin advertising ``nvidia.com/gpu``
(the one stand-in: there is no GPU). The binaries and the image are built
once and cached. Flows are launched as the ``petseg`` service account of
``k8s/base``, so its Roles are what they may do.

Flows and the Metaflow client run in subprocesses: Metaflow reads its
configuration once per process, and this one may hold another.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cluster_client import private_dir
from harness import REPO

CLUSTER = REPO / "tests" / "support" / "cluster"


def _built() -> tuple[str, str]:
    """Build (or find cached) the cluster's binaries and the project's image; return the image and its archive."""
    subprocess.run([str(CLUSTER / "build.sh")], check=True)
    result = subprocess.run([str(CLUSTER / "image.sh")], env={**os.environ, "PYTHON": sys.executable},
                            stdout=subprocess.PIPE, text=True, check=True)
    image, archive = result.stdout.split()[-2:]
    return image, archive


@pytest.fixture(scope="session")
def cluster():
    """A throwaway cluster for the session: its environment (KUBECONFIG, METAFLOW_HOME, ...)."""
    image, archive = _built()
    with private_dir("petseg-cluster-") as directory, open(directory / "supervisor.log", "wb") as log:
        supervisor = subprocess.Popen([sys.executable, str(CLUSTER / "cluster.py"), "--dir", str(directory),
                                       "--image", image, "--image-archive", archive],
                                      stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not (directory / "env.sh").exists():
                if supervisor.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the test cluster did not start:\n"
                                       + (directory / "supervisor.log").read_text(errors="replace")[-4000:])
                time.sleep(0.5)
            yield json.loads((directory / "env.json").read_text())
        finally:
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(timeout=120)
            except subprocess.TimeoutExpired:
                supervisor.kill()
                supervisor.wait()


@pytest.fixture(scope="session")
def admin(cluster):
    """Kubernetes API clients as the cluster administrator."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=cluster["PETSEG_ADMIN_KUBECONFIG"])
    return {"core": client.CoreV1Api(api), "batch": client.BatchV1Api(api), "apps": client.AppsV1Api(api),
            "custom": client.CustomObjectsApi(api), "ext": client.ApiextensionsV1Api(api)}


@pytest.fixture(scope="session")
def workdir():
    """Where flows are launched from (Metaflow keeps local metadata there)."""
    with private_dir("petseg-launch-") as directory:
        yield directory




@pytest.fixture(scope="session")
def signed_release(cluster, admin):
    """A small model's release, signed with the cluster's key, in the cluster's S3: (manifest, location, dir)."""
    import cluster_release

    with private_dir("petseg-release-") as directory:
        yield cluster_release.signed_release(cluster, admin, directory)


@pytest.fixture(scope="session")
def tokens_secret(cluster, admin):
    """The serving pods' tokens Secret (`cluster_release.PREDICT`, `cluster_release.FEEDBACK`)."""
    import cluster_release

    return cluster_release.tokens_secret(cluster, admin)
