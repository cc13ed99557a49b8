"""K8sSmokeFlow: the smallest flow that exercises what PetSegFlow needs from a cluster.

1. start: fan out over two numbers.
2. square: one task per number, asking for a GPU as compute steps do.
3. join: gather the results.
4. end: record where the run's tasks ran.

Used by tests/cluster/test_kubernetes.py to check the throwaway cluster before
the real flow runs on it: it starts in seconds because it imports no
TensorFlow. The square tasks record what their container saw (user, working
directory, environment, cgroup limits, mounts), so that the test can check
what the kubelet did with the pod spec, not only the spec.
"""

import os
from pathlib import Path

from metaflow import FlowSpec, kubernetes, resources, step


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def container_facts() -> dict:
    """What this process sees of its container."""
    import petseg

    return {
        "uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(), "home": os.environ.get("HOME"),
        "gpus": os.environ.get("NVIDIA_VISIBLE_DEVICES"),
        "memory_limit": _read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        "cpu_quota": _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
        "cpu_period": _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
        "service_account_token": Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists(),
        "petseg": petseg.__file__,
        "aws_key_set": bool(os.environ.get("AWS_ACCESS_KEY_ID")),
        "s3_endpoint": os.environ.get("METAFLOW_S3_ENDPOINT_URL"),
    }


class K8sSmokeFlow(FlowSpec):
    """Fan out, ask for a GPU, join."""

    @step
    def start(self):
        """Fan out over two numbers."""
        self.numbers = [2, 3]
        self.next(self.square, foreach="numbers")

    @kubernetes(qos="Guaranteed", memory=512)  # limits equal to the requests (memory: below the 4096 MB default)
    @resources(gpu=1, memory=512, cpu=1)
    @step
    def square(self):
        """Square one number; note the pod it ran in and what its container saw."""
        self.value = self.input**2
        self.pod = os.environ.get("METAFLOW_KUBERNETES_POD_NAME")
        self.facts = container_facts()
        self.next(self.join)

    @step
    def join(self, inputs):
        """Sum the squares."""
        self.total = sum(i.value for i in inputs)
        self.pods = [i.pod for i in inputs]
        self.facts = [i.facts for i in inputs]
        self.next(self.end)

    @step
    def end(self):
        """Record the service account the pods ran as."""
        self.service_account = os.environ.get("METAFLOW_KUBERNETES_SERVICE_ACCOUNT_NAME")
        print(f"total={self.total}")


if __name__ == "__main__":
    K8sSmokeFlow()
