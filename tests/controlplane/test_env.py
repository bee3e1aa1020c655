from __future__ import annotations

import stat

import pytest
from django.core.exceptions import ImproperlyConfigured

from controlplane.env import env_bool, env_int, env_list, env_secret, env_str, local_secret
from controlplane.envspec import VARS, Var


@pytest.fixture(autouse=True)
def declared(monkeypatch):
    """Test variables, declared as the product's are in controlplane.envspec."""
    for var in (
        Var("X_STR"), Var("X_UNSET", "fallback"), Var("X_BOOL", False),
        Var("X_INT", 7, minimum=1), Var("X_LIST", ("a",)), Var("X_SECRET", secret=True),
    ):  # fmt: skip
        monkeypatch.setitem(VARS, var.name, var)


def test_str_strips_and_defaults(monkeypatch):
    monkeypatch.setenv("X_STR", "  value ")
    assert env_str("X_STR") == "value"
    assert env_str("X_UNSET") == "fallback"


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", True), ("Yes", True), ("off", False), ("", False)]
)
def test_bool(monkeypatch, raw, expected):
    monkeypatch.setenv("X_BOOL", raw)
    assert env_bool("X_BOOL") is expected


def test_bad_bool_names_the_variable(monkeypatch):
    monkeypatch.setenv("X_BOOL", "maybe")
    with pytest.raises(ImproperlyConfigured, match="X_BOOL"):
        env_bool("X_BOOL")


def test_int(monkeypatch):
    assert env_int("X_INT") == 7
    monkeypatch.setenv("X_INT", "12")
    assert env_int("X_INT") == 12
    monkeypatch.setenv("X_INT", "twelve")
    with pytest.raises(ImproperlyConfigured, match="X_INT='twelve' is not an integer"):
        env_int("X_INT")
    monkeypatch.setenv("X_INT", "0")
    with pytest.raises(ImproperlyConfigured, match="X_INT=0 is below its minimum of 1"):
        env_int("X_INT")


def test_list(monkeypatch):
    assert env_list("X_LIST") == ["a"]
    monkeypatch.setenv("X_LIST", " a.example, ,b.example ")
    assert env_list("X_LIST") == ["a.example", "b.example"]


def test_a_variable_read_without_its_declaration_is_refused(monkeypatch):
    # Its default and bounds would then live at the read: the docs could not show them.
    monkeypatch.setenv("X_UNDECLARED", "1")
    with pytest.raises(ImproperlyConfigured, match="X_UNDECLARED is read but not declared"):
        env_int("X_UNDECLARED")
    with pytest.raises(ImproperlyConfigured, match="X_STR is read as a secret"):
        env_secret("X_STR")
    with pytest.raises(ImproperlyConfigured, match="X_STR is declared as str, read as int"):
        env_int("X_STR")


def test_secret_from_variable_or_file(monkeypatch, tmp_path):
    assert env_secret("X_SECRET") == ""
    monkeypatch.setenv("X_SECRET", "direct")
    assert env_secret("X_SECRET") == "direct"
    monkeypatch.delenv("X_SECRET")
    (tmp_path / "secret").write_text("from-file\n")
    monkeypatch.setenv("X_SECRET_FILE", str(tmp_path / "secret"))
    assert env_secret("X_SECRET") == "from-file"


def test_secret_set_twice_or_unreadable_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("X_SECRET", "direct")
    monkeypatch.setenv("X_SECRET_FILE", str(tmp_path / "secret"))
    with pytest.raises(ImproperlyConfigured, match="set X_SECRET or X_SECRET_FILE, not both"):
        env_secret("X_SECRET")
    monkeypatch.delenv("X_SECRET")
    with pytest.raises(ImproperlyConfigured, match=r"X_SECRET_FILE=.* cannot be read"):
        env_secret("X_SECRET")


def test_local_secret_is_created_private_and_then_reused(tmp_path):
    path = tmp_path / "var" / "agent-token"
    first = local_secret(path)
    assert len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert local_secret(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["agent-token"]
