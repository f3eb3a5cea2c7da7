"""The paxfs command line and its configuration file: strict, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.cli import main
from wire.config import ConfigError, load_config

SUBCOMMANDS = ["metaserver", "dataserver", "mount", "cluster", "admin"]


def _paxfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize("subcommand", [None, *SUBCOMMANDS])
def test_help_works_for_every_subcommand(subcommand: str | None) -> None:
    result = _paxfs(*([subcommand] if subcommand else []), "--help")
    assert result.returncode == 0
    assert "usage: paxfs" in result.stdout


@pytest.mark.parametrize(
    "text,complaint",
    [
        ("[cluster]\nbogus = 1\n", "[cluster] bogus: unknown setting"),
        ("[nonsense]\n", "unknown table [nonsense]"),
        ('[metaserver]\nid = "one"\n', "[metaserver] id: expected int, got str"),
        ("[mount]\nallow_other = 1\n", "[mount] allow_other: expected bool"),
        ("[metaserver]\nelection_timeout_ms = -5\n", "must not be negative"),
        ('[cluster]\nmetaservers = { 1 = "127.0.0.1" }\n', "bad address"),
        ('[cluster]\nmetaservers = { 1 = "127.0.0.1:70000" }\n', "port must be 1..65535"),
        ('[cluster]\nmetaservers = { x = "127.0.0.1:7000" }\n', "must be a positive integer"),
        ('[cluster]\nkey = "zz"\n', "not hexadecimal"),
        ('[cluster]\nkey = "abcd"\n', "at least 16 bytes"),
        ("[cluster]\nchunk_size_bytes = 1000\n", "multiple of 65536"),
        ("this is = not toml [", "not valid TOML"),
    ],
)
def test_a_bad_config_is_one_clear_line_and_exit_status_2(
    tmp_path: Path, text: str, complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "paxfs.toml"
    path.write_text(text)
    assert main(["metaserver", "-c", str(path)]) == 2
    error = capsys.readouterr().err
    assert complaint in error
    assert error.count("\n") == 1 and str(path) in error


def test_an_unreadable_config_file_is_exit_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dataserver", "-c", "/nonexistent/paxfs.toml"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_config_comes_from_paxfs_config_when_no_flag_is_given(tmp_path: Path) -> None:
    path = tmp_path / "paxfs.toml"
    path.write_text("[cluster]\nbogus = 1\n")
    result = _paxfs("metaserver", env={"PAXFS_CONFIG": str(path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "bogus" in result.stderr


def test_flags_override_the_file_and_are_validated_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "paxfs.toml"
    path.write_text("[metaserver]\nelection_timeout_ms = 800\n")
    from tools.cli import apply_flags, build_parser, subcommands

    args = build_parser(subcommands()).parse_args(
        [
            "metaserver",
            "-c",
            str(path),
            "--election-timeout-ms",
            "1500",
            "--metaservers",
            "1=127.0.0.1:7001",
        ]
    )
    config = load_config(str(path))
    apply_flags(config, args)
    assert config.metaserver.election_timeout_ms == 1500
    assert config.metaserver_addresses()[1].port == 7001
    bad = build_parser(subcommands()).parse_args(["metaserver", "--election-timeout-ms", "soon"])
    with pytest.raises(ConfigError, match="--election-timeout-ms: bad value"):
        apply_flags(load_config(None), bad)


def test_defaults_serve_a_local_cluster() -> None:
    config = load_config(None)
    assert config.cluster.replication == 3
    assert config.cluster.chunk_size_bytes == 64 * 1024 * 1024
