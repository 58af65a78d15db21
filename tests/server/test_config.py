"""server/config.py: one typed place for settings, read from env and flags, contradictions refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from server.config import ServerSettings
from server.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GiB", 2 * 2**30), ("8M", 8 * 10**6), ("1.5GB", 1_500_000_000), ("1048576", 2**20), ("64kib", 64 * 1024)],
)
def test_size_settings_read_decimal_and_binary_units_like_the_agent(text: str, expected: int) -> None:
    settings = ServerSettings.from_env({"WEIGHTCACHE_MODEL_PATH": "/m", "WEIGHTCACHE_MAX_BODY_BYTES": text})
    assert settings.max_body_bytes == expected


def test_nonsense_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="WEIGHTCACHE_MAX_BODY_BYTES='two gigs': not a size"):
        ServerSettings.from_env({"WEIGHTCACHE_MODEL_PATH": "/m", "WEIGHTCACHE_MAX_BODY_BYTES": "two gigs"})


def test_every_setting_has_a_default_an_env_name_a_flag_and_a_reason() -> None:
    for f in dataclasses.fields(ServerSettings):
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata["env"].startswith("WEIGHTCACHE_") and f.metadata["flag"].startswith("--")
        assert f.metadata["help"]


def test_environment_is_read_and_typed() -> None:
    settings = ServerSettings.from_env({
        "WEIGHTCACHE_MODEL": "s3://b/m/", "WEIGHTCACHE_PORT": "9000", "WEIGHTCACHE_ROOT": "/cache",
        "WEIGHTCACHE_WAIT_TIMEOUT_SECONDS": "12.5", "WEIGHTCACHE_MAX_BODY_BYTES": "1MiB",
    })
    assert (settings.port, settings.root, settings.wait_timeout_seconds) == (9000, Path("/cache"), 12.5)
    assert settings.max_body_bytes == 2**20


def test_flags_win_over_the_environment() -> None:
    settings = ServerSettings.parse(["--port", "7000"], {"WEIGHTCACHE_MODEL_PATH": "/m", "WEIGHTCACHE_PORT": "9000"})
    assert settings.port == 7000


def test_a_model_is_required() -> None:
    with pytest.raises(ConfigError, match="WEIGHTCACHE_MODEL"):
        ServerSettings.from_env({})


def test_uri_and_path_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="only one"):
        ServerSettings.from_env({"WEIGHTCACHE_MODEL": "s3://b/m/", "WEIGHTCACHE_MODEL_PATH": "/m"})


def test_unknown_choice_names_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match="size, digest, none"):
        ServerSettings.from_env({"WEIGHTCACHE_MODEL_PATH": "/m", "WEIGHTCACHE_VERIFY": "paranoid"})


def test_fallback_fetch_needs_a_uri() -> None:
    with pytest.raises(ConfigError, match="needs WEIGHTCACHE_MODEL"):
        ServerSettings.from_env({"WEIGHTCACHE_MODEL_PATH": "/m", "WEIGHTCACHE_FALLBACK": "fetch"})


def test_busy_polling_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 0.1"):
        ServerSettings.from_env({"WEIGHTCACHE_MODEL_PATH": "/m", "WEIGHTCACHE_POLL_INTERVAL_SECONDS": "0.01"})
