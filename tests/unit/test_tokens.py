"""Bearer tokens: the file's checks, the local default, and who a header names."""

import json
import os
import stat
from pathlib import Path

import pytest

from petseg import tokens
from petseg.errors import ConfigError


def _write(path, entries, mode=0o600):
    path.write_text(json.dumps({"tokens": entries}))
    path.chmod(mode)
    return path


def test_local_default_is_made_once_readable_by_its_owner_only(tmp_path, monkeypatch):
    monkeypatch.setenv("PETSEG_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv(tokens.TOKENS_ENV, raising=False)
    path, made = tokens.ensure_local_tokens()
    assert made and path == tokens.tokens_path() and path.parent == tokens.config_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    table = tokens.load(path)
    (token,) = table.tokens
    assert token.identity == "local" and token.roles == {"predict", "feedback"}
    assert tokens.ensure_local_tokens() == (path, False)
    assert tokens.client_token() == token.secret


def test_tokens_file_setting_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(tokens.TOKENS_ENV, str(tmp_path / "secret" / "tokens.json"))
    assert tokens.tokens_path() == tmp_path / "secret" / "tokens.json"
    assert tokens.client_token() is None


def test_a_header_names_its_identity_and_roles(tmp_path):
    table = tokens.load(_write(tmp_path / "t.json", [
        {"identity": "ana", "token": "a" * 40, "roles": ["feedback"]},
        {"identity": "ops", "token": "o" * 40, "roles": ["predict", "operator"]}]))
    assert table.check("Bearer " + "a" * 40, "feedback").identity == "ana"
    assert table.check("bearer " + "o" * 40, "operator").identity == "ops"
    for header in (None, "", "Bearer", "Basic " + "a" * 40, "Bearer " + "a" * 39, "Bearer " + "b" * 40):
        with pytest.raises(tokens.AccessDenied) as denied:
            table.check(header, "feedback")
        assert denied.value.status == 401
    with pytest.raises(tokens.AccessDenied) as denied:
        table.check("Bearer " + "a" * 40, "predict")
    assert denied.value.status == 403 and "'ana' has no role 'predict'" in str(denied.value)


@pytest.mark.parametrize("entries, message", [
    ([], "expected"),
    ([{"identity": "a b", "token": "x" * 40, "roles": ["predict"]}], "identity 'a b' is invalid"),
    ([{"identity": "ana", "token": "short", "roles": ["predict"]}], "token of 'ana' is invalid"),
    ([{"identity": "ana", "token": "x" * 40, "roles": ["admin"]}], "roles"),
    ([{"identity": "ana", "token": "x" * 40, "roles": ["predict"]},
      {"identity": "ana", "token": "y" * 40, "roles": ["predict"]}], "appears twice"),
])
def test_a_malformed_file_is_a_config_error_naming_the_entry(tmp_path, entries, message):
    with pytest.raises(ConfigError, match=message):
        tokens.load(_write(tmp_path / "t.json", entries))


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        tokens.load(tmp_path / "none.json")


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o620, 0o666])
def test_a_file_group_or_others_can_open_is_refused_naming_its_mode_and_the_fix(tmp_path, mode):
    path = _write(tmp_path / "t.json", [{"identity": "ana", "token": "a" * 40, "roles": ["predict"]}], mode=mode)
    with pytest.raises(ConfigError) as refused:
        tokens.load(path)
    assert str(path) in str(refused.value) and f"mode {mode:04o}" in str(refused.value)
    assert f"chmod 600 {path}" in str(refused.value)
    with pytest.raises(ConfigError, match="chmod 600"):
        tokens.client_token(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_file_only_its_owner_can_read_is_accepted(tmp_path, mode):
    path = _write(tmp_path / "t.json", [{"identity": "ana", "token": "a" * 40, "roles": ["predict"]}], mode=mode)
    assert tokens.load(path).tokens[0].identity == "ana"


def _stat(mode: int, uid: int, gid: int) -> os.stat_result:
    return os.stat_result((0o100000 | mode, 1, 1, 1, uid, gid, 10, 0, 0, 0))


def test_a_kubernetes_secret_mounted_for_the_pods_group_is_accepted_and_nothing_wider(monkeypatch):
    """Root's file, mode 0440, group = the pod's fsGroup = the (non-root) server's group."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    tokens._check_private(Path("/var/run/secrets/petseg-tokens/tokens.json"), _stat(0o440, 0, 1000))
    for mode, uid, gid in [(0o440, 0, 2000), (0o444, 0, 1000), (0o460, 0, 1000), (0o640, 1001, 1000)]:
        with pytest.raises(ConfigError, match=f"mode {mode:04o}"):
            tokens._check_private(Path("t.json"), _stat(mode, uid, gid))
