"""Processes of the test cluster: start them, log them, wait for them, stop them together."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel sends SIGTERM to the child when the
    # supervisor dies, so a crash of it leaves nothing behind.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def wait_for(what: str, check, *, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Call ``check`` until it returns a true value, or fail after ``timeout`` seconds.

    Args:
        what: Names the awaited condition in the error.
        check: Returns a true value when ready; exceptions count as not ready.
        timeout: Seconds to wait.
        proc: A process that must stay alive meanwhile.
        log: Its log file, quoted in the error.

    Returns:
        What ``check`` returned.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:  # not up yet
            pass
        dead = proc is not None and proc.poll() is not None
        if dead or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            state = f"exited with {proc.returncode}" if dead else f"not ready after {timeout:.0f} s"
            raise RuntimeError(f"{what} {state}\n{tail}")
        time.sleep(0.3)


class Processes:
    """The processes one cluster started, each logging to ``LOGS/NAME.log``, stopped last-started first.

    Args:
        logs: Directory for the log files.
    """

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start one process, logging to its file, and track it."""
        with open(self.log(name), "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent, start_new_session=True)
        self.started.append((name, proc))
        return proc

    def dead(self) -> list[tuple[str, int]]:
        """The processes that exited, with their exit status."""
        return [(name, proc.returncode) for name, proc in self.started if proc.poll() is not None]

    def stop(self, grace: float = 20) -> None:
        """Stop every started process, the last started first."""
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.started.clear()
