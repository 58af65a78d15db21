"""The main job end to end against a Kubernetes API: ``weightcache-agent run`` (NODE_NAME + KUBECONFIG) watching
a fake API server, fetching from a real S3 server, and telling the cluster how it went.

What a user of a real cluster sees is checked here through that API: Events on the pod (what ``kubectl describe
pod`` prints), the pod's readiness-gate condition, and the node label the scheduler can select on. A real
``weightcache-server`` waits for the model under the agent's cache root and answers. A second pod for the same
model is a hit. Then SIGTERM, and nothing may be left running.

The scenario runs once (module fixture ``flow``) and records what it saw; each test checks one behaviour of it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.helpers import (
    GATE,
    START_TIMEOUT,
    Children,
    DemoModel,
    agent_argv,
    hits_and_misses,
    http,
    pod_manifest,
    python_module,
    server_env,
    status_of,
    wait_until,
)
from tests.fixtures.fakekube import FakeKube
from tests.fixtures.s3servers import S3Server, free_port

pytestmark = pytest.mark.timeout(180)

NAMESPACE = "inference"
NODE = "gpu-node-1"


@dataclass
class KubeFlow:
    model: DemoModel
    label: str
    pods: dict[str, dict[str, Any]]
    events: dict[str, list[dict[str, Any]]]
    node_labels: dict[str, str]
    after_first_pod: tuple[int, int]
    after_second_pod: tuple[int, int]
    predict_status: int
    predict_body: Any
    exit_codes: dict[str, int | None]
    stop_seconds: float
    leftovers: list[str]


def _condition(pod: dict[str, Any]) -> dict[str, Any] | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == GATE:
            return dict(c)
    return None


def _gate_is_true(kube: FakeKube, name: str) -> bool:
    cond = _condition(kube.get_pod(NAMESPACE, name))
    return cond is not None and cond.get("status") == "True"


def _label_for(uri: str) -> str:
    out = subprocess.run(python_module("agent", "label-for", uri), check=True, capture_output=True, text=True,
                         timeout=30)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def flow(demo_model: DemoModel, rclone_s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeFlow]:
    work = tmp_path_factory.mktemp("kube-flow")
    procs = Children(work)
    kube = FakeKube().start()
    try:
        kube.add_node(NODE, labels={"node.kubernetes.io/instance-type": "p5.48xlarge"})
        kubeconfig = kube.write_kubeconfig(work / "kubeconfig")
        label = _label_for(demo_model.uri)
        cache = work / "cache"
        agent_port = free_port()
        agent = f"http://127.0.0.1:{agent_port}"
        procs.start("agent", agent_argv(cache_dir=cache, port=agent_port),
                    procs.env({**rclone_s3.env(), "NODE_NAME": NODE, "KUBECONFIG": str(kubeconfig)}))
        wait_until(lambda: status_of(f"{agent}/readyz") == 200, timeout=START_TIMEOUT,
                   what="the agent's /readyz (initial pod list)", children=procs)
        kube.wait_for_watches(1, timeout=START_TIMEOUT)

        port = free_port()
        server = f"http://127.0.0.1:{port}"
        procs.start("server", python_module("server"), server_env(procs, cache_dir=cache, uri=demo_model.uri,
                                                                   port=port))
        kube.add_pod(pod_manifest("infer-1", namespace=NAMESPACE, node=NODE, uri=demo_model.uri))
        wait_until(lambda: _gate_is_true(kube, "infer-1"), what="pod 1's weights-ready condition", children=procs)
        key = label.split("=", 1)[0]
        wait_until(lambda: key in (kube.get_node(NODE)["metadata"].get("labels") or {}),
                   what=f"the node label {label}", children=procs)
        wait_until(lambda: status_of(f"{server}/readyz") == 200, timeout=START_TIMEOUT,
                   what="the server to become ready", children=procs)
        rows = [[1.0] * demo_model.input_dim]
        predict_status, predict_body = http(f"{server}/v1/predict", {"inputs": rows})
        after_first = hits_and_misses(agent)

        kube.add_pod(pod_manifest("infer-2", namespace=NAMESPACE, node=NODE, uri=demo_model.uri))
        wait_until(lambda: _gate_is_true(kube, "infer-2"), what="pod 2's weights-ready condition", children=procs)
        wait_until(lambda: any(e["reason"] == "WeightsReady" for e in kube.events(NAMESPACE, "infer-2")),
                   what="pod 2's WeightsReady event", children=procs)
        after_second = hits_and_misses(agent)

        pods = {n: kube.get_pod(NAMESPACE, n) for n in ("infer-1", "infer-2")}
        events = {n: kube.events(NAMESPACE, n) for n in ("infer-1", "infer-2")}
        node_labels = dict(kube.get_node(NODE)["metadata"].get("labels") or {})

        t = time.monotonic()
        codes = procs.stop()
        stop_seconds = time.monotonic() - t
        leftovers = procs.leftovers()
        yield KubeFlow(
            model=demo_model, label=label, pods=pods, events=events, node_labels=node_labels,
            after_first_pod=after_first, after_second_pod=after_second, predict_status=predict_status,
            predict_body=predict_body, exit_codes=codes, stop_seconds=stop_seconds, leftovers=leftovers)
    finally:
        procs.kill_all()
        kube.stop()


def test_the_missing_pod_gets_fetching_and_ready_events(flow: KubeFlow) -> None:
    reasons = [e["reason"] for e in flow.events["infer-1"]]
    assert "WeightsFetching" in reasons and "WeightsReady" in reasons
    assert reasons.index("WeightsFetching") < reasons.index("WeightsReady")
    ready = next(e for e in flow.events["infer-1"] if e["reason"] == "WeightsReady")
    assert ready["type"] == "Normal"
    assert flow.model.uri in ready["message"] and "cache miss" in ready["message"]


def test_events_are_attached_to_the_pod_that_asked(flow: KubeFlow) -> None:
    for name in ("infer-1", "infer-2"):
        uid = flow.pods[name]["metadata"]["uid"]
        assert flow.events[name]
        assert all(e["involvedObject"]["kind"] == "Pod" and e["involvedObject"]["uid"] == uid
                   for e in flow.events[name])


def test_the_second_pod_gets_a_ready_event_from_the_cache(flow: KubeFlow) -> None:
    reasons = [e["reason"] for e in flow.events["infer-2"]]
    assert "WeightsReady" in reasons and "WeightsFetching" not in reasons
    ready = next(e for e in flow.events["infer-2"] if e["reason"] == "WeightsReady")
    assert "cache hit" in ready["message"]


def test_each_pods_readiness_gate_condition_turns_true(flow: KubeFlow) -> None:
    for name in ("infer-1", "infer-2"):
        cond = _condition(flow.pods[name])
        assert cond is not None and cond["status"] == "True", flow.pods[name].get("status")


def test_the_node_is_labelled_with_the_ready_model(flow: KubeFlow) -> None:
    key, value = flow.label.split("=", 1)
    assert key.startswith("models.weightcache.io/")
    assert flow.node_labels.get(key) == value == "ready"


def test_hits_and_misses_are_counted_per_pod_demand(flow: KubeFlow) -> None:
    assert flow.after_first_pod == (0, 1)
    assert flow.after_second_pod == (1, 1)


def test_the_server_answers_with_the_models_output_dim(flow: KubeFlow) -> None:
    assert flow.predict_status == 200, flow.predict_body
    assert [len(row) for row in flow.predict_body["outputs"]] == [flow.model.output_dim]


def test_agent_and_server_exit_zero_within_seconds_of_sigterm(flow: KubeFlow) -> None:
    assert flow.exit_codes == {"agent": 0, "server": 0}
    assert flow.stop_seconds < 10


def test_no_process_is_left_running(flow: KubeFlow) -> None:
    assert flow.leftovers == []
