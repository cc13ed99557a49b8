"""The code version of a run: git facts of the launching checkout and Metaflow's code package, as one record.

A run's code version is taken once, on the machine that launches the run
(`at_launch` is the parser of the flow's ``code`` Config, which Metaflow
evaluates there and ships to every step and pod), never recomputed in a step: a pod runs from an image without ``.git``, and a local step could see
a checkout edited since the launch. The record::

    {"commit": "c8ba2d8...", "dirty": False, "branch": "main",
     "checkout": "/home/me/petseg", "repository": "https://github.com/org/petseg.git" or None,
     "code_package": "3f1c..." or None}

``dirty`` is True when the checkout had uncommitted changes to tracked files, or
files git does not ignore and does not track (a new module is code too);
``commit`` is None outside a git checkout. ``code_package`` is the sha of the
code package Metaflow shipped to the run's pods (None for a local run, which
ships none). `describe` gives the one-line form that manifests, served tags and
Pachyderm commits carry: ``<commit>`` or ``<commit>-dirty``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from petseg import __version__
from petseg.errors import ConfigError

_GIT_TIMEOUT = 20
AT_LAUNCH = "taken at launch"
"""The value of the flow's ``code`` Config: its parser, `at_launch`, puts the launching checkout's facts there."""


def _git(checkout: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                                timeout=_GIT_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_facts(checkout: str | Path) -> dict:
    """What git says about the checkout holding ``checkout`` (a file or directory in it).

    Returns:
        ``{"commit", "dirty", "branch", "checkout", "repository"}``: the
        checkout's top directory and its ``origin`` remote (None without one);
        ``commit`` and ``dirty`` are None when ``checkout`` is in no git
        checkout (or git is missing), and ``checkout`` is then the directory.
    """
    path = Path(checkout).resolve()
    directory = path if path.is_dir() else path.parent
    commit = _git(directory, "rev-parse", "HEAD")
    top = _git(directory, "rev-parse", "--show-toplevel")
    if not commit or not top:
        return {"commit": None, "dirty": None, "branch": None, "checkout": str(directory), "repository": None}
    status = _git(directory, "status", "--porcelain")
    branch = _git(directory, "rev-parse", "--abbrev-ref", "HEAD")
    return {
        "commit": commit,
        "dirty": status is None or bool(status),  # unknown counts as dirty
        "branch": None if branch in (None, "HEAD") else branch,
        "checkout": top,
        "repository": _git(directory, "config", "--get", "remote.origin.url") or None,
    }


def at_launch(value: str, *, checkout: str) -> dict:
    """Parser of the flow's ``code`` Config: the git facts of ``checkout`` (`git_facts`).

    Metaflow evaluates a Config once, on the machine that launches the run (or
    deploys it to a scheduler), and ships the value to every step and pod; on
    ``resume`` it reuses the origin run's value.

    Raises:
        ValueError: a value other than `AT_LAUNCH` was given with ``--config-value code``.
    """
    if value != AT_LAUNCH:
        raise ValueError(f"the code config is taken at launch from the flow's checkout and cannot be given "
                         f"(got {value!r}); leave out --config-value code")
    return git_facts(checkout)


def record(facts: dict, *, code_package: str | None) -> dict:
    """The run's code record: launch facts plus the code package the pods ran (see the module docstring)."""
    keys = ("commit", "dirty", "branch", "checkout", "repository")
    return {**{key: facts.get(key) for key in keys}, "code_package": code_package or None}


def describe(code: dict) -> str:
    """``<commit>``, ``<commit>-dirty``, or ``petseg-<version>`` for code from no git checkout."""
    if not code.get("commit"):
        return f"petseg-{__version__}"
    return f"{code['commit']}{'-dirty' if code.get('dirty') else ''}"


def require_clean(code: dict) -> None:
    """Refuse code launched from a checkout with uncommitted changes, or from none.

    Raises:
        ConfigError: naming the checkout and what to do.
    """
    where = code.get("checkout") or "the launching directory"
    if not code.get("commit"):
        raise ConfigError(f"--require_clean: the run was launched from {where}, which is not a git checkout; "
                          "launch it from a clean checkout, or drop --require_clean")
    if code.get("dirty"):
        raise ConfigError(f"--require_clean: the run was launched from {where} at {code['commit'][:12]} with "
                          "uncommitted changes; commit them (or stash them) and launch again, "
                          "or drop --require_clean")
