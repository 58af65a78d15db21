"""Self-tests of the fake Kubernetes API server, driven through the official ``kubernetes`` client.

Each test pins one behaviour of the real API server that the agent relies on, so a change to the fake that
drifts from the real wire format fails here first. They must stay fast (the whole file well under 30 s on 2
cores): short bookmark intervals and watch timeouts, no sleeps longer than a bookmark.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from tests.fixtures.fakekube import POD_PATCH_SCHEMA, FakeKube, micro_timestamp, strategic_merge

NS = "default"


def _pod(name: str, node: str = "node-a", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox:1.36"}]},
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
            ],
        },
    }


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube(bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
def api_client(kube: FakeKube, tmp_path: Path) -> Iterator[client.ApiClient]:
    configuration = client.Configuration()
    config.load_kube_config(
        config_file=str(kube.write_kubeconfig(tmp_path / "kubeconfig")), client_configuration=configuration
    )
    configuration.retries = 0  # a refused connection should fail at once, not after urllib3's retries
    api = client.ApiClient(configuration)
    yield api
    api.close()


@pytest.fixture
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


def _raw_watch(kube: FakeKube, path: str) -> list[dict[str, Any]]:
    """A whole watch response as raw JSON lines (to check the wire format, not the client's reading of it)."""
    request = urllib.request.Request(kube.url + path, headers=kube.auth_headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        return [json.loads(line) for line in response.read().decode().splitlines() if line]


def test_list_then_watch_from_the_lists_resource_version_sees_changes_in_order(
    kube: FakeKube, core: client.CoreV1Api
) -> None:
    kube.add_pod(_pod("a"))
    listed = core.list_namespaced_pod(NS)
    assert [p.metadata.name for p in listed.items] == ["a"]
    kube.add_pod(_pod("b"))
    kube.update_pod(NS, "a", {"metadata": {"annotations": {"touched": "yes"}}})
    kube.delete_pod(NS, "b")

    seen = []
    w = watch.Watch()
    for event in w.stream(
        core.list_namespaced_pod, NS, resource_version=listed.metadata.resource_version, timeout_seconds=5
    ):
        seen.append(
            (event["type"], event["object"].metadata.name, int(event["object"].metadata.resource_version))
        )
        if len(seen) == 3:
            w.stop()
    assert [(t, n) for t, n, _ in seen] == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    assert [rv for _, _, rv in seen] == sorted(rv for _, _, rv in seen)
    assert seen[-1][2] == int(kube.resource_version)  # a DELETED object carries the deletion's revision


def test_list_has_list_kind_and_items_without_kind(kube: FakeKube) -> None:
    kube.add_pod(_pod("a"))
    request = urllib.request.Request(kube.url + "/api/v1/namespaces/default/pods", headers=kube.auth_headers)
    with urllib.request.urlopen(request) as response:
        body = json.loads(response.read())
    assert body["kind"] == "PodList" and body["apiVersion"] == "v1"
    assert body["metadata"]["resourceVersion"] == kube.resource_version
    assert "kind" not in body["items"][0] and "apiVersion" not in body["items"][0]
    assert kube.get_pod(NS, "a")["kind"] == "Pod"


def test_watch_events_are_newline_delimited_json_with_typed_objects(kube: FakeKube) -> None:
    kube.add_pod(_pod("a"))
    events = _raw_watch(kube, "/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=1")
    assert [e["type"] for e in events] == ["ADDED"]  # no resourceVersion: the current state first
    assert events[0]["object"]["kind"] == "Pod" and events[0]["object"]["apiVersion"] == "v1"


def test_bookmarks_arrive_only_when_requested(kube: FakeKube, core: client.CoreV1Api) -> None:
    rv = core.list_namespaced_pod(NS).metadata.resource_version
    with_marks = list(
        watch.Watch().stream(
            core.list_namespaced_pod, NS, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=1
        )
    )
    assert len(with_marks) >= 2 and {e["type"] for e in with_marks} == {"BOOKMARK"}
    mark = with_marks[0]["raw_object"]
    assert mark["kind"] == "Pod" and mark["metadata"]["resourceVersion"] == kube.resource_version
    without = list(watch.Watch().stream(core.list_namespaced_pod, NS, resource_version=rv, timeout_seconds=1))
    assert without == []


def test_watch_from_a_compacted_resource_version_gets_410_expired_inside_the_stream(kube: FakeKube) -> None:
    old = kube.resource_version
    kube.add_pod(_pod("a"))
    kube.compact()
    events = _raw_watch(kube, f"/api/v1/namespaces/default/pods?watch=true&resourceVersion={old}")
    assert events == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {old} ({kube.resource_version})",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]


def test_the_client_raises_410_for_a_compacted_resource_version(
    kube: FakeKube, core: client.CoreV1Api
) -> None:
    old = core.list_namespaced_pod(NS).metadata.resource_version
    kube.add_pod(_pod("a"))
    kube.compact()
    with pytest.raises(ApiException) as raised:
        # With timeout_seconds the client does not retry after a 410; it raises the ERROR event's Status.
        list(watch.Watch().stream(core.list_namespaced_pod, NS, resource_version=old, timeout_seconds=5))
    assert raised.value.status == 410
    assert raised.value.reason.startswith("Expired: too old resource version")


def test_history_beyond_its_bound_is_compacted() -> None:
    with FakeKube(history_size=2) as kube:
        old = kube.resource_version
        for name in ("a", "b", "c"):
            kube.add_pod(_pod(name))
        events = _raw_watch(kube, f"/api/v1/pods?watch=true&resourceVersion={old}")
        assert events[0]["object"]["code"] == 410


def test_abrupt_drop_cuts_the_stream_with_a_protocol_error(kube: FakeKube, core: client.CoreV1Api) -> None:
    outcome: list[BaseException | None] = []

    def consume() -> None:
        try:
            for _ in watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=20):
                pass
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 -- what the client surfaces is what is under test
            outcome.append(e)

    thread = threading.Thread(target=consume)
    thread.start()
    kube.wait_for_watches(1)
    assert kube.drop_watches() == 1
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert isinstance(outcome[0], urllib3.exceptions.ProtocolError)
    assert kube.watch_connections_open() == 0 and kube.watch_connections_total("pods") == 1


def test_graceful_drop_ends_the_stream_cleanly(kube: FakeKube, core: client.CoreV1Api) -> None:
    outcome: list[BaseException | None] = []

    def consume() -> None:
        try:
            list(watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=20))
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 -- what the client surfaces is what is under test
            outcome.append(e)

    thread = threading.Thread(target=consume)
    thread.start()
    kube.wait_for_watches(1)
    kube.drop_watches(graceful=True)
    thread.join(timeout=5)
    assert outcome == [None]


