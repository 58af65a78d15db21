"""common/settings.py: the one loader behind the agent's and the server's settings."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.settings import SettingError, add_arguments, read_values, setting
from common.units import parse_size


@dataclass(frozen=True, kw_only=True)
class Example:
    port: int = setting(8000, "EX_PORT", "a port", "--port")
    ratio: float = setting(0.5, "EX_RATIO", "a ratio", "--ratio")
    on: bool = setting(True, "EX_ON", "a switch", "--on")
    where: Path | None = setting(None, "EX_WHERE", "a path", "--where")  # noqa: RUF009
    size: int = setting(0, "EX_SIZE", "a size", "--size", parse=parse_size)
    mode: str = setting("a", "EX_MODE", "a choice", "--mode", choices=("a", "b"))
    tags: list[str] = setting(["x"], "EX_TAGS", "no flag: environment only")  # noqa: RUF009


def _read(argv: list[str] | None = None, env: dict[str, str] | None = None, **overrides: object) -> Example:
    args = None
    if argv is not None:
        parser = argparse.ArgumentParser()
        add_arguments(parser, Example)
        args = parser.parse_args(argv)
    return Example(**read_values(Example, args=args, env=env or {}, overrides=overrides))


def test_overrides_win_then_flags_then_the_environment_then_defaults() -> None:
    env = {"EX_PORT": "9000", "EX_RATIO": "0.25", "EX_MODE": "b"}
    got = _read(["--port", "7000", "--ratio", "0.75"], env, ratio=1.0)
    assert (got.port, got.ratio, got.mode, got.on) == (7000, 1.0, "b", True)


def test_an_empty_flag_or_variable_counts_as_not_set() -> None:
    assert _read(["--port", ""], {"EX_PORT": "9000"}).port == 9000
    assert _read(env={"EX_PORT": ""}).port == 8000


def test_text_is_typed_by_the_annotation_or_the_fields_parser() -> None:
    got = _read(env={"EX_ON": "off", "EX_WHERE": "/w", "EX_SIZE": "2GiB"})
    assert (got.on, got.where, got.size) == (False, Path("/w"), 2 * 1024**3)


def test_an_unreadable_value_names_its_variable() -> None:
    with pytest.raises(SettingError, match="EX_PORT='many': not a valid int"):
        _read(env={"EX_PORT": "many"})
    with pytest.raises(SettingError, match="EX_ON='maybe': expected true or false"):
        _read(env={"EX_ON": "maybe"})
    with pytest.raises(SettingError, match="EX_SIZE='lots': not a size"):
        _read(env={"EX_SIZE": "lots"})


def test_an_unknown_override_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="no settings"):
        _read(colour="red")


def test_mutable_defaults_are_never_shared() -> None:
    a, b = _read(), _read()
    assert a.tags == ["x"] and a.tags is not b.tags


def test_help_names_the_variable_and_default_and_flags_check_their_choices() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example, help_suffix="(env {env}, default {default})")
    text = parser.format_help()
    assert "a port (env EX_PORT, default 8000)" in text and "--tags" not in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
