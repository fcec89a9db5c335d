"""Config: defaults, environment overrides, and errors that name the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from batchd import config, jobmeta
from batchd.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_example_config_loads_and_documents_every_key(tmp_path: Path) -> None:
    cfg = config.load(ROOT / "config.example.toml", env={})
    assert cfg.api.base_url == config.DEFAULT_BASE_URL
    assert cfg.batch.completion_window == "24h"
    text = (ROOT / "config.example.toml").read_text()
    for section, keys in config._SECTIONS.items():
        assert f"[{section}]" in text
        for key in keys:
            assert re.search(rf"^#? ?{key} =|^\[{section}\.{key}\]", text, re.M), key


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, ""), env={})
    assert cfg.spool.dir == tmp_path / "spool"
    assert cfg.state.database == tmp_path / "batchd.db"
    assert cfg.http.listen == "127.0.0.1:9464"
    assert cfg.api.api_key_env == "OPENAI_API_KEY"


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        "OPENAI_BASE_URL": "http://127.0.0.1:1/v1/",
        "OPENAI_ORG_ID": "org-x",
        "OPENAI_PROJECT_ID": "proj-y",
    }
    cfg = config.load(write(tmp_path, '[api]\nbase_url = "https://x/v1"\n'), env=env)
    assert cfg.api.base_url == "http://127.0.0.1:1/v1"
    assert (cfg.api.organization, cfg.api.project) == ("org-x", "proj-y")


def test_batchd_config_env_names_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[log]\nlevel = 'debug'\n")
    assert config.load(None, env={"BATCHD_CONFIG": str(p)}).log.level == "debug"
    with pytest.raises(ConfigError, match="--config"):
        config.load(None, env={})


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[batch]\npoll_interval_seconds = 'fast'\n", r"\[batch\] poll_interval_seconds"),
        ("[batch]\npoll_interval_seconds = -1\n", r"\[batch\] poll_interval_seconds"),
        ("[batch]\ncompletion_window = '1h'\n", r"\[batch\] completion_window"),
        ("[batch]\noutput_expires_after_seconds = 5\n", r"output_expires_after_seconds"),
        ("[batch.metadata]\nteam = 3\n", r"\[batch\] metadata.team"),
        ("[http]\nlisten = 'nope'\n", r"\[http\] listen"),
        ("[log]\nlevel = 'loud'\n", r"\[log\] level"),
        ("[log]\nformat = 'xml'\n", r"\[log\] format"),
        ("[api]\nbase_url = 'ftp://x'\n", r"\[api\] base_url"),
        ("[api]\ntimeout = 3\n", r"\[api\] timeout: unknown key"),
        ("[nope]\n", r"\[nope\]: unknown section"),
        ("[api\n", r"invalid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        config.load(write(tmp_path, text), env={})


def test_run_with_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    p = write(tmp_path, "[batch]\npoll_interval_seconds = 'fast'\n")
    r = subprocess.run(
        [sys.executable, "-m", "batchd", "run", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "[batch] poll_interval_seconds" in r.stderr


def _metadata(n: int) -> str:
    return "[batch.metadata]\n" + "".join(f'k{i} = "v"\n' for i in range(n))


def test_batch_metadata_leaves_room_for_batchds_own_pairs(tmp_path: Path) -> None:
    # The API takes 16 pairs and batchd adds 2 (batchd_job, batchd_attempt): a 15th
    # configured pair used to pass here and then make every batch create a 400.
    room = jobmeta.API_MAX_PAIRS - jobmeta.BATCHD_PAIRS
    assert room == 14
    cfg = config.load(write(tmp_path, _metadata(room)), env={})
    assert len(cfg.batch.metadata) == room
    assert jobmeta.check({}, cfg.batch.metadata) == {}  # and the batch still fits
    with pytest.raises(ConfigError, match=r"\[batch\] metadata: at most 14 pairs"):
        config.load(write(tmp_path, _metadata(room + 1)), env={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", 1_000_000 - 90),
        ("30m", 1_000_000 - 1800),
        ("2h", 1_000_000 - 7200),
        ("7d", 1_000_000 - 7 * 86400),
        ("1700000000", 1_700_000_000),
        ("1700000000.5", 1_700_000_000.5),
        ("2023-11-14T22:13:20", 1_700_000_000),  # no zone: UTC
        ("2023-11-14T22:13:20Z", 1_700_000_000),
        ("2023-11-15T00:13:20+02:00", 1_700_000_000),
    ],
)
def test_parse_since(text: str, expected: float) -> None:
    assert config.parse_since(text, now=1_000_000) == expected


@pytest.mark.parametrize("text", ["yesterday", "", "2x", "h", "nan", "inf", "2023-13-01"])
def test_parse_since_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="got"):
        config.parse_since(text, now=1_000_000)