def test_stop_refuses_connections_and_restart_serves_the_same_state_on_the_same_port(
    kube: FakeKube, core: client.CoreV1Api
) -> None:
    kube.add_pod(_pod("a"))
    port = kube.port
    kube.stop()
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        core.read_namespaced_pod("a", NS, _request_timeout=2)
    kube.restart()
    assert kube.port == port
    assert core.read_namespaced_pod("a", NS).metadata.name == "a"


def test_status_patch_merges_conditions_by_type(kube: FakeKube, core: client.CoreV1Api) -> None:
    before = kube.add_pod(_pod("a"))
    core.patch_namespaced_pod_status(
        "a",
        NS,
        {
            "status": {
                "conditions": [
                    {"type": "Ready", "status": "True"},
                    {"type": "weightcache.io/ModelsReady", "status": "True"},
                ]
            }
        },
    )
    after = kube.get_pod(NS, "a")
    assert [(c["type"], c["status"]) for c in after["status"]["conditions"]] == [
        ("PodScheduled", "True"),
        ("Ready", "True"),
        ("weightcache.io/ModelsReady", "True"),
    ]
    assert after["status"]["conditions"][1]["reason"] == "ContainersNotReady"  # merged, not replaced
    assert int(after["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])


def test_status_patch_cannot_change_labels_and_main_patch_cannot_change_status(
    kube: FakeKube, core: client.CoreV1Api
) -> None:
    kube.add_pod(_pod("a"))
    core.patch_namespaced_pod_status("a", NS, {"metadata": {"labels": {"x": "y"}}})
    core.patch_namespaced_pod("a", NS, {"status": {"phase": "Failed"}})
    pod = kube.get_pod(NS, "a")
    assert "x" not in pod["metadata"]["labels"] and pod["status"]["phase"] == "Running"


def test_a_no_op_patch_keeps_the_resource_version(kube: FakeKube, core: client.CoreV1Api) -> None:
    kube.add_pod(_pod("a", app="x"))
    rv = kube.resource_version
    core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"app": "x"}}})
    assert kube.resource_version == rv


