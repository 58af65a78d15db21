"""Render the kustomizations and walk the objects they produce: the inputs of every deploy test.

Everything here reads files and runs `kubectl kustomize`; it must never contact a cluster or change a manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .tools import MANIFESTS, kustomize

# Every entry point a user can `kubectl apply -k`: the top level (the base) and each overlay.
ENTRY_POINTS: tuple[Path, ...] = (MANIFESTS, *sorted(p for p in (MANIFESTS / "overlays").iterdir() if p.is_dir()))

DASHBOARD_FILE = MANIFESTS / "base" / "dashboards" / "weightcache.json"

# Kinds that come from CRDs (prometheus-operator), which kubernetes-validate has no schema for.
CRD_KINDS = {"PodMonitor", "PrometheusRule"}

WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job", "ReplicaSet"}

Obj = dict[str, Any]


def entry_id(path: Path) -> str:
    """A readable pytest id: `manifests`, `overlays/eks`, ..."""
    return str(path.relative_to(MANIFESTS.parent)) if path == MANIFESTS else str(path.relative_to(MANIFESTS))


def render(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(kustomize(path)) if doc]


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind}/{name}, found {len(matches)}"
    return matches[0]


@dataclass(frozen=True)
class PodTemplate:
    owner: str
    namespace: str
    metadata: Obj
    spec: Obj


def pod_templates(objects: list[Obj]) -> Iterator[PodTemplate]:
    for o in objects:
        if o["kind"] in WORKLOAD_KINDS:
            template = o["spec"]["template"]
            yield PodTemplate(
                owner=f"{o['kind']}/{o['metadata']['name']}",
                namespace=o["metadata"].get("namespace", ""),
                metadata=template.get("metadata", {}),
                spec=template["spec"],
            )


def containers(template: PodTemplate) -> Iterator[Obj]:
    yield from template.spec.get("initContainers", [])
    yield from template.spec["containers"]


def env_map(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector's meaning (matchLabels and matchExpressions), as the API server applies it; {} selects all."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for req in selector.get("matchExpressions") or []:
        key, op, values = req["key"], req["operator"], req.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def dashboard() -> Obj:
    loaded: Obj = json.loads(DASHBOARD_FILE.read_text())
    return loaded
