"""Who may use which models, and what each node warms: the policy / warm-set file (a mounted ConfigMap).

Format (PRODUCT.md)::

    allow: [s3://shared-models/]            # URI prefixes every namespace may use
    namespaces: {team-a: [s3://team-a/]}    # extra prefixes per namespace
    warm:                                   # prefetched at start-up on nodes whose labels match
      - nodeSelector: {node.kubernetes.io/instance-type: p5.48xlarge}
        models: [s3://shared-models/llama-3-8b/]
    warmDeadlineSeconds: 900                # the startup taint goes after this even if warming is not done

No file means single-tenant mode: every namespace may use any URI the agent's credentials can read (the agent
warns at start-up). A prefix matches on whole path segments only: ``s3://team-a/`` allows ``s3://team-a/m/``
but never ``s3://team-a-evil/``. This module only parses and decides; it does no I/O besides reading the file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError, InvalidUriError
from agent.uris import ModelUri, parse_model_uri

log = logging.getLogger(__name__)

DEFAULT_WARM_DEADLINE_SECONDS = 900.0


@dataclass(frozen=True, slots=True)
class WarmEntry:
    node_selector: Mapping[str, str]
    models: tuple[ModelUri, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.node_selector.items())


@dataclass(frozen=True, slots=True)
class Policy:
    """The parsed policy. ``open`` = no policy file: everything allowed (single-tenant default)."""

    allow: tuple[str, ...] = ()
    namespaces: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    warm: tuple[WarmEntry, ...] = ()
    warm_deadline_seconds: float = DEFAULT_WARM_DEADLINE_SECONDS
    open: bool = True

    def allows(self, namespace: str, uri: ModelUri) -> bool:
        """True if a pod in ``namespace`` may use ``uri``."""
        if self.open:
            return True
        text = uri.uri
        for prefix in (*self.allow, *self.namespaces.get(namespace, ())):
            if _within(text, prefix):
                return True
        return False

    def warm_models(self, node_labels: Mapping[str, str]) -> list[ModelUri]:
        out: dict[str, ModelUri] = {}
        for entry in self.warm:
            if entry.matches(node_labels):
                for m in entry.models:
                    out.setdefault(m.uri, m)
        return list(out.values())


def _within(uri: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return uri.startswith(prefix)
    return uri == prefix or uri.startswith(prefix + "/")


def _prefix_list(value: Any, where: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: {where} must be a list of s3:// URI prefixes")
    for v in value:
        if not v.startswith("s3://") or len(v) <= len("s3://"):
            raise ConfigError(f"{source}: {where}: {v!r} is not an s3:// URI prefix")
    return tuple(value)


def parse_policy(text: str, *, source: str = "policy") -> Policy:
    """Parse and validate policy YAML; raise :class:`ConfigError` saying exactly what is wrong."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping with allow/namespaces/warm keys")
    unknown = set(data) - {"allow", "namespaces", "warm", "warmDeadlineSeconds"}
    if unknown:
        raise ConfigError(f"{source}: unknown keys {sorted(unknown)}")
    allow = _prefix_list(data.get("allow"), "allow", source)
    namespaces_raw = data.get("namespaces") or {}
    if not isinstance(namespaces_raw, dict):
        raise ConfigError(f"{source}: namespaces must map a namespace to a list of prefixes")
    namespaces = {str(ns): _prefix_list(v, f"namespaces.{ns}", source) for ns, v in namespaces_raw.items()}
    warm: list[WarmEntry] = []
    for i, entry in enumerate(data.get("warm") or []):
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: warm[{i}] must be a mapping with nodeSelector and models")
        selector = entry.get("nodeSelector") or {}
        if not isinstance(selector, dict):
            raise ConfigError(f"{source}: warm[{i}].nodeSelector must be a mapping of labels")
        models = entry.get("models") or []
        if not isinstance(models, list):
            raise ConfigError(f"{source}: warm[{i}].models must be a list of URIs")
        try:
            parsed = tuple(parse_model_uri(str(m)) for m in models)
        except InvalidUriError as e:
            raise ConfigError(f"{source}: warm[{i}]: {e}") from e
        warm.append(WarmEntry({str(k): str(v) for k, v in selector.items()}, parsed))
    deadline = data.get("warmDeadlineSeconds", DEFAULT_WARM_DEADLINE_SECONDS)
    try:
        deadline = float(deadline)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: warmDeadlineSeconds must be a number") from e
    return Policy(allow=allow, namespaces=namespaces, warm=tuple(warm), warm_deadline_seconds=deadline,
                  open=False)


def load_policy(path: Path | None) -> Policy:
    """Read the policy file; None → the open single-tenant policy."""
    if path is None:
        return Policy()
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read policy file {path}: {e}") from e
    return parse_policy(text, source=str(path))
