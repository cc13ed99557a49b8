"""K8sSmokeFlow: the smallest flow that exercises what PetSegFlow needs from a cluster.

1. start: fan out over two numbers.
2. square: one task per number, asking for a GPU as compute steps do.
3. join: gather the results.
4. end: record where the run's tasks ran.

Used by tests/test_kubernetes.py to check the throwaway cluster before the
real flow runs on it: it starts in seconds because it imports no TensorFlow.
"""

import os

from metaflow import FlowSpec, resources, step


class K8sSmokeFlow(FlowSpec):
    """Fan out, ask for a GPU, join."""

    @step
    def start(self):
        """Fan out over two numbers."""
        self.numbers = [2, 3]
        self.next(self.square, foreach="numbers")

    @resources(gpu=1, memory=512, cpu=1)
    @step
    def square(self):
        """Square one number; note the pod it ran in."""
        self.value = self.input**2
        self.pod = os.environ.get("METAFLOW_KUBERNETES_POD_NAME")
        self.next(self.join)

    @step
    def join(self, inputs):
        """Sum the squares."""
        self.total = sum(i.value for i in inputs)
        self.pods = [i.pod for i in inputs]
        self.next(self.end)

    @step
    def end(self):
        """Record the service account the pods ran as."""
        self.service_account = os.environ.get("METAFLOW_KUBERNETES_SERVICE_ACCOUNT_NAME")
        print(f"total={self.total}")


if __name__ == "__main__":
    K8sSmokeFlow()