def test_merge_and_json_patches_apply(kube: FakeKube, core: client.CoreV1Api) -> None:
    kube.add_pod(_pod("a", app="x"))
    # The official client has no way to choose merge-patch (a dict is always sent as strategic merge).
    request = urllib.request.Request(
        kube.url + "/api/v1/namespaces/default/pods/a",
        method="PATCH",
        data=json.dumps({"metadata": {"annotations": {"k": "v"}}}).encode(),
        headers={**kube.auth_headers, "Content-Type": "application/merge-patch+json"},
    )
    with urllib.request.urlopen(request) as response:
        assert json.loads(response.read())["metadata"]["annotations"] == {"k": "v"}
    core.patch_namespaced_pod(
        "a", NS, [{"op": "remove", "path": "/metadata/labels/app"}]
    )  # a list is json-patch
    pod = kube.get_pod(NS, "a")
    assert pod["metadata"]["annotations"] == {"k": "v"} and pod["metadata"]["labels"] == {}
    with pytest.raises(ApiException) as raised:
        core.patch_namespaced_pod("a", NS, [{"op": "remove", "path": "/metadata/labels/app"}])
    assert raised.value.status == 422


def test_a_stale_resource_version_in_a_patch_is_a_conflict(kube: FakeKube, core: client.CoreV1Api) -> None:
    stale = kube.add_pod(_pod("a"))["metadata"]["resourceVersion"]
    kube.update_pod(NS, "a", {"metadata": {"labels": {"moved": "on"}}})
    with pytest.raises(ApiException) as raised:
        core.patch_namespaced_pod("a", NS, {"metadata": {"resourceVersion": stale, "labels": {"x": "y"}}})
    assert raised.value.status == 409 and json.loads(raised.value.body)["reason"] == "Conflict"


def test_node_label_patch_with_null_deletes_the_label(kube: FakeKube, core: client.CoreV1Api) -> None:
    kube.add_node("node-a", labels={"weightcache.io/ready": "true", "keep": "me"})
    core.patch_node(
        "node-a", {"metadata": {"labels": {"weightcache.io/ready": None}, "annotations": {"a": "b"}}}
    )
    node = kube.get_node("node-a")
    assert (
        "weightcache.io/ready" not in node["metadata"]["labels"]
        and node["metadata"]["labels"]["keep"] == "me"
    )
    assert node["metadata"]["annotations"] == {"a": "b"}


def test_node_taints_patch_replaces_the_whole_list(kube: FakeKube, core: client.CoreV1Api) -> None:
    kube.add_node(
        "node-a",
        taints=[
            {"key": "weightcache.io/not-ready", "effect": "NoSchedule"},
            {"key": "gpu", "value": "true", "effect": "NoSchedule"},
        ],
    )
    core.patch_node("node-a", {"spec": {"taints": [{"key": "gpu", "value": "true", "effect": "NoSchedule"}]}})
    assert kube.get_node("node-a")["spec"]["taints"] == [
        {"key": "gpu", "value": "true", "effect": "NoSchedule"}
    ]


def test_an_invalid_taint_is_422(kube: FakeKube, core: client.CoreV1Api) -> None:
    kube.add_node("node-a")
    with pytest.raises(ApiException) as raised:
        core.patch_node("node-a", {"spec": {"taints": [{"key": "k", "effect": "Sometimes"}]}})
    assert raised.value.status == 422


def test_a_missing_pod_is_a_404_status(core: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as raised:
        core.read_namespaced_pod("nope", NS)
    assert raised.value.status == 404
    assert json.loads(raised.value.body) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pods "nope" not found',
        "reason": "NotFound",
        "details": {"name": "nope", "kind": "pods"},
        "code": 404,
    }


def test_an_unknown_path_is_a_404_status(kube: FakeKube) -> None:
    request = urllib.request.Request(kube.url + "/api/v1/configmaps", headers=kube.auth_headers)
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request)
    assert raised.value.code == 404 and json.loads(raised.value.read())["reason"] == "NotFound"


def test_a_wrong_token_is_401(kube: FakeKube) -> None:
    request = urllib.request.Request(kube.url + "/api/v1/pods", headers={"Authorization": "Bearer wrong"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request)
    assert raised.value.code == 401


def test_field_selector_filters_pods_by_node(kube: FakeKube, core: client.CoreV1Api) -> None:
    kube.add_pod(_pod("a", node="node-a"))
    kube.add_pod(_pod("b", node="node-b"))
    pods = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-a")
    assert [p.metadata.name for p in pods.items] == ["a"]
    with pytest.raises(ApiException) as raised:
        core.list_pod_for_all_namespaces(field_selector="spec.bogus=x")
    assert raised.value.status == 400


def test_label_selector_supports_equality_and_sets(kube: FakeKube, core: client.CoreV1Api) -> None:
    kube.add_pod(_pod("a", app="x", tier="gpu"))
    kube.add_pod(_pod("b", app="y"))
    assert [p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="app=x").items] == ["a"]
    assert [
        p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="app in (x,y),!tier").items
    ] == ["b"]


