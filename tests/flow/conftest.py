"""The flow tier's shared runs: every flow step is a process that imports TensorFlow, so the tier
runs the flow as few times as it can: one released run (mirrored into the pachd stand-in, its
OpenLineage events sent to a receiver on loopback, its file reads audited), one run big enough to
learn, and one run that fails on purpose in train and is resumed (its events kept as JSON lines).
"""

import os

import pytest

from harness import LEARNING, REPO, TINY, resume_flow, run_flow, session_root


@pytest.fixture(scope="session")
def flow_pachd():
    """The Pachyderm stand-in (tests/support/pachd_standin.py) the tier's runs mirror into."""
    from pachd_standin import running_standin

    with running_standin() as standin:
        yield standin


@pytest.fixture(scope="session")
def lineage_receiver():
    """A real HTTP server on loopback that receives the released run's OpenLineage events."""
    from lineage_receiver import running_receiver

    with running_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def opens_log(tmp_path_factory):
    """Where the released run's processes log the files they open (tests/support/open_audit)."""
    return tmp_path_factory.mktemp("opens")


@pytest.fixture(scope="session")
def released(flow_pachd, lineage_receiver, opens_log):
    """A tiny portable run that passes the gate (floor 0, any lead), the first release of its endpoint, with its
    lineage mirrored into the stand-in, its OpenLineage events sent over HTTP, and every file its steps
    open logged.

    Returns (Run, its console output).
    """
    audit = str(REPO / "tests" / "support" / "open_audit")
    env = {"OPENLINEAGE_URL": lineage_receiver.url, "OPENLINEAGE_NAMESPACE": "petseg-tests",
           "PYTHONPATH": os.pathsep.join(filter(None, [audit, os.environ.get("PYTHONPATH")])),
           "PETSEG_TEST_OPENS": str(opens_log), "PETSEG_TEST_OPENS_UNDER": str(session_root())}
    status, run, output = run_flow(env=env, **TINY, min_miou=0.0, min_margin=-1.0, pachyderm=flow_pachd.address,
                                   endpoint="released", portable=True)
    assert status == "successful", output[-4000:]
    return run, output


@pytest.fixture(scope="session")
def released_run(released):
    return released[0]


@pytest.fixture(scope="session")
def learning_run():
    """A run big enough to learn, with every gate setting at its default."""
    status, run, output = run_flow(**LEARNING, endpoint="learning")
    assert status == "successful", output[-4000:]
    return run


@pytest.fixture(scope="session")
def resumed_run(flow_pachd, released_run):
    """The same run with min_miou 1.01, failed on purpose in train, then resumed from train.

    It is for the released run's endpoint, so the released run is its champion: the same model (strict
    mode), scored on the same images. No OpenLineage transport is configured: both keep their events as
    JSON lines beside the datastore.
    Returns (failed Run, resumed Run, resume output).
    """
    status, failed, output = run_flow(env={"PETSEG_FAIL_AT": "train"}, **TINY, min_miou=1.01,
                                      pachyderm=flow_pachd.address, endpoint="released", portable=True)
    assert status == "failed", output[-4000:]
    status, resumed, output = resume_flow(failed.id, "train")
    assert status == "successful", output[-4000:]
    return failed, resumed, output
