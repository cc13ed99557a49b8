"""The user's configuration and state directories: petseg's own variable, then XDG's, then the home."""

from pathlib import Path

from petseg import userdirs


def test_own_variable_then_xdg_then_home(monkeypatch, tmp_path):
    for name in ("PETSEG_CONFIG_DIR", "PETSEG_STATE_DIR", "XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert userdirs.config_dir() == tmp_path / ".config" / "petseg"
    assert userdirs.state_dir() == tmp_path / ".local" / "state" / "petseg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdgstate"))
    assert userdirs.config_dir() == tmp_path / "xdg" / "petseg"
    assert userdirs.state_dir() == tmp_path / "xdgstate" / "petseg"
    monkeypatch.setenv("PETSEG_CONFIG_DIR", "~/mine")
    monkeypatch.setenv("PETSEG_STATE_DIR", str(tmp_path / "state"))
    assert userdirs.config_dir() == Path(tmp_path / "mine")
    assert userdirs.state_dir() == tmp_path / "state"
