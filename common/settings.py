"""Settings read from flags, the environment and defaults: the one loader behind the agent's and the server's.

Each side declares a frozen dataclass whose fields are made with :func:`setting`: a default, the environment
variable, a one-line help, the CLI flag, and optionally the allowed values or a parser (sizes). From those fields
alone come the CLI flags (:func:`add_arguments`) and the values (:func:`read_values`), so ``--help``, the README's
settings tables and the manifests' tests all name the same things. Each side keeps its own dataclass, validation
(``__post_init__``) and error type: the errors raised here are :class:`SettingError` (a ``ValueError``), which it
turns into its ``ConfigError``.

Precedence, first wins: explicit overrides (from code, already typed), then a flag, then the environment, then the
default. An empty flag or variable counts as not set. Text is converted by the field's annotation (``int``,
``float``, ``bool``, ``Path``, ``str``; ``X | None`` as ``X``) unless the field names its own parser.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

#: ``--help`` suffix of each flag (the agent's wording; the server passes its own).
HELP_SUFFIX = "[env {env}; default: {default}]"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class SettingError(ValueError):
    """A value from a flag or the environment that cannot be read as its setting's type."""


def setting(default: Any, env: str, help: str, flag: str | None = None, *,
            choices: Iterable[str] = (), parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field for one setting (a mutable default gets a ``default_factory`` copy).

    ``choices`` are the allowed values (shown in ``--help``, checked by argparse for flags; the dataclass checks
    the environment's); ``parse`` turns the text into the value (e.g. :func:`common.units.parse_size`).
    """
    meta: dict[str, Any] = {"env": env, "help": help}
    if flag:
        meta["flag"] = flag
    if choices:
        meta["choices"] = tuple(choices)
    if parse is not None:
        meta["parse"] = parse
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def add_arguments(parser: argparse.ArgumentParser, settings_class: type[Any], *, only: set[str] | None = None,
                  help_suffix: str = HELP_SUFFIX) -> None:
    """Add a flag for each setting that has one (or those named in ``only``).

    Flag defaults stay None, so a flag not given lets the environment (then the default) decide.
    """
    for f in dataclasses.fields(settings_class):
        meta = f.metadata
        flag = meta.get("flag")
        if not flag or (only is not None and f.name not in only):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        suffix = help_suffix.format(env=meta["env"], default=default)
        parser.add_argument(flag, dest=f.name, default=None, choices=meta.get("choices"),
                            metavar=None if meta.get("choices") else f.name.upper(),
                            help=f"{meta['help']} {suffix}".replace("%", "%%"))


def read_values(settings_class: type[Any], *, args: argparse.Namespace | None, env: Mapping[str, str],
                overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The typed values to build ``settings_class`` from: overrides, then flags, then ``env`` (see above)."""
    fields = dataclasses.fields(settings_class)
    unknown = set(overrides) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"{settings_class.__name__} has no settings {sorted(unknown)}")
    values: dict[str, Any] = {}
    for f in fields:
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None or raw == "":
            raw = env.get(f.metadata["env"]) or None
        if raw is not None:
            values[f.name] = convert(f, raw)
    return values


def convert(f: dataclasses.Field[Any], raw: Any) -> Any:
    """One setting's text as its value; :class:`SettingError` names the variable and says what was expected."""
    parse = f.metadata.get("parse")
    kind = _kind(f)
    text = str(raw)
    try:
        if parse is not None:
            return parse(text)
        if kind == "bool":
            word = text.strip().lower()
            if word not in _TRUE | _FALSE:
                raise ValueError("expected true or false (also 1/0, yes/no, on/off)")
            return word in _TRUE
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "Path":
            return Path(text)
        return text
    except ValueError as e:
        why = str(e) if parse is not None or kind == "bool" else f"not a valid {kind}"
        raise SettingError(f"{f.metadata['env']}={text!r}: {why}") from e


def _kind(f: dataclasses.Field[Any]) -> str:
    """The field's type name, ``X | None`` read as ``X`` (annotations are strings under PEP 563)."""
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    names = [n.strip() for n in annotation.split("|") if n.strip() != "None"]
    return names[0] if len(names) == 1 else annotation


__all__ = ["HELP_SUFFIX", "SettingError", "add_arguments", "convert", "read_values", "setting"]
