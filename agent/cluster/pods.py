"""What the agent needs to know about a pod, read from a Pod object as the API (or a manifest file) gives it.

Pure: no I/O. Both pod sources (the Kubernetes watch and ``--pods-file``) turn raw objects into :class:`PodInfo`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

ANNOTATION = "weightcache.io/models"
READINESS_GATE = "weightcache.io/weights-ready"
_TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    node_name: str
    phase: str
    annotation: str | None
    has_gate: bool
    deleting: bool
    #: The readiness-gate condition's status as last seen on the pod ("True"/"False"), None if it has none:
    #: lastTransitionTime moves only when the status really changes, also across agent restarts.
    gate_status: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def active(self) -> bool:
        """A pod that may still start or run: its models matter (pinned, fetched)."""
        return not self.deleting and self.phase not in _TERMINAL_PHASES


class PodFormatError(ValueError):
    """The object is not a Pod we can read."""


def pod_from_dict(obj: Any) -> PodInfo:
    """Read a Pod object (dict as in the API's JSON). Missing uid (manifest files) → a stable synthetic one."""
    if not isinstance(obj, dict):
        raise PodFormatError(f"expected a Pod mapping, got {type(obj).__name__}")
    kind = obj.get("kind", "Pod")
    if kind != "Pod":
        raise PodFormatError(f"expected kind Pod, got {kind!r}")
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if not isinstance(meta, dict) or not isinstance(spec, dict) or not isinstance(status, dict):
        raise PodFormatError("metadata, spec and status must be mappings")
    name = str(meta.get("name") or "")
    if not name:
        raise PodFormatError("pod has no metadata.name")
    namespace = str(meta.get("namespace") or "default")
    uid = str(meta.get("uid") or uuid.uuid5(uuid.NAMESPACE_URL, f"weightcache-pod:{namespace}/{name}"))
    annotations = meta.get("annotations") or {}
    annotation = annotations.get(ANNOTATION) if isinstance(annotations, dict) else None
    gates = spec.get("readinessGates") or []
    has_gate = any(isinstance(g, dict) and g.get("conditionType") == READINESS_GATE for g in gates)
    conditions = status.get("conditions")
    gate_status = next((str(c.get("status")) for c in (conditions if isinstance(conditions, list) else [])
                        if isinstance(c, dict) and c.get("type") == READINESS_GATE), None)
    return PodInfo(
        uid=uid, namespace=namespace, name=name, node_name=str(spec.get("nodeName") or ""),
        phase=str(status.get("phase") or "Pending"),
        annotation=None if annotation is None else str(annotation), has_gate=has_gate,
        deleting=bool(meta.get("deletionTimestamp")), gate_status=gate_status)
