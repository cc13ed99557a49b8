"""PetSegFlow in name only: a run as whoever can write a Metaflow datastore could leave one.

1. start: nothing.
2. release: the artifacts a released run's release step holds (model_keras, calibration, manifest,
   signatures), each a pickle that writes a file when it is unpickled.
3. end: the lineage graph, the same.

The file each pickle writes is ``$PETSEG_PLANTED_SENTINEL``: a stand-in for any code such bytes could run.
Used by tests/serving/test_trust.py to show that a server or `petseg verify` pointed at a run unpickles
nothing of it before a signed release verified. It imports no TensorFlow and runs in seconds.
"""

import os

from metaflow import FlowSpec, step


class Planted:
    """Pickled as a call of ``open(path, "w")``: unpickling it creates the file at ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


class PetSegFlow(FlowSpec):
    """Artifacts named as PetSegFlow's, planted."""

    @step
    def start(self):
        """Nothing to read."""
        self.next(self.release)

    @step
    def release(self):
        """What a release step holds, planted."""
        planted = Planted(os.environ["PETSEG_PLANTED_SENTINEL"])
        self.model_keras = self.calibration = self.manifest = self.signatures = planted
        self.next(self.end)

    @step
    def end(self):
        """The lineage graph, planted."""
        self.lineage_graph = Planted(os.environ["PETSEG_PLANTED_SENTINEL"])


if __name__ == "__main__":
    PetSegFlow()
