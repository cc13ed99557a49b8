"""Where petseg keeps the user's own files: configuration (keys, tokens) and state (what serves where).

The configuration directory is ``$PETSEG_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/petseg``, else
``~/.config/petseg``. The state directory is ``$PETSEG_STATE_DIR``, else ``$XDG_STATE_HOME/petseg``,
else ``~/.local/state/petseg``. Neither is created here: the module that writes a file there
creates the directory, with the permissions that file needs.
"""

import os
from pathlib import Path


def _directory(own: str, xdg: str, fallback: str) -> Path:
    if os.environ.get(own):
        return Path(os.environ[own]).expanduser()
    if os.environ.get(xdg):
        return Path(os.environ[xdg]).expanduser() / "petseg"
    return Path(fallback).expanduser()


def config_dir() -> Path:
    """The user's petseg configuration directory (signing keys, serving tokens)."""
    return _directory("PETSEG_CONFIG_DIR", "XDG_CONFIG_HOME", "~/.config/petseg")


def state_dir() -> Path:
    """The user's petseg state directory (local deployments and what they serve)."""
    return _directory("PETSEG_STATE_DIR", "XDG_STATE_HOME", "~/.local/state/petseg")