def test_a_pod_leaving_the_watched_node_is_seen_as_deleted(kube: FakeKube, core: client.CoreV1Api) -> None:
    kube.add_pod(_pod("a", node="node-a"))
    rv = kube.resource_version
    kube.update_pod(NS, "a", lambda pod: pod["spec"].update(nodeName="node-b"))
    events = list(
        watch.Watch().stream(
            core.list_pod_for_all_namespaces,
            field_selector="spec.nodeName=node-a",
            resource_version=rv,
            timeout_seconds=1,
        )
    )
    assert [(e["type"], e["object"].spec.node_name) for e in events] == [("DELETED", "node-b")]


def test_pagination_returns_a_consistent_snapshot(kube: FakeKube, core: client.CoreV1Api) -> None:
    for name in ("a", "b", "c"):
        kube.add_pod(_pod(name))
    first = core.list_namespaced_pod(NS, limit=2)
    assert [p.metadata.name for p in first.items] == ["a", "b"] and first.metadata.remaining_item_count == 1
    kube.delete_pod(NS, "c")
    rest = core.list_namespaced_pod(NS, limit=2, _continue=first.metadata._continue)
    assert [p.metadata.name for p in rest.items] == ["c"] and rest.metadata._continue is None


def test_core_event_create_then_patch_count(kube: FakeKube, core: client.CoreV1Api) -> None:
    pod = kube.add_pod(_pod("a"))
    body = {
        "metadata": {"name": "a.1", "namespace": NS},
        "involvedObject": {"kind": "Pod", "name": "a", "namespace": NS, "uid": pod["metadata"]["uid"]},
        "reason": "ModelFetching",
        "message": "fetching s3://m/x/",
        "type": "Normal",
        "count": 1,
        "source": {"component": "weightcache-agent"},
    }
    core.create_namespaced_event(NS, body)
    core.patch_namespaced_event("a.1", NS, {"count": 2, "message": "still fetching"})
    [event] = kube.events(NS, involved_name="a")
    assert (event["reason"], event["message"], event["type"], event["count"]) == (
        "ModelFetching",
        "still fetching",
        "Normal",
        2,
    )
    assert event["involvedObject"]["uid"] == pod["metadata"]["uid"]
    with pytest.raises(ApiException) as raised:
        core.create_namespaced_event(NS, body)
    assert raised.value.status == 409 and json.loads(raised.value.body)["reason"] == "AlreadyExists"


