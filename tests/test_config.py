"""The TOML config: defaults, overrides, and one-line errors that name the key."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from xenblk import config
from xenblk.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "xenblk.toml"
    p.write_text(text)
    return p


def test_missing_default_file_means_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    cfg = config.load()
    assert cfg.daemon.backend_types == ["vbd3"]
    assert cfg.metrics.listen == "127.0.0.1:9469"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_values_override_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, '[dataplane]\nmax_queues = 2\n[storage]\nallowed_dirs = ["/srv"]\n'))
    assert cfg.dataplane.max_queues == 2
    assert cfg.storage.allowed_dirs == ["/srv"]
    assert cfg.dataplane.max_ring_page_order == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[dataplane]\nmax_queus = 3\n", "unknown config key 'dataplane.max_queus'"),
        ("[nosuch]\nx = 1\n", "unknown config section [nosuch]"),
        ("[dataplane]\nmax_queues = 99\n", "'dataplane.max_queues': 99 is out of range"),
        ("[dataplane]\nmax_queues = true\n", "'dataplane.max_queues': expected int"),
        ("[dataplane]\nmax_indirect_segments = 5\n", "must be 0 (off) or 12..256"),
        ('[log]\nformat = "xml"\n', "'log.format': 'xml' is not one of"),
        ('[metrics]\nlisten = "localhost"\n', "'metrics.listen': 'localhost' is not HOST:PORT"),
        ('[storage]\nallowed_dirs = "/srv"\n', "'storage.allowed_dirs': expected a list of strings"),
        ("[daemon\n", "xenblk.toml"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.load(write(tmp_path, text))
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_defaults_toml_round_trips() -> None:
    text = config.defaults_toml()
    assert config.from_dict(tomllib.loads(text)) == config.Config()
    assert "# Advertised max-ring-page-order" in text


def test_cli_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    p = write(tmp_path, "[dataplane]\nmax_queus = 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "xenblk", "--config", str(p), "config", "--check"], capture_output=True, text=True
    )
    assert r.returncode == 1
    assert r.stderr.strip().startswith("xenblk: unknown config key 'dataplane.max_queus'")
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_version_and_help() -> None:
    r = subprocess.run([sys.executable, "-m", "xenblk", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("xenblk ")
    r = subprocess.run([sys.executable, "-m", "xenblk", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "config" in r.stdout


def test_docs_config_md_matches_the_defaults() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    assert config.defaults_toml() in doc, "docs/config.md is stale: regenerate it from `xenblk config --defaults`"
