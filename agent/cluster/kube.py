"""The Kubernetes API: its client (every call this agent makes) and the pods list+watch on this node.

The only module that imports ``kubernetes`` (others read its errors through :func:`api_status`). The client is
synchronous: every call runs in a worker thread, and a watch streams its lines from a thread into an asyncio queue.
Watching follows kopf's three layers:
*infinite* (relist after 410 Gone or an error, with bounded backoff) → *continuous* (resume from the last
resourceVersion, bookmarks included, until the server says the version is too old; a stream that goes silent
past the inactivity timeout is resumed the same way, never relisted) → *one request* (a single streaming GET
with a server timeout and a client inactivity timeout). Unknown event types are logged and skipped.

Telling the cluster (Events, conditions, node labels, the taint) is :mod:`agent.cluster.kubereport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import MaxRetryError, ReadTimeoutError

from agent import metrics
from agent.cluster.pods import PodFormatError, PodInfo, pod_from_dict
from agent.config import AgentSettings
from agent.errors import ConfigError

log = logging.getLogger(__name__)

STARTUP_TAINT_KEY = "weightcache.io/warming"
NODE_ANNOTATION = "weightcache.io/models"
LABEL_PREFIX = "models.weightcache.io/"
COMPONENT = "weightcache-agent"


#: Pods whose readiness-gate status we last wrote, remembered so lastTransitionTime moves only on a change.
GATE_MEMORY_SIZE = 4096


class WatchExpired(Exception):
    """The resourceVersion we watch from is too old (410 Gone): relist."""


class WatchInactive(Exception):
    """Nothing (not even a bookmark) arrived within the inactivity timeout: resume from the last version."""


def backoff_delay(failures: int, cap: float) -> float:
    """Exponential from 0.5 s, capped, with jitter (so a fleet of agents does not retry in step)."""
    return random.uniform(0.5, 1.0) * min(cap, 0.5 * 2.0 ** min(max(failures, 1) - 1, 10))


def first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0][:200] if text else ""


def describe_api_error(e: BaseException) -> str:
    """A short, stable description (no dates, no headers), fit for an Event that aggregates repeats."""
    if isinstance(e, ApiException):
        return f"HTTP {e.status} {e.reason or ''}".strip()
    if isinstance(e, MaxRetryError):
        return f"cannot reach the API server ({type(e.reason).__name__ if e.reason else 'MaxRetryError'})"
    return type(e).__name__


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_status(e: BaseException) -> int | None:
    """The HTTP status of an API error; None for anything else (unreachable, timeouts)."""
    return int(e.status) if isinstance(e, ApiException) and e.status is not None else None


def is_conflict(e: BaseException) -> bool:
    """409 Conflict, or 422 from a JSON patch whose ``test`` op failed: the object is not what we read."""
    if not isinstance(e, ApiException):
        return False
    if e.status == 409:
        return True
    return e.status == 422 and "test" in (e.body.decode() if isinstance(e.body, bytes) else str(e.body or ""))


class KubeApi:
    """Thin synchronous wrapper over CoreV1Api with raw-dict results (call it through ``asyncio.to_thread``)."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        try:
            try:
                config.load_incluster_config()
            except ConfigException:
                # KUBECONFIG read now, not the client's copy taken when `kubernetes` was imported: a process
                # (or test) that sets it after that import would otherwise silently get ~/.kube/config.
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        except (ConfigException, OSError, TypeError) as e:
            raise ConfigError(f"no Kubernetes configuration (in-cluster or KUBECONFIG): {e}") from e
        self.core = client.CoreV1Api()
        self.node = settings.node_name

    def _json(self, resp: Any) -> Any:
        try:
            return json.loads(resp.data)
        finally:
            resp.release_conn()

    @staticmethod
    def _discard(resp: Any) -> None:
        # Read the body before handing the connection back: a connection returned with its response unread is
        # reused by the next request, which then fails with ResponseNotReady('Request-sent').
        try:
            resp.drain_conn()
        finally:
            resp.release_conn()

    def _timeout(self) -> tuple[float, float]:
        return (self.settings.connect_timeout, self.settings.read_timeout)

    def list_pods(self) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            kwargs: dict[str, Any] = {"field_selector": f"spec.nodeName={self.node}", "limit": 500}
            if cont:
                kwargs["_continue"] = cont
            data = self._json(self.core.list_pod_for_all_namespaces(
                _preload_content=False, _request_timeout=self._timeout(), **kwargs))
            items.extend(data.get("items") or [])
            meta = data.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                return items, str(meta.get("resourceVersion") or "")

    def list_agent_pod_ips(self, namespace: str, selector: str) -> list[str]:
        """The IPs of the running pods matching ``selector`` in ``namespace`` (the peer agents, this one too)."""
        data = self._json(self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False,
                                                        _request_timeout=self._timeout()))
        ips: list[str] = []
        for pod in data.get("items") or []:
            status = pod.get("status") or {}
            if (pod.get("metadata") or {}).get("deletionTimestamp") or status.get("phase") != "Running":
                continue
            if status.get("podIP"):
                ips.append(str(status["podIP"]))
        return ips

    def open_watch(self, resource_version: str) -> Any:
        return self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node}", watch=True, resource_version=resource_version,
            allow_watch_bookmarks=True, timeout_seconds=self.settings.watch_timeout_seconds,
            _preload_content=False,
            _request_timeout=(self.settings.connect_timeout, self.settings.inactivity_timeout_seconds))

    def get_node(self) -> dict[str, Any]:
        return dict(self._json(self.core.read_node(self.node, _preload_content=False,
                                                   _request_timeout=self._timeout())))

    def patch_node(self, body: Any) -> None:
        self._discard(self.core.patch_node(self.node, body, _preload_content=False,
                                           _request_timeout=self._timeout()))

    def patch_pod_status(self, namespace: str, name: str, body: Any) -> None:
        self._discard(self.core.patch_namespaced_pod_status(name, namespace, body, _preload_content=False,
                                                            _request_timeout=self._timeout()))

    def create_event(self, namespace: str, body: dict[str, Any]) -> None:
        self._discard(self.core.create_namespaced_event(namespace, body, _preload_content=False,
                                                        _request_timeout=self._timeout()))

    def patch_event(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        self._discard(self.core.patch_namespaced_event(name, namespace, body, _preload_content=False,
                                                       _request_timeout=self._timeout()))


# ----- watching -------------------------------------------------------------------------------------------


async def _one_watch(api: KubeApi, resource_version: str) -> AsyncIterator[dict[str, Any]]:
    """One streaming watch request, its lines read in a thread and handed over through a queue."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1000)
    holder: dict[str, Any] = {}
    stop = threading.Event()
    done = object()

    def put(item: Any) -> None:
        if not stop.is_set():
            fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            with contextlib.suppress(Exception):
                fut.result()

    def reader() -> None:
        try:
            resp = api.open_watch(resource_version)
            holder["resp"] = resp
            buf = b""
            for chunk in resp.stream(65536, decode_content=True):
                if stop.is_set():
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        put(json.loads(line))
            if buf.strip() and not stop.is_set():
                put(json.loads(buf))
            put(done)
        except ReadTimeoutError as e:
            put(WatchInactive(str(e)))
        except MaxRetryError as e:
            put(WatchInactive(str(e)) if isinstance(e.reason, ReadTimeoutError) else e)
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which decides
            put(e)
        finally:
            with contextlib.suppress(Exception):
                holder["resp"].release_conn()

    thread = threading.Thread(target=reader, name=f"pod-watch@{resource_version}", daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        resp = holder.get("resp")
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown() if hasattr(resp, "shutdown") else resp.close()
        with contextlib.suppress(asyncio.QueueFull):
            while not queue.empty():
                queue.get_nowait()


async def watch_pods(api: KubeApi, *, on_list: Callable[[list[PodInfo]], Awaitable[None]],
                     on_event: Callable[[str, PodInfo], Awaitable[None]],
                     reconnect_max_delay: float = 30.0) -> None:
    """Forever: LIST, then WATCH from its resourceVersion; relist on 410; reconnect with jittered backoff."""
    failures = 0
    while True:
        try:
            raw, rv = await asyncio.to_thread(api.list_pods)
            pods = []
            for obj in raw:
                with contextlib.suppress(PodFormatError):
                    pods.append(pod_from_dict(obj))
            await on_list(pods)
            failures = 0
            log.info("listed %d pods on node %s at resourceVersion %s", len(pods), api.node, rv)
            cursor = [rv]  # the last version seen, advanced by every event and bookmark
            while True:  # continuous: resume from the last version seen
                try:
                    await _watch_once(api, cursor, on_event)
                except WatchInactive:
                    # A silent stream (a stuck proxy, a half-open connection) is not an error, and the version
                    # is still good: resume from it. Should it have expired meanwhile, the server says 410 and
                    # only then do we relist.
                    metrics.WATCH_RECONNECTS.labels(reason="inactive").inc()
                    log.info("pod watch silent for %.0fs; resuming at resourceVersion %s",
                             api.settings.inactivity_timeout_seconds, cursor[0])
                    continue
                failures = 0
                log.debug("watch ended (server timeout); resuming at %s", cursor[0])
        except asyncio.CancelledError:
            raise
        except WatchExpired as e:
            metrics.WATCH_RECONNECTS.labels(reason="expired").inc()
            log.info("watch expired (%s): relisting", e)
            continue
        except Exception as e:  # noqa: BLE001 - API down, network, 5xx: back off and relist
            failures += 1
            metrics.WATCH_RECONNECTS.labels(reason="error").inc()
            delay = backoff_delay(failures + 1, reconnect_max_delay)
            log.warning("pod watch failed (%s: %s); reconnecting in %.1fs", type(e).__name__, first_line(e), delay)
            await asyncio.sleep(delay)


async def _watch_once(api: KubeApi, cursor: list[str],
                      on_event: Callable[[str, PodInfo], Awaitable[None]]) -> None:
    """One watch request from ``cursor[0]``, advancing it with every event and bookmark, until the stream ends."""
    async for event in _one_watch(api, cursor[0]):
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise WatchExpired(obj.get("message", "410 Gone"))
            raise ApiException(status=code or 500, reason=obj.get("message", "watch error"))
        new_rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype == "BOOKMARK":
            cursor[0] = new_rv or cursor[0]
            continue
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("skipping unknown watch event type %r", etype)
            continue
        try:
            pod = pod_from_dict(obj)
        except PodFormatError as e:
            log.warning("skipping unreadable pod in watch: %s", e)
            cursor[0] = new_rv or cursor[0]
            continue
        await on_event(etype, pod)
        cursor[0] = new_rv or cursor[0]  # only once handled: a resume replays what was not
