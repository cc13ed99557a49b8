"""Helpers of the run commands that need no flow run."""

from petseg import runs


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
