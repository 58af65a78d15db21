"""``agent.cluster.kube`` in-process against a fake API server over real HTTP: LIST then WATCH with bookmarks, resuming
after a server-side end or a silent stream, relisting after 410 Gone, reconnecting after downtime; and the
reporter's writes: aggregated Events, the readiness-gate condition (its transition time), node labels and
annotation, the startup taint — removed however often the API fails, never dropping another actor's taint.
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
from agent.cluster.kube import KubeApi, watch_pods
from agent.cluster.kubereport import KubeReporter
from agent.cluster.pods import PodInfo, pod_from_dict
from agent.config import load_settings
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


def make_api(kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> KubeApi:
    """A KubeApi for node-a, configured the way the daemon is outside a cluster: through KUBECONFIG."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
    values: dict[str, Any] = {"node_name": NODE, "cache_dir": tmp_path / "cache", "connect_timeout": 2.0,
                              "read_timeout": 5.0, "inactivity_timeout_seconds": 10.0,
                              "control_socket": tmp_path / "run" / "agent.sock",
                              "reconnect_max_delay": 0.05}  # node retries back off, but briefly here
    values.update(overrides)
    return KubeApi(load_settings(env={}, **values))


@pytest.fixture
def api(kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KubeApi:
    return make_api(kube, tmp_path, monkeypatch)


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


@pytest.mark.parametrize("kube", [0.2], indirect=True)
async def test_a_silent_watch_is_resumed_from_its_last_version_not_relisted(
        kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = make_api(kube, tmp_path, monkeypatch, inactivity_timeout_seconds=1.5)
    rec = Recorder()
    inactive, errors = _reconnects("inactive"), _reconnects("error")
    async with watching(api, rec):
        await eventually(lambda: rec.lists, what="the initial listing")
        await asyncio.to_thread(kube.wait_for_watches, 1)
        kube.add_pod(pod_manifest("before", "s3://b/m/"))
        await eventually(lambda: ("ADDED", "before") in rec.events, what="an event before the silence")
        seen = kube.resource_version
        assert kube.silence_watches() == 1
        kube.add_pod(pod_manifest("during", "s3://b/m/"))  # lost in the silent stream
        await eventually(lambda: ("ADDED", "during") in rec.events, what="the change made during the silence")
    resumed = _requests(kube, watch=True)[1]
    assert int(resumed["resourceVersion"]) >= int(seen), "resumed from the last version it had seen"
    assert len(_requests(kube, watch=False)) == 1 and rec.lists == [[]], "a silent stream is not a relist"
    assert _reconnects("inactive") == inactive + 1
    assert _reconnects("error") == errors, "silence is not counted as an error"
    assert rec.events.count(("ADDED", "before")) == 1, "nothing replayed twice"


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


async def test_the_gate_transition_time_moves_only_when_the_status_changes(api: KubeApi, kube: FakeKube,
                                                                          pod: PodInfo) -> None:
    long_ago = "2020-01-01T00:00:00Z"

    def condition() -> dict[str, Any]:
        (c,) = [c for c in kube.get_pod("default", "p1")["status"]["conditions"] if c["type"] == GATE]
        return dict(c)

    def age(pod_obj: dict[str, Any]) -> None:
        for c in pod_obj["status"]["conditions"]:
            if c["type"] == GATE:
                c["lastTransitionTime"] = long_ago

    def age_it() -> None:  # as if the last transition happened long ago
        kube.update_pod("default", "p1", age)

    reporter = KubeReporter(api)
    await reporter.pod_condition(pod, ready=False, reason="WeightsFetching", message="0/1 model(s) ready")
    assert condition()["lastTransitionTime"] != long_ago
    age_it()
    await reporter.pod_condition(pod, ready=False, reason="WeightsFailed", message="s3://b/m/: NotFound")
    assert (condition()["reason"], condition()["lastTransitionTime"]) == ("WeightsFailed", long_ago), \
        "a new reason with the same status is not a transition"
    await reporter.pod_condition(pod, ready=True, reason="WeightsReady", message="1 model(s) ready")
    assert condition()["status"] == "True" and condition()["lastTransitionTime"] != long_ago
    age_it()
    restarted = KubeReporter(api)  # a new agent process: it learns the status from the pod itself
    await restarted.pod_condition(pod_from_dict(kube.get_pod("default", "p1")), ready=True, reason="WeightsReady",
                                  message="1 model(s) ready, checked again")
    assert (condition()["message"], condition()["lastTransitionTime"]) == ("1 model(s) ready, checked again",
                                                                            long_ago)


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



# ----- the startup taint, safely -----------------------------------------------------------------------------------

OTHER_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
AUTOSCALER_TAINT = {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}
NODE_PATH = f"^/api/v1/nodes/{NODE}$"


def _taint_node(kube: FakeKube) -> None:
    kube.update_node(NODE, lambda n: n["spec"].update(taints=[dict(STARTUP_TAINT), dict(OTHER_TAINT)]))


def _node_requests(kube: FakeKube, method: str) -> int:
    return sum(1 for r in kube.request_log if r.method == method and r.path == f"/api/v1/nodes/{NODE}")


def _node_errors(op: str) -> float:
    return metrics.NODE_API_ERRORS.labels(op=op)._value.get()


async def test_the_startup_taint_goes_even_when_node_reads_fail_at_start(api: KubeApi, kube: FakeKube) -> None:
    _taint_node(kube)
    kube.fail_next(503, method="GET", path=NODE_PATH, times=12)  # more than any fixed number of tries
    reads_failed = _node_errors("read")

    assert await KubeReporter(api).remove_startup_taint() is True
    assert kube.get_node(NODE)["spec"]["taints"] == [OTHER_TAINT]
    assert _node_requests(kube, "GET") == 13
    assert _node_errors("read") == reads_failed + 12


async def test_a_taint_another_actor_adds_between_our_read_and_write_survives(api: KubeApi,
                                                                             kube: FakeKube) -> None:
    _taint_node(kube)
    # The cluster-autoscaler marks the node for deletion just after the agent read it.
    kube.before_next(lambda: kube.update_node(NODE, lambda n: n["spec"]["taints"].append(dict(AUTOSCALER_TAINT))),
                     method="PATCH", path=NODE_PATH)
    conflicts = _node_errors("conflict")

    assert await KubeReporter(api).remove_startup_taint() is True
    assert kube.get_node(NODE)["spec"]["taints"] == [OTHER_TAINT, AUTOSCALER_TAINT]
    assert _node_requests(kube, "PATCH") == 2, "the stale write failed its test; the second, on a fresh read, won"
    assert _node_errors("conflict") == conflicts + 1


async def test_conflicts_on_the_taint_write_are_read_again_and_retried(api: KubeApi, kube: FakeKube) -> None:
    _taint_node(kube)
    kube.fail_next(409, method="PATCH", path=NODE_PATH, times=3)
    conflicts = _node_errors("conflict")

    assert await KubeReporter(api).remove_startup_taint() is True
    assert kube.get_node(NODE)["spec"]["taints"] == [OTHER_TAINT]
    assert _node_errors("conflict") == conflicts + 3
    assert _node_requests(kube, "GET") == 4, "each conflict reads the node again"


async def test_failing_taint_writes_are_retried_without_giving_up(api: KubeApi, kube: FakeKube) -> None:
    kube.update_node(NODE, lambda n: n["spec"].update(taints=[dict(STARTUP_TAINT)]))
    kube.fail_next(500, method="PATCH", path=NODE_PATH, times=12)

    assert await KubeReporter(api).remove_startup_taint() is True
    assert "taints" not in kube.get_node(NODE)["spec"], "the last taint removed leaves no empty list"
    assert _node_requests(kube, "PATCH") == 13


async def test_the_taint_removal_waits_out_an_api_server_outage(api: KubeApi, kube: FakeKube) -> None:
    _taint_node(kube)
    await asyncio.to_thread(kube.stop)
    removal = asyncio.create_task(KubeReporter(api).remove_startup_taint())
    await asyncio.sleep(1.0)  # a good many failed reads
    assert not removal.done()
    await asyncio.to_thread(kube.restart)
    assert await asyncio.wait_for(removal, timeout=15) is True
    assert kube.get_node(NODE)["spec"]["taints"] == [OTHER_TAINT]
