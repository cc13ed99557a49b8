"""Shared fixtures: one Metaflow datastore per session, and flow runs shared by every test.

Every flow step is a process that imports TensorFlow, so the suite runs the
flow as few times as it can: one released run (mirrored into the pachd
stand-in), and one run that fails on purpose in train and is resumed.
"""

import os
import sys
import tempfile
from pathlib import Path

# Before Metaflow is imported anywhere: a private datastore for this session.
SESSION_ROOT = Path(tempfile.mkdtemp(prefix="petseg-tests-"))
os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = str(SESSION_ROOT)
os.environ.setdefault("METAFLOW_USER", "petseg-tests")  # Metaflow refuses to run as "root"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FLOW_FILE = REPO / "flows" / "seg_flow.py"
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The smallest run that still exercises every stage.
TINY = {"source": "synth:48", "trials": 2, "tune_epochs": 1, "epochs": 1, "deploy": "none"}
# The smallest run that learns shapes, judged by the default gate (about 3 minutes on 2 cores).
LEARNING = {"source": "synth:600", "trials": 1, "tune_epochs": 1, "epochs": 8, "deploy": "none"}


def run_flow(env: dict | None = None, **params):
    """Run PetSegFlow to completion with metaflow.Runner; returns (status, Run, output)."""
    from metaflow import Runner

    # Cards are stored under the working directory's .metaflow, not the datastore root: run there.
    with Runner(str(FLOW_FILE), show_output=False, env={**os.environ, **(env or {})}, cwd=str(SESSION_ROOT)).run(
            **params) as result:
        return result.status, result.run, result.stdout + result.stderr


def resume_flow(origin_run_id: str, step: str, env: dict | None = None):
    """Resume a run from ``step``; returns (status, Run, output)."""
    from metaflow import Runner

    with Runner(str(FLOW_FILE), show_output=False, env={**os.environ, **(env or {})}, cwd=str(SESSION_ROOT)).resume(
            step_to_rerun=step, origin_run_id=origin_run_id) as result:
        return result.status, result.run, result.stdout + result.stderr


@pytest.fixture(scope="session")
def pachd():
    """The Pachyderm stand-in (tests/pachd_standin.py), for the whole session."""
    from pachd_standin import running_standin

    with running_standin() as standin:
        yield standin


@pytest.fixture(scope="session")
def released(pachd):
    """A tiny run that passes the gate (floor 0, any lead), with its lineage mirrored into the stand-in.

    Returns (Run, its console output).
    """
    status, run, output = run_flow(**TINY, min_miou=0.0, min_margin=-1.0, pachyderm=pachd.address)
    assert status == "successful", output[-4000:]
    return run, output


@pytest.fixture(scope="session")
def learning_run():
    """A run big enough to learn, with every gate setting at its default."""
    status, run, output = run_flow(**LEARNING)
    assert status == "successful", output[-4000:]
    return run


@pytest.fixture(scope="session")
def released_run(released):
    return released[0]


@pytest.fixture(scope="session")
def resumed_run(pachd, released_run):
    """The same run with min_miou 1.01, failed on purpose in train, then resumed from train.

    Returns (failed Run, resumed Run, resume output).
    """
    status, failed, output = run_flow(env={"PETSEG_FAIL_AT": "train"}, **TINY, min_miou=1.01,
                                      pachyderm=pachd.address)
    assert status == "failed", output[-4000:]
    status, resumed, output = resume_flow(failed.id, "train")
    assert status == "successful", output[-4000:]
    return failed, resumed, output


@pytest.fixture(scope="session")
def release_dir(released_run) -> Path:
    """The release directory the released run exported (model.keras, calibration.json, manifest.json)."""
    return Path(released_run["release"].task.data.manifest["location"])
