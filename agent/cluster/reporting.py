"""How the agent tells the world: Events on pods (aggregated like kubelet's), the readiness-gate condition, and
the node's ready-model labels. :class:`Reporter` is the interface; :class:`LogReporter` is the ``--pods-file``
implementation (structured log lines), the Kubernetes one lives in ``agent.cluster.kube``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from agent import metrics
from agent.cluster.pods import PodInfo

log = logging.getLogger("agent.events")

NORMAL, WARNING = "Normal", "Warning"
#: Same event (object, type, reason, message) repeated: bump its count like kubelet's EventCorrelator.
AGGREGATE_CACHE_SIZE = 4096


@dataclass
class EventRecord:
    name: str
    count: int
    first_seen: float
    last_seen: float


class Reporter(Protocol):
    async def pod_event(self, pod: PodInfo, *, type: str, reason: str, message: str) -> None: ...
    async def pod_condition(self, pod: PodInfo, *, ready: bool, reason: str, message: str) -> None: ...
    async def node_event(self, *, type: str, reason: str, message: str) -> None: ...
    async def node_models(self, ready_uris: list[str]) -> None: ...
    async def remove_startup_taint(self) -> bool: ...


class EventAggregator:
    """Remembers recent events so repeats become a count, not a flood."""

    def __init__(self) -> None:
        self._seen: OrderedDict[tuple[str, str, str, str], EventRecord] = OrderedDict()

    def record(self, obj_uid: str, type: str, reason: str, message: str, name: str) -> tuple[EventRecord, bool]:
        """Return (record, is_new)."""
        key = (obj_uid, type, reason, message)
        now = time.time()
        rec = self._seen.get(key)
        if rec is not None:
            rec.count += 1
            rec.last_seen = now
            self._seen.move_to_end(key)
            return rec, False
        rec = EventRecord(name=name, count=1, first_seen=now, last_seen=now)
        self._seen[key] = rec
        while len(self._seen) > AGGREGATE_CACHE_SIZE:
            self._seen.popitem(last=False)
        return rec, True

    def forget(self, obj_uid: str) -> None:
        for key in [k for k in self._seen if k[0] == obj_uid]:
            del self._seen[key]


class LogReporter:
    """For ``--pods-file``: events become log lines (logger ``agent.events``, with pod, reason, count)."""

    def __init__(self) -> None:
        self._agg = EventAggregator()
        self.conditions: dict[str, tuple[bool, str]] = {}
        self.ready_models: list[str] = []

    async def pod_event(self, pod: PodInfo, *, type: str, reason: str, message: str) -> None:
        rec, _new = self._agg.record(pod.uid, type, reason, message, name=reason)
        metrics.EVENTS_POSTED.labels(reason=reason).inc()
        log.log(logging.WARNING if type == WARNING else logging.INFO, "%s %s: %s", pod.key, reason, message,
                extra={"event": reason, "event_type": type, "pod": pod.key, "count": rec.count})

    async def pod_condition(self, pod: PodInfo, *, ready: bool, reason: str, message: str) -> None:
        self.conditions[pod.key] = (ready, reason)
        log.info("%s condition weightcache.io/weights-ready=%s (%s)", pod.key, ready, reason,
                 extra={"pod": pod.key, "condition": ready, "reason": reason})

    async def node_event(self, *, type: str, reason: str, message: str) -> None:
        log.log(logging.WARNING if type == WARNING else logging.INFO, "node %s: %s", reason, message,
                extra={"event": reason, "event_type": type})

    async def node_models(self, ready_uris: list[str]) -> None:
        self.ready_models = list(ready_uris)

    async def remove_startup_taint(self) -> bool:
        return False
