"""Peer exchange through the daemon: two ``python -m agent run`` processes (two "nodes" of one fake cluster, each
its own root, metrics port and peer port) — the second gets a model the first holds from it, and says so in its
metrics and in the pod's Event. And peer discovery from Kubernetes: the agent's own pods in its namespace.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest

from agent.cluster.kube import KubeApi
from agent.config import load_settings
from agent.transfer.peerclient import Membership
from agent.transfer.peerwire import PeerAddress
from tests.agent.daemon_helpers import (  # noqa: F401 - fixtures by name
    AgentProcess,
    agent_environment,
    agents,
    events_for,
    kube,
    models_bucket,
    pod_manifest,
    start_agent,
    wait_until,
)
from tests.fixtures.fakekube import FakeKube
from tests.fixtures.s3servers import S3Server, free_port

MiB = 1024 * 1024
AGENT_LABELS = {"app.kubernetes.io/name": "weightcache-agent"}


def test_a_node_gets_a_model_another_node_holds_from_it(
        kube: FakeKube, moto_s3: S3Server, models_bucket: str, tmp_path: Path,  # noqa: F811
        agents: list[AgentProcess]) -> None:  # noqa: F811
    weights = os.urandom(3 * MiB + 17)
    moto_s3.put(models_bucket, "m/weights.bin", weights)
    moto_s3.put(models_bucket, "m/config.json", b'{"layers": 2}')
    uri = f"s3://{models_bucket}/m/"
    kube.add_node("node-b")
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    ports = [free_port(), free_port()]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    nodes = []
    for i, name in enumerate(("node-a", "node-b")):
        env = agent_environment(s3=moto_s3, root=tmp_path / f"root-{name}", kubeconfig=kubeconfig,
                                NODE_NAME=name, WEIGHTCACHE_PEER_TOKEN_FILE=str(token),
                                WEIGHTCACHE_PEER_HOST="127.0.0.1", WEIGHTCACHE_PEER_PORT=str(ports[i]),
                                WEIGHTCACHE_PEERS=peers, WEIGHTCACHE_PEER_ADDRESS=f"127.0.0.1:{ports[i]}")
        nodes.append(start_agent(agents, env, tmp_path / f"{name}.log"))
    a, b = nodes
    assert "peer exchange on 127.0.0.1" in a.log_text()

    kube.add_pod(pod_manifest("p1", uri, node="node-a"))
    wait_until(lambda: events_for(kube, "p1", "WeightsReady"), what="p1's model on node-a", agent=a)
    kube.add_pod(pod_manifest("p2", uri, node="node-b"))
    ready = wait_until(lambda: events_for(kube, "p2", "WeightsReady"), what="p2's model on node-b", agent=b)[0]

    size = len(weights) + len(b'{"layers": 2}')
    assert b.metric("weightcache_fetch_bytes_total", source="peer") == size
    assert b.metric("weightcache_fetch_bytes_total", source="s3") == 0
    assert a.metric("weightcache_peer_served_bytes_total") == size
    assert "3.00 MiB from peers" in ready["message"], ready["message"]
    assert (b.root / "models" / "s3" / models_bucket / "m" / "weights.bin").read_bytes() == weights


def test_without_a_token_the_daemon_runs_with_peer_exchange_off(
        kube: FakeKube, moto_s3: S3Server, tmp_path: Path, agents: list[AgentProcess]) -> None:  # noqa: F811
    env = agent_environment(s3=moto_s3, root=tmp_path / "root", kubeconfig=kube.write_kubeconfig(tmp_path / "kc"))
    agent = start_agent(agents, env, tmp_path / "agent.log")
    assert "peer exchange off: no WEIGHTCACHE_PEER_TOKEN_FILE" in agent.log_text()


async def test_peers_are_the_agents_running_pods_in_its_namespace(
        kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    def agent_pod(name: str, ip: str, *, namespace: str = "weightcache-system", phase: str = "Running",
                  labels: dict[str, str] = AGENT_LABELS) -> None:
        kube.add_pod({"metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
                      "spec": {"nodeName": "node-a", "containers": [{"name": "agent", "image": "a"}]},
                      "status": {"phase": phase, "podIP": ip}})

    agent_pod("agent-self", "10.0.0.1")
    agent_pod("agent-b", "10.0.0.2")
    agent_pod("agent-c", "10.0.0.3")
    agent_pod("agent-starting", "10.0.0.4", phase="Pending")
    agent_pod("agent-elsewhere", "10.0.0.5", namespace="default")
    agent_pod("not-an-agent", "10.0.0.6", labels={"app": "infer"})
    monkeypatch.setenv("KUBECONFIG", str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
    settings = load_settings(env={}, cache_dir=tmp_path / "root", node_name="node-a", pod_ip="10.0.0.1",
                             pod_namespace="weightcache-system")
    api = KubeApi(settings)
    membership = Membership(settings)

    async def list_pods() -> list[str]:
        return await asyncio.to_thread(api.list_agent_pod_ips, settings.pod_namespace, settings.peer_selector)

    task = asyncio.create_task(membership.follow_pods(list_pods))
    try:
        for _ in range(200):
            if membership.peers():
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
    assert membership.peers() == [PeerAddress("10.0.0.2", 9401), PeerAddress("10.0.0.3", 9401)]
    names, me = membership.ranking()
    assert names[me] == "10.0.0.1:9401" and len(names) == 3
