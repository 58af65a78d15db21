"""``agent.kube`` in-process against a fake API server over real HTTP: LIST then WATCH with bookmarks, resuming
after a server-side end, relisting after 410 Gone, reconnecting after downtime; and the reporter's writes:
aggregated Events, the readiness-gate condition, node labels and annotation, the startup taint.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent import metrics
from agent.config import load_settings
from agent.kube import KubeApi, KubeReporter, watch_pods
from agent.pods import PodInfo, pod_from_dict
from agent.uris import label_key_for
from tests.agent.daemon_helpers import (
    ANNOTATION,
    GATE,
    NODE,
    STARTUP_TAINT,
    pod_manifest,
)
from tests.fixtures.fakekube import FakeKube

# The fakes and fixtures these tests share (kube, models_bucket, agents, s3_environment).
pytest_plugins = ["tests.agent.daemon_helpers"]


@pytest.fixture
def api(kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KubeApi:
    """A KubeApi for node-a, configured the way the daemon is outside a cluster: through KUBECONFIG."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
    return KubeApi(load_settings(env={}, node_name=NODE, cache_dir=tmp_path / "cache", connect_timeout=2.0,
                                 read_timeout=5.0, inactivity_timeout_seconds=10.0))


async def eventually(predicate: Callable[[], Any], *, timeout: float = 10.0, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


class Recorder:
    """The watcher's two callbacks, remembering what they were told."""

    def __init__(self) -> None:
        self.lists: list[list[str]] = []
        self.events: list[tuple[str, str]] = []

    async def on_list(self, pods: list[PodInfo]) -> None:
        self.lists.append(sorted(p.name for p in pods))

    async def on_event(self, etype: str, pod: PodInfo) -> None:
        self.events.append((etype, pod.name))


@contextlib.asynccontextmanager
async def watching(api: KubeApi, rec: Recorder) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(watch_pods(api, on_list=rec.on_list, on_event=rec.on_event,
                                          reconnect_max_delay=0.5), name="test-watch")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _requests(kube: FakeKube, *, watch: bool) -> list[dict[str, str]]:
    return [r.query for r in kube.request_log
            if r.method == "GET" and r.path == "/api/v1/pods" and (r.query.get("watch", "").lower() in ("true", "1")) == watch]


def _reconnects(reason: str) -> float:
    return metrics.WATCH_RECONNECTS.labels(reason=reason)._value.get()


# ----- watching -----------------------------------------------------------------------------------------------


async def test_the_watch_lists_this_nodes_pods_then_streams_their_changes(api: KubeApi, kube: FakeKube) -> None:
    kube.add_pod(pod_manifest("here", "s3://b/m/"))
    kube.add_pod(pod_manifest("there", "s3://b/m/", node="node-b"))
    rec = Recorder()
    async with watching(api, rec):
        await eventually(lambda: rec.lists, what="the initial listing")
        await asyncio.to_thread(kube.wait_for_watches, 1)
        kube.add_pod(pod_manifest("new", "s3://b/m/"))
        kube.update_pod("default", "new", {"metadata": {"annotations": {ANNOTATION: "s3://b/other/"}}})
        kube.add_pod(pod_manifest("new-there", "s3://b/m/", node="node-b"))
        kube.delete_pod("default", "new")
        await eventually(lambda: len(rec.events) >= 3, what="three watch events")
    assert rec.lists == [["here"]]
    assert rec.events == [("ADDED", "new"), ("MODIFIED", "new"), ("DELETED", "new")]
    watch = _requests(kube, watch=True)[0]
    assert watch["fieldSelector"] == f"spec.nodeName={NODE}" and watch["allowWatchBookmarks"].lower() == "true"


@pytest.mark.parametrize("kube", [0.2], indirect=True)
async def test_a_watch_the_server_ends_resumes_from_the_last_bookmark_without_relisting(
        api: KubeApi, kube: FakeKube) -> None:
    rec = Recorder()
    async with watching(api, rec):
        await eventually(lambda: rec.lists, what="the initial listing")
        await asyncio.to_thread(kube.wait_for_watches, 1)
        kube.add_pod(pod_manifest("there", "s3://b/m/", node="node-b"))  # not ours: only a bookmark tells
        moved_to = kube.resource_version
        await asyncio.sleep(0.6)  # a few bookmark intervals
        kube.drop_watches(graceful=True)
        await eventually(lambda: len(_requests(kube, watch=True)) >= 2, what="the watch resumed")
    resumed = _requests(kube, watch=True)[1]
    assert int(resumed["resourceVersion"]) >= int(moved_to), "the bookmark's version is where it resumes"
    assert len(rec.lists) == 1 and len(_requests(kube, watch=False)) == 1, "a clean end is not a relist"


@pytest.mark.parametrize("kube", [3600.0], indirect=True)
async def test_a_410_gone_relists_and_counts_a_reconnect(api: KubeApi, kube: FakeKube) -> None:
    kube.add_pod(pod_manifest("p1", "s3://b/m/"))
    rec = Recorder()
    expired_before = _reconnects("expired")
    async with watching(api, rec):
        await eventually(lambda: rec.lists, what="the initial listing")
        await asyncio.to_thread(kube.wait_for_watches, 1)
        kube.add_pod(pod_manifest("there", "s3://b/m/", node="node-b"))
        kube.compact()
        kube.drop_watches(graceful=True)
        await eventually(lambda: len(rec.lists) >= 2, what="a relist after 410")
        kube.add_pod(pod_manifest("p2", "s3://b/m/"))
        await eventually(lambda: ("ADDED", "p2") in rec.events, what="the new watch's events")
    assert rec.lists[1] == ["p1"]
    assert _reconnects("expired") == expired_before + 1


async def test_an_api_server_outage_is_retried_until_it_returns(api: KubeApi, kube: FakeKube) -> None:
    kube.add_pod(pod_manifest("p1", "s3://b/m/"))
    rec = Recorder()
    errors_before = _reconnects("error")
    async with watching(api, rec):
        await eventually(lambda: rec.lists, what="the initial listing")
        await asyncio.to_thread(kube.stop)
        kube.delete_pod("default", "p1")
        kube.add_pod(pod_manifest("p2", "s3://b/m/"))
        await eventually(lambda: _reconnects("error") >= errors_before + 2, what="retries while the API is down")
        await asyncio.to_thread(kube.restart)
        await eventually(lambda: ["p2"] in rec.lists, what="a relist once the API is back")
    assert rec.lists == [["p1"], ["p2"]]


async def test_a_failing_list_is_retried(api: KubeApi, kube: FakeKube) -> None:
    kube.add_pod(pod_manifest("p1", "s3://b/m/"))
    kube.fail_next(503, method="GET", path="^/api/v1/pods$", times=2)
    rec = Recorder()
    async with watching(api, rec):
        await eventually(lambda: rec.lists, what="a listing after two 503s")
    assert rec.lists == [["p1"]]


# ----- telling the cluster ---------------------------------------------------------------------------------------


@pytest.fixture
def pod(kube: FakeKube) -> PodInfo:
    return pod_from_dict(kube.add_pod(pod_manifest("p1", "s3://b/m/", gate=True)))


async def test_the_same_event_twice_is_one_object_with_count_two(api: KubeApi, kube: FakeKube,
                                                                 pod: PodInfo) -> None:
    reporter = KubeReporter(api)
    for _ in range(2):
        await reporter.pod_event(pod, type="Warning", reason="WeightsFailed", message="s3://b/m/: NotFound")
    await reporter.pod_event(pod, type="Warning", reason="WeightsFailed", message="s3://b/m/: AccessDenied")

    events = kube.events(involved_name="p1")
    assert [(e["message"], FakeKube.event_count(e)) for e in events] == [
        ("s3://b/m/: NotFound", 2), ("s3://b/m/: AccessDenied", 1)]
    first = events[0]
    assert first["involvedObject"]["uid"] == pod.uid and first["involvedObject"]["kind"] == "Pod"
    assert first["type"] == "Warning" and first["source"]["component"] == "weightcache-agent"


async def test_an_aggregated_event_that_expired_is_created_again(api: KubeApi, kube: FakeKube,
                                                                 pod: PodInfo) -> None:
    reporter = KubeReporter(api)
    await reporter.pod_event(pod, type="Normal", reason="WeightsReady", message="ready")
    name = kube.events(involved_name="p1")[0]["metadata"]["name"]
    async with httpx.AsyncClient(base_url=kube.url, headers=kube.auth_headers) as http:
        assert (await http.delete(f"/api/v1/namespaces/default/events/{name}")).status_code == 200  # TTL
    await reporter.pod_event(pod, type="Normal", reason="WeightsReady", message="ready")
    events = kube.events(involved_name="p1")
    assert len(events) == 1 and FakeKube.event_count(events[0]) == 1


async def test_an_event_the_api_cannot_take_is_logged_not_raised(api: KubeApi, kube: FakeKube,
                                                                 pod: PodInfo) -> None:
    reporter = KubeReporter(api)
    kube.fail_next(500, method="POST", path="/events")
    await reporter.pod_event(pod, type="Normal", reason="WeightsFetching", message="fetching")
    await asyncio.to_thread(kube.stop)
    await reporter.pod_event(pod, type="Normal", reason="WeightsReady", message="ready")  # API unreachable
    await asyncio.to_thread(kube.restart)
    await reporter.pod_event(pod, type="Normal", reason="WeightsReady", message="ready again")
    assert [e["message"] for e in kube.events(involved_name="p1")] == ["ready again"]


async def test_the_readiness_condition_is_patched_into_the_pod_status(api: KubeApi, kube: FakeKube,
                                                                      pod: PodInfo) -> None:
    reporter = KubeReporter(api)
    await reporter.pod_condition(pod, ready=False, reason="WeightsFetching", message="0/1 model(s) ready")
    await reporter.pod_condition(pod, ready=True, reason="WeightsReady", message="1 model(s) ready")

    conditions = [c for c in kube.get_pod("default", "p1")["status"].get("conditions", []) if c["type"] == GATE]
    assert len(conditions) == 1, "merged by type, not appended"
    assert conditions[0]["status"] == "True" and conditions[0]["reason"] == "WeightsReady"


async def test_node_labels_follow_the_ready_models(api: KubeApi, kube: FakeKube) -> None:
    stale = label_key_for("s3://b/from-a-previous-run/")
    kube.update_node(NODE, {"metadata": {"labels": {stale: "ready"}}})
    reporter = KubeReporter(api)
    a, b = "s3://b/a/", "s3://b/c/weights.bin"

    def models_labels() -> dict[str, str]:
        labels = kube.get_node(NODE)["metadata"].get("labels", {})
        return {k: v for k, v in labels.items() if k.startswith("models.weightcache.io/")}

    await reporter.node_models([a, b])
    assert models_labels() == {label_key_for(a): "ready", label_key_for(b): "ready"}
    assert kube.get_node(NODE)["metadata"]["annotations"][ANNOTATION] == f"{a},{b}"
    await reporter.node_models([b])
    assert models_labels() == {label_key_for(b): "ready"}
    await reporter.node_models([])
    assert models_labels() == {}
    assert ANNOTATION not in kube.get_node(NODE)["metadata"].get("annotations", {})
    assert kube.get_node(NODE)["metadata"]["labels"]["kubernetes.io/hostname"] == NODE, "other labels stay"


async def test_the_startup_taint_is_removed_and_other_taints_kept(api: KubeApi, kube: FakeKube) -> None:
    other = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    kube.update_node(NODE, lambda n: n["spec"].update(taints=[dict(STARTUP_TAINT), other]))
    reporter = KubeReporter(api)

    assert await reporter.node_has_startup_taint() is True
    assert await reporter.remove_startup_taint() is True
    assert kube.get_node(NODE)["spec"]["taints"] == [other]
    assert await reporter.node_has_startup_taint() is False
    assert await reporter.remove_startup_taint() is False, "nothing to remove the second time"


async def test_a_node_event_is_posted_about_the_node(api: KubeApi, kube: FakeKube) -> None:
    reporter = KubeReporter(api)
    await reporter.node_models([])  # learns the node's uid, as the daemon's node loop does first
    await reporter.node_event(type="Warning", reason="WarmDeadlineExceeded", message="warm set not ready")
    (event,) = kube.events(involved_name=NODE)
    assert event["involvedObject"]["kind"] == "Node"
    assert event["involvedObject"]["uid"] == kube.get_node(NODE)["metadata"]["uid"]
    assert event["type"] == "Warning"

