"""Bearer tokens: the file's checks, the local default, and who a header names."""

import json
import stat

import pytest

from petseg import tokens
from petseg.errors import ConfigError


def _write(path, entries):
    path.write_text(json.dumps({"tokens": entries}))
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
