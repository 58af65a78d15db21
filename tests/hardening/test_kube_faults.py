"""Area 8 — the Kubernetes API misbehaving: watches dropped mid-stream, 410 Gone storms (history compacted under
the watch, LISTs failing), the API server down for a while as pods come and go, watches that go silent, and the
node object failing, conflicting and changing under the startup-taint removal. Every pod still gets its model and
its Events, the watch reconnects with bounded backoff (resuming, not relisting, after a silence), the reconnects
show in the metrics, and the startup taint goes — alone — however the node API behaves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.agent.daemon_helpers import NODE, pod_manifest
from tests.fixtures.fakekube import FakeKube
from tests.fixtures.s3servers import S3Server
from tests.hardening import scenarios
from tests.hardening.support import Agent, KiB, agent_env, check, make_files, mirrored, upload, wait_until


def test_watch_drops_410_storms_and_a_short_outage_lose_no_pod(moto_s3: S3Server, moto_bucket: str,
                                                              work: Path) -> None:
    figures = scenarios.kube_faults(moto_s3, moto_bucket, work=work, drops=4, storms=3, outage_seconds=3.0)
    assert figures["missed"] == 0 and figures["pods_added_during_outage"] >= 1, figures
    assert figures["reconnects_metric"] >= 4 + 3, figures


@pytest.mark.soak
def test_the_api_server_down_for_a_minute_loses_no_pod(moto_s3: S3Server, moto_bucket: str, work: Path) -> None:
    figures = scenarios.kube_faults(moto_s3, moto_bucket, work=work, drops=20, storms=10, outage_seconds=60.0,
                                    seed=60)
    assert figures["missed"] == 0 and figures["reconnect_after_outage_seconds"] < 10, figures


# ----- the node API against the startup taint, and a silent watch ---------------------------------------------------

JSON_PATCH = "application/json-patch+json"  # only the taint removal sends these; label updates merge-patch
STARTUP = {"key": "weightcache.io/warming", "effect": "NoSchedule"}
GPU = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
AUTOSCALER = {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}


def _metric(agent: Agent, name: str, **labels: str) -> float:
    return agent.metrics().get((name, frozenset(labels.items())), 0.0)


def test_the_startup_taint_goes_through_a_hostile_node_api_and_a_silent_watch_loses_nothing(
        moto_s3: S3Server, moto_bucket: str, work: Path) -> None:
    """Node reads failing at start, taint writes failing and conflicting, the cluster-autoscaler tainting the node
    between the agent's read and its write, then a pod watch that goes silent: the taint goes, only it, after the
    warm set is ready; every other taint survives; the watch resumes from its version without a relist."""
    upload(moto_s3, moto_bucket, "warm/m/", make_files(71, {"w.bin": 200 * KiB}))
    uri = f"s3://{moto_bucket}/warm/m/"
    policy = work / "policy.yaml"
    policy.write_text(f"allow: [s3://{moto_bucket}/]\nwarm:\n"
                      f"  - nodeSelector: {{node.kubernetes.io/instance-type: p5.48xlarge}}\n"
                      f"    models: [{uri}]\n")
    kube = FakeKube(bookmark_interval=0.3).start()
    agent = None
    node = f"^/api/v1/nodes/{NODE}$"
    try:
        kube.add_node(NODE, labels={"node.kubernetes.io/instance-type": "p5.48xlarge"}, taints=[STARTUP, GPU])
        kube.fail_next(503, method="GET", path=node, times=6)
        kube.fail_next(500, method="PATCH", path=node, content_type=JSON_PATCH, times=3)
        kube.fail_next(409, method="PATCH", path=node, content_type=JSON_PATCH, times=2)
        # Runs before the first taint write that gets through the failures above: that write is then stale.
        kube.before_next(lambda: kube.update_node(NODE, lambda n: n["spec"]["taints"].append(dict(AUTOSCALER))),
                         method="PATCH", path=node, content_type=JSON_PATCH)
        env = agent_env(root=work / "cache-taint", s3=moto_s3, kubeconfig=kube.write_kubeconfig(work / "kubeconfig"),
                        NODE_NAME=NODE, WEIGHTCACHE_POLICY_FILE=str(policy), WEIGHTCACHE_RECONNECT_MAX_DELAY="0.5",
                        WEIGHTCACHE_WATCH_INACTIVITY_TIMEOUT="2")
        agent = Agent(env=env, log_path=work / "taint-agent.log").start().wait_ready()

        def taints() -> list[dict[str, str]]:
            return list(kube.get_node(NODE)["spec"].get("taints") or [])

        wait_until(lambda: STARTUP not in taints(), timeout=60, what="the startup taint removed", log=agent.log)
        check(taints() == [GPU, AUTOSCALER], f"other taints must survive untouched: {taints()}")
        check(os.path.isdir(mirrored(agent.root, uri)), "the taint went before the warm set was ready")
        check(any(e["reason"] == "WarmSetUnresolved" and e["type"] == "Warning" for e in kube.events(
            involved_name=NODE)), "no Warning Event while the node could not be read")
        check(_metric(agent, "weightcache_node_api_errors_total", op="read") >= 6, "node read failures not counted")
        check(_metric(agent, "weightcache_node_api_errors_total", op="conflict") >= 3,
              "the 409s and the failed test op are conflicts")
        check(_metric(agent, "weightcache_warm_set_unresolved") == 0, "the warm set was resolved in the end")

        lists = sum(1 for r in kube.request_log if r.path == "/api/v1/pods" and "watch" not in r.query)
        kube.wait_for_watches(1, timeout=30)
        check(kube.silence_watches() >= 1, "no watch to silence")
        kube.add_pod(pod_manifest("during-silence", uri))
        wait_until(lambda: any(e["reason"] == "WeightsReady" for e in kube.events(involved_name="during-silence")),
                   timeout=30, what="WeightsReady for a pod added while the watch was silent", log=agent.log)
        check(_metric(agent, "weightcache_watch_reconnects_total", reason="inactive") >= 1,
              "the silent watch was not noticed")
        check(_metric(agent, "weightcache_watch_reconnects_total", reason="error") == 0,
              "a silent watch is not an error")
        check(sum(1 for r in kube.request_log if r.path == "/api/v1/pods" and "watch" not in r.query) == lists,
              "a silent watch is resumed, not relisted")
    finally:
        if agent is not None:
            agent.stop()
        kube.stop()
