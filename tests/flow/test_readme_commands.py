"""README's commands for inspecting a run, run as written in a root shell with no USERNAME.

The commands are read from README.md's shell blocks, not copied here: a command renamed or broken in
README or in the code fails this test. What is substituted, and only that: the released run's id for
``latest`` and ``RUN`` (the session holds several runs), a free port for ``PORT`` and README's example
port, ``RUN/STEP`` for ``card get STEP``, and optional ``[...]`` arguments left out. Each runs from a
directory that looks like the checkout after its runs (``.venv``, ``flows`` and ``petseg`` linked to the
ones under test, ``.metaflow`` to the session's datastore), so that README's relative paths work and its
output files (``report.html``, ``mask.png``) land outside the checkout.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import requests

from harness import REPO, free_port, session_root
from petseg.data import synth

README = REPO / "README.md"
# Each kind of inspection command: how to know it in README, after an optional `.venv/bin/` or `python`.
KINDS = {
    "show": re.compile(r"^(\.venv/bin/)?petseg show "),
    "card": re.compile(r"^(\.venv/bin/)?python flows/seg_flow\.py card get "),
    "verify": re.compile(r"^(\.venv/bin/)?petseg verify (latest|RUN)\b"),
    "lineage": re.compile(r"^(\.venv/bin/)?petseg lineage (latest|RUN)\b"),
    "predict": re.compile(r"^(\.venv/bin/)?petseg predict "),
    "serve": re.compile(r"^(\.venv/bin/)?petseg serve (latest|RUN)\b"),  # what `predict` asks
}
EXAMPLE_PORT = "9000"  # the port README's serving examples use


def readme_commands() -> dict[str, str]:
    """The first command of each kind in README.md's ```sh blocks, its comment removed."""
    found = {}
    for block in re.findall(r"^```sh\n(.*?)^```", README.read_text(), flags=re.S | re.M):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            for kind, pattern in KINDS.items():
                if kind not in found and pattern.match(command):
                    found[kind] = command
    return found


def as_written(command: str, *, run_id: str, port: int | None = None) -> list[str]:
    """The command's words, with only what must change for this session changed."""
    command = re.sub(r"\s*\[[^]]*\]", "", command)  # optional arguments: left out
    words = []
    for word in shlex.split(command):
        word = {"latest": run_id, "RUN": run_id}.get(word, word)
        if port is not None:
            word = word.replace(":PORT", f":{port}").replace(f":{EXAMPLE_PORT}", f":{port}")
            word = str(port) if word in ("PORT", EXAMPLE_PORT) else word
        words.append(word)
    if words[1:4] == ["flows/seg_flow.py", "card", "get"] and "/" not in words[4]:
        # `card get STEP` reads the latest run of the user's namespace: this session has several.
        words[4] = f"{run_id}/{words[4]}"
    return words


@pytest.fixture
def root_shell(tmp_path):
    """(working directory shaped like the checkout, environment of a root shell with no user name)."""
    work = tmp_path / "checkout"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    for name in ("flows", "petseg"):
        (work / name).symlink_to(REPO / name)
    # Where a checkout keeps what its runs made: Metaflow finds cards under the working directory's .metaflow.
    (work / ".metaflow").symlink_to(session_root() / ".metaflow")
    env = {name: value for name, value in os.environ.items()
           if name not in ("USERNAME", "METAFLOW_USER", "SUDO_USER")}
    env.update(USER="root", LOGNAME="root")
    # README writes `petseg ...` as well as `.venv/bin/petseg ...`: the first as in a shell with the venv active.
    env["PATH"] = os.pathsep.join([str(work / ".venv" / "bin"), os.environ.get("PATH", "")])
    # The code under test, before whatever checkout the virtual environment installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return work, env


def test_readme_finds_every_inspection_command_and_names_real_commands():
    found = readme_commands()
    assert set(KINDS) <= set(found), f"README.md lacks a command of kind {sorted(set(KINDS) - set(found))}"
    from petseg import cli

    commands = set(cli.build_parser()._subparsers._group_actions[0].choices)
    named = set()
    for block in re.findall(r"^```sh\n(.*?)^```", README.read_text(), flags=re.S | re.M):
        named |= set(re.findall(r"^(?:\.venv/bin/)?petseg ([a-z-]+)", block, flags=re.M))
    assert named and named <= commands, f"README.md names petseg commands that do not exist: {sorted(named - commands)}"


def test_readme_inspection_commands_work_as_written_in_a_root_shell(released_run, root_shell):
    found = readme_commands()
    assert set(KINDS) <= set(found), f"README.md lacks a command of kind {sorted(set(KINDS) - set(found))}"
    work, env = root_shell
    run_id = released_run.id
    if not (work / ".venv" / "bin" / "petseg").exists():
        pytest.skip(f"no petseg command in {sys.prefix}: README's commands run from a virtual environment")

    def run(kind, **options):
        words = as_written(found[kind], run_id=run_id, **options)
        result = subprocess.run(words, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"`{shlex.join(words)}` exited {result.returncode}:\n{result.stderr[-3000:]}"
        return words, result.stdout + result.stderr

    _, output = run("show")
    assert f"PetSegFlow/{run_id}" in output and "release" in output

    words, output = run("card")
    card = work / words[-1]
    assert card.stat().st_size > 0, output
    assert "<html" in card.read_text(errors="replace").lower()

    _, output = run("verify")
    assert f"verified PetSegFlow/{run_id}" in output

    _, output = run("lineage")
    assert "evaluate" in output and "release" in output

    # `predict` asks for a server: README's `petseg serve`, on a free port.
    port = free_port()
    predict = as_written(found["predict"], run_id=run_id, port=port)
    jpeg = next(word for word in predict if word.endswith(".jpg"))  # README's image name, in the working directory
    images, _ = synth.write_archives(work / "data", count=2, seed=3)
    with tarfile.open(images) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        (work / jpeg).write_bytes(tar.extractfile(member).read())
    serve = as_written(found["serve"], run_id=run_id, port=port)
    server = subprocess.Popen(serve, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health/status", timeout=2).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still loading the model
                pass
            assert server.poll() is None, f"`{shlex.join(serve)}` exited: {server.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"`{shlex.join(serve)}` did not answer in 180 s"
            time.sleep(0.5)
        words, output = run("predict", port=port)
        mask = work / words[words.index("--out") + 1]
        assert mask.stat().st_size > 0, output
        assert f"petseg-{run_id}" in output
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)

