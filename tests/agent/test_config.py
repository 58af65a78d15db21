"""Tests for agent/config.py: one typed place for every setting, read from flags, env and defaults."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from agent.config import AgentSettings, add_arguments, load_settings
from agent.errors import ConfigError


def test_size_settings_read_decimal_and_binary_units_alike() -> None:
    """Units mean the same as in the server (see common/units.py): ``G`` is 10**9, ``Gi`` is 2**30."""
    s = load_settings(env={"WEIGHTCACHE_MAX_BYTES": "500G", "WEIGHTCACHE_MIN_FREE_BYTES": "2Gi",
                           "WEIGHTCACHE_PART_SIZE": "8388608"})
    assert (s.max_bytes, s.min_free_bytes, s.min_part_size) == (500 * 1000**3, 2 * 1024**3, 8 * 1024**2)


@pytest.mark.parametrize("text", ["lots", "1XB", "-1GiB", "GiB"])
def test_an_unreadable_size_is_a_config_error_naming_its_variable(text: str) -> None:
    with pytest.raises(ConfigError, match=r"WEIGHTCACHE_MAX_BYTES=.*not a size"):
        load_settings(env={"WEIGHTCACHE_MAX_BYTES": text})


DOWNWARD_API = {"NODE_NAME", "POD_NAMESPACE", "POD_IP"}


def test_every_setting_has_a_default_an_env_name_and_help() -> None:
    for f in dataclasses.fields(AgentSettings):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
        # Downward-API values keep the names a pod spec gives them.
        assert f.metadata["env"].startswith("WEIGHTCACHE_") or f.metadata["env"] in DOWNWARD_API, f.name
        assert f.metadata["help"], f.name


def test_the_contract_names_map_to_their_settings() -> None:
    env = {f.name: f.metadata["env"] for f in dataclasses.fields(AgentSettings)}
    assert env["cache_dir"] == "WEIGHTCACHE_ROOT"
    assert env["node_name"] == "NODE_NAME"
    assert env["metrics_port"] == "WEIGHTCACHE_METRICS_PORT"
    assert env["policy_file"] == "WEIGHTCACHE_POLICY_FILE"
    assert env["max_bytes"] == "WEIGHTCACHE_MAX_BYTES"
    flags = {f.name: f.metadata.get("flag") for f in dataclasses.fields(AgentSettings)}
    assert flags["cache_dir"] == "--cache-dir"


def test_defaults_match_the_contract() -> None:
    s = load_settings(env={})
    assert s.cache_dir == Path("/var/lib/weightcache")
    assert s.metrics_port == 9400
    assert s.max_bytes == 0
    assert s.policy_file is None


def test_environment_variables_are_read_and_typed() -> None:
    s = load_settings(env={"WEIGHTCACHE_ROOT": "/x/cache", "WEIGHTCACHE_MAX_BYTES": "2GiB",
                           "WEIGHTCACHE_PART_SIZE": "1MiB", "WEIGHTCACHE_CONCURRENCY": "3",
                           "WEIGHTCACHE_RETRY_BASE_DELAY": "0.01", "NODE_NAME": "gpu-1"})
    assert s.cache_dir == Path("/x/cache")
    assert s.max_bytes == 2 * 1024**3
    assert s.min_part_size == 1024**2
    assert s.concurrency == 3
    assert s.retry_base_delay == 0.01
    assert s.node_name == "gpu-1"


def test_flags_win_over_the_environment() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--cache-dir", "/from/flag", "--max-bytes", "1GiB"])
    s = load_settings(args, env={"WEIGHTCACHE_ROOT": "/from/env", "WEIGHTCACHE_MAX_BYTES": "5GiB",
                                 "WEIGHTCACHE_CONCURRENCY": "4"})
    assert s.cache_dir == Path("/from/flag")
    assert s.max_bytes == 1024**3
    assert s.concurrency == 4  # no flag given: the environment still counts


def test_explicit_overrides_win_over_flags_and_environment() -> None:
    s = load_settings(env={"WEIGHTCACHE_CONCURRENCY": "4"}, concurrency=2)
    assert s.concurrency == 2


def test_an_empty_environment_variable_means_the_default() -> None:
    assert load_settings(env={"WEIGHTCACHE_CONCURRENCY": ""}).concurrency == 8


def test_a_part_size_below_one_mebibyte_is_refused() -> None:
    with pytest.raises(ConfigError, match="part size must be ≥ 1 MiB"):
        load_settings(env={"WEIGHTCACHE_PART_SIZE": "512KiB"})


def test_an_unreadable_number_names_its_environment_variable() -> None:
    with pytest.raises(ConfigError, match="WEIGHTCACHE_CONCURRENCY"):
        load_settings(env={"WEIGHTCACHE_CONCURRENCY": "many"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WEIGHTCACHE_CONCURRENCY": "0"}, "concurrency"),
        ({"WEIGHTCACHE_MAX_ATTEMPTS": "0"}, "max attempts"),
        ({"WEIGHTCACHE_S3_ADDRESSING_STYLE": "sideways"}, "addressing style"),
        ({"WEIGHTCACHE_LOG_FORMAT": "xml"}, "log format"),
    ],
)
def test_out_of_range_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


def test_settings_are_frozen() -> None:
    s = load_settings(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.concurrency = 99  # type: ignore[misc]


def test_help_shows_every_flag_with_its_env_name_and_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    for f in dataclasses.fields(AgentSettings):
        if "flag" in f.metadata:
            assert f.metadata["flag"] in text, f.name
            assert f.metadata["env"] in text, f.name
    assert "default: 9400" in text


def test_the_control_socket_lives_outside_the_cache_root() -> None:
    s = load_settings(env={"WEIGHTCACHE_ROOT": "/c"})
    assert s.control_socket == Path("/run/weightcache/agent.sock")
    assert load_settings(env={"WEIGHTCACHE_CONTROL_SOCKET": "/s/a.sock"}).control_socket == Path("/s/a.sock")
    with pytest.raises(ConfigError, match="outside the cache root"):
        load_settings(env={"WEIGHTCACHE_ROOT": "/c", "WEIGHTCACHE_CONTROL_SOCKET": "/c/.control/agent.sock"})