def test_a_core_event_in_another_namespace_than_its_object_is_invalid(core: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as raised:
        core.create_namespaced_event(
            NS,
            {
                "metadata": {"name": "x"},
                "reason": "R",
                "involvedObject": {"kind": "Pod", "name": "a", "namespace": "other"},
            },
        )
    assert raised.value.status == 422


def test_an_events_k8s_io_event_is_visible_through_the_core_api(
    kube: FakeKube, api_client: client.ApiClient, core: client.CoreV1Api
) -> None:
    events_api = client.EventsV1Api(api_client)
    events_api.create_namespaced_event(
        NS,
        {
            "metadata": {"name": "a.2"},
            "eventTime": micro_timestamp(),
            "reportingController": "weightcache.io/agent",
            "reportingInstance": "agent-node-a",
            "action": "Fetch",
            "reason": "ModelReady",
            "type": "Normal",
            "note": "ready",
            "regarding": {"kind": "Pod", "name": "a", "namespace": NS},
        },
    )
    events_api.patch_namespaced_event(
        "a.2", NS, {"series": {"count": 2, "lastObservedTime": micro_timestamp()}}
    )
    core_view = core.read_namespaced_event("a.2", NS)
    assert (core_view.message, core_view.reporting_component, core_view.involved_object.name) == (
        "ready",
        "weightcache.io/agent",
        "a",
    )
    [event] = kube.events(involved_name="a")
    assert FakeKube.event_count(event) == 2
    with pytest.raises(ApiException) as raised:  # events.k8s.io events are immutable but for series
        events_api.patch_namespaced_event("a.2", NS, {"note": "changed"})
    assert raised.value.status == 422


def test_an_events_k8s_io_event_without_reporting_fields_is_invalid(api_client: client.ApiClient) -> None:
    with pytest.raises(ApiException) as raised:
        client.EventsV1Api(api_client).create_namespaced_event(
            NS,
            {
                "metadata": {"name": "x"},
                "reason": "R",
                "type": "Normal",
                "regarding": {"name": "a", "namespace": NS},
            },
        )
    assert raised.value.status == 422


def test_injected_failures_answer_before_anything_else(kube: FakeKube, core: client.CoreV1Api) -> None:
    kube.fail_next(503, method="GET", path="/pods")
    with pytest.raises(ApiException) as raised:
        core.list_namespaced_pod(NS)
    assert raised.value.status == 503
    core.list_namespaced_pod(NS)  # only once
    assert [r.method for r in kube.request_log] == ["GET", "GET"]


def test_send_initial_events_ends_with_the_initial_events_end_bookmark(kube: FakeKube) -> None:
    kube.add_pod(_pod("a"))
    events = _raw_watch(
        kube,
        "/api/v1/pods?watch=1&sendInitialEvents=true&allowWatchBookmarks=true"
        "&resourceVersionMatch=NotOlderThan&timeoutSeconds=0.1",
    )
    assert [e["type"] for e in events[:2]] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_the_official_client_discovers_the_version(api_client: client.ApiClient) -> None:
    assert client.VersionApi(api_client).get_code().major == "1"
    started = time.monotonic()
    assert client.CoreApi(api_client).get_api_versions().versions == ["v1"]
    assert time.monotonic() - started < 5


def test_a_watch_whose_client_went_away_is_forgotten(kube: FakeKube) -> None:
    pool = urllib3.PoolManager()
    response = pool.request(
        "GET", kube.url + "/api/v1/pods?watch=true", headers=kube.auth_headers, preload_content=False
    )
    kube.wait_for_watches(1)
    response.close()  # closes the socket (release_conn first would only park it in the pool)
    response.release_conn()
    kube.wait_for(lambda: kube.watch_connections_open() == 0, timeout=3, what="the watch to be forgotten")


def test_stop_with_an_open_watch_is_prompt(kube: FakeKube, core: client.CoreV1Api) -> None:
    stream = core.list_namespaced_pod(NS, watch=True, _preload_content=False)
    kube.wait_for_watches(1)
    started = time.monotonic()
    kube.stop()
    assert time.monotonic() - started < 3
    stream.close()


def test_deleting_a_running_pod_through_the_api_only_marks_it_terminating(
    kube: FakeKube, core: client.CoreV1Api
) -> None:
    kube.add_pod(_pod("a"))
    core.delete_namespaced_pod("a", NS)
    assert kube.get_pod(NS, "a")["metadata"]["deletionGracePeriodSeconds"] == 30
    core.delete_namespaced_pod("a", NS, grace_period_seconds=0)
    with pytest.raises(KeyError):
        kube.get_pod(NS, "a")


def test_events_can_be_selected_by_involved_object(kube: FakeKube, core: client.CoreV1Api) -> None:
    for name, pod in (("e1", "a"), ("e2", "b")):
        core.create_namespaced_event(
            NS,
            {
                "metadata": {"name": name},
                "reason": "R",
                "type": "Normal",
                "involvedObject": {"kind": "Pod", "name": pod, "namespace": NS},
            },
        )
    selected = core.list_event_for_all_namespaces(
        field_selector="involvedObject.name=b,involvedObject.kind=Pod"
    )
    assert [e.metadata.name for e in selected.items] == ["e2"]


def test_strategic_merge_directives_delete_list_items_and_replace_maps() -> None:
    pod: dict[str, Any] = {
        "status": {"conditions": [{"type": "A", "status": "True"}, {"type": "B", "status": "True"}]},
        "metadata": {"labels": {"x": "1", "y": "2"}, "finalizers": ["f1"]},
    }
    patched = strategic_merge(
        pod,
        {
            "status": {"conditions": [{"type": "A", "$patch": "delete"}]},
            "metadata": {"labels": {"$patch": "replace", "z": "3"}, "finalizers": ["f2"]},
        },
        POD_PATCH_SCHEMA,
    )
    assert patched["status"]["conditions"] == [{"type": "B", "status": "True"}]
    assert patched["metadata"] == {"labels": {"z": "3"}, "finalizers": ["f1", "f2"]}
    assert pod["metadata"]["labels"] == {"x": "1", "y": "2"}  # inputs are never mutated
