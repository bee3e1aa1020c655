from __future__ import annotations

import re
from pathlib import Path

import pytest

from nodeagent.config import build_parser, parse_config


def test_flags_win_over_the_environment(tmp_path):
    environ = {
        "AGENT_TOKEN": "t",
        "AGENT_PORT": "9000",
        "AGENT_ID": "from-env",
        "AGENT_ENGINE": "sim",
    }
    config = parse_config(["--port", "9100", "--cache-dir", str(tmp_path)], environ)
    assert (config.port, config.agent_id, config.engine, config.token) == (
        9100,
        "from-env",
        "sim",
        "t",
    )
    assert config.advertise_url == "http://127.0.0.1:9100"
    assert config.models_dir == tmp_path / "models"


def test_token_from_a_file_and_labels(tmp_path):
    (tmp_path / "token").write_text("from-file\n")
    config = parse_config(
        ["--token-file", str(tmp_path / "token"), "--labels", "zone=eu-1a, tier=gold"], {}
    )
    assert config.token == "from-file"
    assert config.labels == {"zone": "eu-1a", "tier": "gold"}


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {}, "the agent token is required"),
        (["--token", "a", "--token-file", "/x"], {}, "not both"),
        (["--token-file", "/nonexistent"], {}, "cannot read the agent token"),
        (["--token", "t"], {"AGENT_ENGINE": "tgi"}, "AGENT_ENGINE must be one of vllm, sim"),
        (["--token", "t", "--gpu-memory-share", "1.5"], {}, "not between"),
        (["--token", "t"], {"AGENT_PORT": "eighty"}, "invalid int value"),
        (["--token", "t", "--labels", "zone"], {}, "key=value"),
    ],
)
def test_bad_settings_stop_the_agent_with_a_reason(argv, environ, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_config(argv, environ)
    assert message in str(stopped.value.code) + capsys.readouterr().err


def test_help_names_the_environment_variable_of_every_flag():
    parser = build_parser({})
    flags = [a for a in parser._actions if a.option_strings and a.dest not in {"help", "version"}]
    assert len(flags) >= 15
    # Help wraps lines, so "(env" and the name may be split by a newline.
    assert len(re.findall(r"\(env\s+[A-Z_]+", parser.format_help())) == len(flags)


def test_the_docs_and_env_example_document_every_agent_setting():
    """docs/configuration.md's agent table is generated from this parser at build time."""
    configuration = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert "<!-- settings: agent -->" in configuration.splitlines()
    variables = set(re.findall(r"\(env\s+([A-Z_]+)", build_parser({}).format_help()))
    assert len(variables) >= 15
    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    # (A variable whose empty value would mean something is there commented out.)
    documented = set(re.findall(r"^(?:# )?([A-Z][A-Z0-9_]+)=", example, re.MULTILINE))
    assert variables - documented == set()
