"""The main job end to end, without Kubernetes: ``weightcache-agent run --pods-file`` + ``weightcache-server``.

A real S3 server (rclone) holds a small sharded demo model. The agent watches a pods file; a server waits for the
model under the agent's cache root. Pod 1 asks for the model (a miss: fetched from S3), the waiting server loads it
and answers; pod 2 asks for the same model (a hit) and a second server starts without waiting. Then everything gets
SIGTERM, as the kubelet would send, and must exit 0 promptly, leaving no process behind.

The scenario runs once (module fixture ``flow``) and records what it saw; each test checks one behaviour of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.helpers import (
    START_TIMEOUT,
    Children,
    DemoModel,
    agent_argv,
    event_lines,
    hits_and_misses,
    http,
    metric,
    pod_manifest,
    python_module,
    server_env,
    status_of,
    wait_until,
    write_atomically,
)
from tests.fixtures.s3servers import S3Server, free_port

pytestmark = pytest.mark.timeout(180)

NAMESPACE = "inference"
NODE = "demo-node"
#: A hit must not make the server wait: anything above this means it polled or waited for something.
HIT_WAIT_BUDGET_S = 0.5


@dataclass
class PodsFileFlow:
    model: DemoModel
    cache_dir: Path
    readyz_while_waiting: int
    predict_status: int
    predict_body: Any
    after_first_pod: tuple[int, int]
    after_second_pod: tuple[int, int]
    wait_phase_server_1: float
    wait_phase_server_2: float
    events: list[dict[str, Any]]
    exit_codes: dict[str, int | None]
    stop_seconds: float
    leftovers: list[str]


def _pods_yaml(model: DemoModel, *names: str) -> str:
    return yaml.safe_dump_all([pod_manifest(n, namespace=NAMESPACE, node=NODE, uri=model.uri) for n in names])


@pytest.fixture(scope="module")
def flow(demo_model: DemoModel, rclone_s3: S3Server, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[PodsFileFlow]:
    work = tmp_path_factory.mktemp("pods-file-flow")
    procs = Children(work)
    cache, pods = work / "cache", work / "pods.yaml"
    pods.write_text("")
    try:
        agent_port = free_port()
        agent = f"http://127.0.0.1:{agent_port}"
        procs.start("agent", agent_argv(cache_dir=cache, port=agent_port, pods_file=pods), procs.env(rclone_s3.env()))
        wait_until(lambda: status_of(f"{agent}/readyz") == 200, timeout=START_TIMEOUT, what="the agent's /readyz",
                   children=procs)

        # Server 1 starts before any pod asks for the model, so it must be up and waiting, not ready.
        port1 = free_port()
        server1 = f"http://127.0.0.1:{port1}"
        procs.start("server-1", python_module("server"), server_env(procs, cache_dir=cache, uri=demo_model.uri,
                                                                     port=port1))
        wait_until(lambda: status_of(f"{server1}/healthz") == 200, timeout=START_TIMEOUT,
                   what="server 1's /healthz", children=procs)
        readyz_while_waiting = status_of(f"{server1}/readyz")

        write_atomically(pods, _pods_yaml(demo_model, "infer-1"))
        wait_until(lambda: status_of(f"{server1}/readyz") == 200, timeout=START_TIMEOUT,
                   what="server 1 to load the model and become ready", children=procs)
        rows = [[0.5] * demo_model.input_dim, [-0.25] * demo_model.input_dim]
        predict_status, predict_body = http(f"{server1}/v1/predict", {"inputs": rows})
        after_first = hits_and_misses(agent)

        write_atomically(pods, _pods_yaml(demo_model, "infer-1", "infer-2"))
        wait_until(lambda: hits_and_misses(agent)[0] >= 1, what="the agent to count pod 2's demand", children=procs)
        after_second = hits_and_misses(agent)
        wait_until(lambda: any(e["event"] == "WeightsReady" and e["pod"] == f"{NAMESPACE}/infer-2"
                               for e in event_lines(procs.children[0].log_text())),
                   what="the WeightsReady event for pod 2", children=procs)

        port2 = free_port()
        server2 = f"http://127.0.0.1:{port2}"
        procs.start("server-2", python_module("server"), server_env(procs, cache_dir=cache, uri=demo_model.uri,
                                                                     port=port2))
        wait_until(lambda: status_of(f"{server2}/readyz") == 200, timeout=START_TIMEOUT,
                   what="server 2 to become ready", children=procs)
        phase = "weightcache_server_cold_start_seconds"
        wait1, wait2 = metric(server1, phase, phase="wait"), metric(server2, phase, phase="wait")
        events = event_lines(procs.children[0].log_text())

        t = time.monotonic()
        codes = procs.stop()
        stop_seconds = time.monotonic() - t
        leftovers = procs.leftovers()
        yield PodsFileFlow(
            model=demo_model, cache_dir=cache, readyz_while_waiting=readyz_while_waiting,
            predict_status=predict_status, predict_body=predict_body, after_first_pod=after_first,
            after_second_pod=after_second, wait_phase_server_1=wait1, wait_phase_server_2=wait2, events=events,
            exit_codes=codes, stop_seconds=stop_seconds, leftovers=leftovers)
    finally:
        procs.kill_all()


def test_a_server_started_before_any_pod_asks_waits_and_is_not_ready(flow: PodsFileFlow) -> None:
    assert flow.readyz_while_waiting == 503


def test_the_first_pod_for_a_model_is_counted_as_a_miss(flow: PodsFileFlow) -> None:
    assert flow.after_first_pod == (0, 1)


def test_the_model_appears_at_its_mirrored_path_under_the_cache_root(flow: PodsFileFlow) -> None:
    bucket_and_prefix = flow.model.uri.removeprefix("s3://").rstrip("/")
    published = flow.cache_dir / "models" / "s3" / bucket_and_prefix
    assert published.is_dir()
    names = {p.name for p in published.iterdir()}
    assert "config.json" in names and "model.safetensors.index.json" in names
    assert len(names) == flow.model.files


def test_the_waiting_server_serves_predictions_of_the_models_output_dim(flow: PodsFileFlow) -> None:
    assert flow.predict_status == 200, flow.predict_body
    outputs = flow.predict_body["outputs"]
    assert len(outputs) == 2
    assert all(len(row) == flow.model.output_dim for row in outputs)
    assert all(math.isfinite(x) for row in outputs for x in row)


def test_a_second_pod_for_the_same_model_is_counted_as_a_hit(flow: PodsFileFlow) -> None:
    assert flow.after_second_pod == (1, 1)


def test_the_first_server_waited_for_the_agent(flow: PodsFileFlow) -> None:
    assert flow.wait_phase_server_1 > 0


def test_a_server_started_on_a_cache_hit_does_not_wait(flow: PodsFileFlow) -> None:
    assert flow.wait_phase_server_2 < HIT_WAIT_BUDGET_S


def test_the_agent_reports_fetching_then_ready_for_the_missing_pod(flow: PodsFileFlow) -> None:
    reasons = [e["event"] for e in flow.events if e["pod"] == f"{NAMESPACE}/infer-1"]
    assert "WeightsFetching" in reasons and "WeightsReady" in reasons
    assert reasons.index("WeightsFetching") < reasons.index("WeightsReady")
    ready = next(e for e in flow.events if e["pod"] == f"{NAMESPACE}/infer-1" and e["event"] == "WeightsReady")
    assert flow.model.uri in ready["msg"] and "cache miss" in ready["msg"]


def test_the_agent_reports_ready_from_the_cache_for_the_second_pod(flow: PodsFileFlow) -> None:
    mine = [e for e in flow.events if e["pod"] == f"{NAMESPACE}/infer-2"]
    reasons = [e["event"] for e in mine]
    assert "WeightsReady" in reasons and "WeightsFetching" not in reasons
    assert "cache hit" in mine[reasons.index("WeightsReady")]["msg"]


def test_every_process_exits_zero_within_seconds_of_sigterm(flow: PodsFileFlow) -> None:
    assert flow.exit_codes == {"agent": 0, "server-1": 0, "server-2": 0}
    assert flow.stop_seconds < 10


def test_no_process_is_left_running(flow: PodsFileFlow) -> None:
    assert flow.leftovers == []
