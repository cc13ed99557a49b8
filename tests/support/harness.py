"""What tests of every tier share: the repository's paths, flow runs through metaflow.Runner, free ports, files.

The root conftest.py gives each test session a private Metaflow datastore
(``METAFLOW_DATASTORE_SYSROOT_LOCAL``) before anything imports Metaflow; flows
run with that directory as their working directory, since Metaflow stores
cards under the working directory's .metaflow.
"""

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FLOW_FILE = REPO / "flows" / "seg_flow.py"

# The smallest run that still exercises every stage.
TINY = {"source": "synth:48", "trials": 2, "tune_epochs": 1, "epochs": 1, "deploy": "none"}
# The smallest run that learns shapes, judged by the default gate (about 3 minutes on 2 cores).
LEARNING = {"source": "synth:600", "trials": 1, "tune_epochs": 1, "epochs": 8, "deploy": "none"}


def session_root() -> Path:
    """This test session's Metaflow datastore root (set by the root conftest.py)."""
    return Path(os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"])


def run_flow(env: dict | None = None, **params):
    """Run PetSegFlow to completion with metaflow.Runner; returns (status, Run, output)."""
    from metaflow import Runner

    with Runner(str(FLOW_FILE), show_output=False, env={**os.environ, **(env or {})},
                cwd=str(session_root())).run(**params) as result:
        return result.status, result.run, result.stdout + result.stderr


def resume_flow(origin_run_id: str, step: str, env: dict | None = None):
    """Resume a run from ``step``; returns (status, Run, output)."""
    from metaflow import Runner

    with Runner(str(FLOW_FILE), show_output=False, env={**os.environ, **(env or {})},
                cwd=str(session_root())).resume(step_to_rerun=step, origin_run_id=origin_run_id) as result:
        return result.status, result.run, result.stdout + result.stderr


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def flip_one_byte(path: Path) -> bytes:
    """Flip one bit in the middle of a file; returns its original bytes (to put back)."""
    original = path.read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0x01
    path.write_bytes(bytes(changed))
    return original


def commit_files(client, commit) -> dict[str, bytes]:
    """Every file of a Pachyderm commit, by walking it with ListFile and GetFile."""
    from pachyderm_sdk.api import pfs

    found, todo = {}, ["/"]
    while todo:
        for info in client.pfs.list_file(file=pfs.File(commit=commit, path=todo.pop())):
            if info.file_type == pfs.FileType.DIR:
                todo.append(info.file.path)
            else:
                found[info.file.path] = client.pfs.pfs_file(info.file).read()
    return found
