"""Helpers of the run commands that need no flow run, and the layout of the command line."""

import argparse
import ast
import os
from pathlib import Path

from petseg import cli
from petseg.lineage import runs


def test_cpu_flag_changes_name_what_each_machine_lacks():
    old = {"cpu": {"flags": ["avx", "avx2", "avx512f", "sse4_2"]}}
    new = {"cpu": {"flags": ["avx", "avx2", "sse4_2", "amx_tile"]}}
    message = runs.cpu_flag_changes(old, new)
    assert "only in the original: avx512f" in message and "only here: amx_tile" in message
    assert "same CPU instruction set" in message
    assert runs.cpu_flag_changes(old, old) is None


def test_flow_environment_gives_root_a_user_name(monkeypatch):
    for name in ("METAFLOW_USER", "SUDO_USER", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("USER", "root")
    assert runs.flow_environment()["USERNAME"] == "petseg"
    monkeypatch.setenv("USERNAME", "alice")
    assert runs.flow_environment()["USERNAME"] == "alice"


def test_default_user_names_a_root_shell_and_keeps_a_set_name(monkeypatch):
    """Metaflow refuses root with no user name; the fallback is one its get_username accepts."""
    from metaflow import metaflow_config
    from metaflow.util import get_username

    monkeypatch.setattr(metaflow_config, "USER", None)  # METAFLOW_USER, read when Metaflow loaded
    for name in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "LOGNAME", "LNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("USER", "root")
    monkeypatch.setattr(runs.getpass, "getuser", lambda: "root")
    env = {"USER": "root"}
    runs.default_user(env)
    assert env == {"USER": "root", "USERNAME": "petseg"}
    monkeypatch.setattr(runs.getpass, "getuser", lambda: "bob")
    runs.default_user(env := {"USER": "root"})
    assert env["USERNAME"] == "bob"
    runs.default_user(env := {"SUDO_USER": "carol"})
    assert "USERNAME" not in env
    runs.default_user(os.environ)
    assert get_username() == "bob"


# -- the command line ------------------------------------------------------------------------------

COMMANDS = ["synth", "runs", "show", "diff", "reproduce", "tensorboard", "predict", "feedback", "serve", "stop",
            "status", "rollback", "promote", "lineage", "verify", "keys", "configure"]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_is_registered_once_with_a_handler_named_after_it():
    commands = _subcommands(cli.build_parser())
    assert list(commands) == COMMANDS
    handlers = {name: parser.get_default("handler") for name, parser in commands.items()}
    handlers["configure kubernetes"] = _subcommands(commands.pop("configure"))["kubernetes"].get_default("handler")
    del handlers["configure"]
    for action, parser in _subcommands(commands.pop("feedback")).items():
        handlers[f"feedback {action}"] = parser.get_default("handler")
    del handlers["feedback"]
    for name, handler in handlers.items():
        assert handler.__name__ == name.replace(" ", "_") + "_command", name
        assert handler.__module__.startswith("petseg.cli."), name


def test_library_modules_know_nothing_of_the_command_line():
    import petseg

    package = Path(petseg.__file__).parent
    for path in sorted(package.rglob("*.py")):
        if path.parent.name == "cli" or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not [n for n in names if n == "argparse" or n.startswith("petseg.cli")], path
