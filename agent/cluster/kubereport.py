"""Telling the cluster what the agent knows: Events on pods and the node, the readiness-gate condition, the node's
model labels and annotation, and the startup taint's removal — through :class:`agent.cluster.kube.KubeApi`.

The node object is shared with the kubelet, the node lifecycle controller and the cluster-autoscaler, so this never
overwrites what it did not read: labels and the annotation are strategic-merge patches of our own keys, and the
startup taint goes through a JSON patch whose ``test`` op names the exact taint list we read (a taint another actor
added in between makes the write fail; we re-read and try again). Removing the taint never gives up.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from typing import Any

from agent import metrics
from agent.cluster.kube import (
    COMPONENT,
    GATE_MEMORY_SIZE,
    LABEL_PREFIX,
    NODE_ANNOTATION,
    STARTUP_TAINT_KEY,
    KubeApi,
    api_status,
    backoff_delay,
    first_line,
    is_conflict,
    now_rfc3339,
)
from agent.cluster.pods import READINESS_GATE, PodInfo
from agent.cluster.reporting import WARNING, EventAggregator
from agent.uris import label_key_for

log = logging.getLogger(__name__)


# ----- telling the cluster ----------------------------------------------------------------------------------


class KubeReporter:
    """Events on pods (aggregated), the readiness-gate condition, node labels/annotation, the startup taint."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self._agg = EventAggregator()
        self._node_uid = ""
        self._labelled: set[str] = set()
        self._node_read = False
        self._gate: OrderedDict[str, str] = OrderedDict()  # pod uid → the gate status we last wrote
        self._max_delay = max(api.settings.reconnect_max_delay, 0.01)

    async def pod_event(self, pod: PodInfo, *, type: str, reason: str, message: str) -> None:
        involved = {"kind": "Pod", "apiVersion": "v1", "namespace": pod.namespace, "name": pod.name, "uid": pod.uid}
        await self._event(pod.namespace, pod.name, pod.uid, involved, type, reason, message)

    async def node_event(self, *, type: str, reason: str, message: str) -> None:
        involved = {"kind": "Node", "apiVersion": "v1", "name": self.api.node, "uid": self._node_uid or self.api.node}
        await self._event("default", self.api.node, self._node_uid or self.api.node, involved, type, reason, message)

    async def _event(self, namespace: str, obj_name: str, obj_uid: str, involved: dict[str, Any], type: str,
                     reason: str, message: str) -> None:
        message = message[:1024]
        rec, new = self._agg.record(obj_uid, type, reason, message,
                                    name=f"{obj_name}.{uuid.uuid4().hex[:16]}"[:253])
        now = now_rfc3339()
        try:
            if new:
                body = {
                    "apiVersion": "v1", "kind": "Event",
                    "metadata": {"name": rec.name, "namespace": namespace},
                    "involvedObject": involved, "reason": reason, "message": message, "type": type,
                    "count": 1, "firstTimestamp": now, "lastTimestamp": now, "eventTime": None,
                    "source": {"component": COMPONENT, "host": self.api.node},
                    "reportingComponent": "weightcache.io/agent", "reportingInstance": self.api.node,
                    "action": reason,
                }
                await asyncio.to_thread(self.api.create_event, namespace, body)
            else:
                await asyncio.to_thread(self.api.patch_event, namespace, rec.name,
                                        {"count": rec.count, "lastTimestamp": now})
            metrics.EVENTS_POSTED.labels(reason=reason).inc()
        except Exception as e:  # noqa: BLE001 - API errors and unreachable (urllib3/OS errors): an Event must never
            # abort the fetch or the reconcile step that reports it; a repeat re-creates it (the 404 path).
            if not new and api_status(e) == 404:  # the event expired (TTL): start a fresh one
                self._agg.forget(obj_uid)
                await self._event(namespace, obj_name, obj_uid, involved, type, reason, message)
                return
            log.warning("cannot post event %s on %s/%s: %s: %s", reason, namespace, obj_name, e.__class__.__name__,
                        first_line(e))
        log.log(logging.WARNING if type == WARNING else logging.INFO, "%s/%s %s: %s", namespace, obj_name, reason,
                message, extra={"event": reason, "event_type": type, "pod": f"{namespace}/{obj_name}",
                                "count": rec.count})

    async def pod_condition(self, pod: PodInfo, *, ready: bool, reason: str, message: str) -> None:
        """Set the readiness-gate condition; ``lastTransitionTime`` moves only when the status changes.

        The condition list merges by ``type`` (strategic merge), so a patch without ``lastTransitionTime`` keeps
        the one already there. The previous status is what we last wrote, or after a restart what the pod shows.
        """
        status = "True" if ready else "False"
        condition: dict[str, Any] = {"type": READINESS_GATE, "status": status, "reason": reason, "message": message}
        if self._gate.get(pod.uid, pod.gate_status) != status:
            condition["lastTransitionTime"] = now_rfc3339()
        body = {"status": {"conditions": [condition]}}
        await asyncio.to_thread(self.api.patch_pod_status, pod.namespace, pod.name, body)
        self._gate[pod.uid] = status
        self._gate.move_to_end(pod.uid)
        while len(self._gate) > GATE_MEMORY_SIZE:
            self._gate.popitem(last=False)

    async def node_models(self, ready_uris: list[str]) -> None:
        """Label the node with the ready models and annotate it with their URIs (one attempt; callers retry)."""
        wanted = {label_key_for(u) for u in ready_uris}
        if not self._node_read:
            node = await self._read_node_once()
            self._node_read = True
            labels = (node.get("metadata") or {}).get("labels") or {}
            self._labelled = {k for k in labels if k.startswith(LABEL_PREFIX)}
        patch_labels: dict[str, str | None] = {k: "ready" for k in wanted}
        patch_labels.update({k: None for k in self._labelled - wanted})
        body = {"metadata": {"labels": patch_labels,
                             "annotations": {NODE_ANNOTATION: ",".join(ready_uris) if ready_uris else None}}}
        try:
            await asyncio.to_thread(self.api.patch_node, body)
        except Exception:
            metrics.NODE_API_ERRORS.labels(op="patch").inc()
            raise
        self._labelled = wanted

    async def _read_node_once(self) -> dict[str, Any]:
        try:
            node = await asyncio.to_thread(self.api.get_node)
        except Exception:
            metrics.NODE_API_ERRORS.labels(op="read").inc()
            raise
        self._node_uid = (node.get("metadata") or {}).get("uid", "") or self._node_uid
        return node

    async def _read_node(self, what: str) -> dict[str, Any]:
        """The node object, retried with capped backoff until the API answers (never gives up)."""
        failures = 0
        while True:
            try:
                return await self._read_node_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - API down, 5xx, timeouts: all retried
                failures += 1
                delay = backoff_delay(failures, self._max_delay)
                log.warning("cannot read node %s to %s (%s: %s); retrying in %.1fs (attempt %d)", self.api.node,
                            what, type(e).__name__, first_line(e), delay, failures)
                await asyncio.sleep(delay)

    async def remove_startup_taint(self) -> bool:
        """Remove ``weightcache.io/warming`` from the node; True if this call wrote the removal.

        Never gives up: reads and writes are retried with capped backoff until the taint is gone. The write is a
        JSON patch that first ``test``s the taint list we read, so a taint that another actor (the autoscaler's
        ``ToBeDeletedByClusterAutoscaler``, the lifecycle controller's ``not-ready``) added after our read makes
        it fail instead of being dropped; we read again and retry.
        """
        failures = conflicts = 0
        wrote = False
        while True:
            node = await self._read_node("remove the startup taint")
            taints = (node.get("spec") or {}).get("taints") or []
            keep = [t for t in taints if t.get("key") != STARTUP_TAINT_KEY]
            if len(keep) == len(taints):
                if wrote:
                    log.info("the startup taint is gone from node %s", self.api.node)
                return wrote
            write: dict[str, Any] = ({"op": "replace", "path": "/spec/taints", "value": keep} if keep
                                     else {"op": "remove", "path": "/spec/taints"})
            ops = [{"op": "test", "path": "/spec/taints", "value": taints}, write]
            try:
                wrote = True  # from here on, a lost answer may hide a removal that happened
                await asyncio.to_thread(self.api.patch_node, ops)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - sorted below: conflicts re-read at once, the rest back off
                if is_conflict(e):
                    conflicts += 1
                    metrics.NODE_API_ERRORS.labels(op="conflict").inc()
                    log.info("node %s changed between our read and our write (%s); reading it again",
                             self.api.node, first_line(e))
                    # Another writer is active: re-read at once, but do not spin if it keeps changing the node.
                    await asyncio.sleep(backoff_delay(conflicts, 1.0) / 10)
                    continue
                failures += 1
                metrics.NODE_API_ERRORS.labels(op="patch").inc()
                delay = backoff_delay(failures, self._max_delay)
                log.warning("cannot remove the startup taint from node %s (%s: %s); retrying in %.1fs (attempt %d)",
                            self.api.node, type(e).__name__, first_line(e), delay, failures)
                await asyncio.sleep(delay)
                continue
            log.info("removed the startup taint %s from node %s", STARTUP_TAINT_KEY, self.api.node)
            return True

    async def node_labels(self) -> dict[str, str]:
        """The node's labels (one attempt; the daemon retries, reporting each failure)."""
        node = await self._read_node_once()
        return dict((node.get("metadata") or {}).get("labels") or {})

    async def node_has_startup_taint(self) -> bool:
        node = await self._read_node_once()
        return any(t.get("key") == STARTUP_TAINT_KEY for t in (node.get("spec") or {}).get("taints") or [])
