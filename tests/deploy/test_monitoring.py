"""The dashboard and the alert rules: their shape offline, then every query against a real Prometheus.

The slow test runs the real agent (`weightcache-agent run --pods-file`) against a real S3 server (moto) and the
real inference server on a tiny demo model, has Debian's Prometheus scrape both with the relabelling the
PodMonitors declare and load the alert rules, and then evaluates every dashboard query and every alert through
the HTTP API: no query may error, and every dashboard query and alert signal must return data.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .processes import PrometheusAPI, Running, free_port, http_get, http_ok, http_post_json, spawn, wait_for
from .promql import (
    alert_signal,
    dashboard_queries,
    metric_names,
    rule_queries,
    substitute_grafana_variables,
)
from .rendered import DASHBOARD_FILE, Obj, dashboard, find
from .tools import REPO_ROOT, prometheus_binaries

# Metrics the issue asks the dashboard to show; the first must be the first panel.
DASHBOARD_MUST_SHOW = (
    "weightcache_cache_requests_total",
    "weightcache_fetch_bytes_total",
    "weightcache_fetch_duration_seconds",
    "weightcache_cache_bytes_used",
    "weightcache_cache_bytes_capacity",
    "weightcache_evictions_total",
    "weightcache_evicted_bytes_total",
    # Issue 13 (peers): what peers save, what they serve, how they fail.
    "weightcache_peer_served_bytes_total",
    "weightcache_peer_errors_total",
)
ALERTS = {"WeightcacheAgentDown", "WeightcacheFetchFailures", "WeightcacheCacheNearlyFull",
          "WeightcacheHitRateLow", "WeightcacheColdStartSlow", "WeightcachePeerErrors"}
PEER_SAVINGS_PANEL = "S3 egress saved by peers"
# `sum` or `sum by (...)` directly around rate/increase of the fetch-bytes counter; group 1 is the `by` list.
_SUMMED_FETCH_BYTES = re.compile(
    r"sum\s*(?:by\s*\(([^)]*)\)\s*)?\(\s*(?:rate|increase)\(\s*weightcache_fetch_bytes_total\{([^}]*)\}")


def _prometheus_rule(monitoring: list[Obj]) -> Obj:
    return find(monitoring, "PrometheusRule", "weightcache")


def _panels_in_reading_order() -> list[dict[str, Any]]:
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    return sorted(panels, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))


def _exported_metric_names() -> set[str]:
    """Every series family name the agent and the server export, as PromQL sees them (`_total` on counters)."""
    agent_metrics = pytest.importorskip("agent.metrics")
    server_metrics = pytest.importorskip("server.metrics")
    names: set[str] = set()
    for registry in (agent_metrics.REGISTRY, server_metrics.ServerMetrics().registry):
        for family in registry.collect():
            names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


# --- offline ------------------------------------------------------------------------------------------------


def test_dashboard_configmap_is_the_json_file_with_the_grafana_label(base: list[Obj]) -> None:
    configmap = find(base, "ConfigMap", "weightcache-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"] == {DASHBOARD_FILE.name: DASHBOARD_FILE.read_text()}


def test_dashboard_shows_the_cache_hit_rate_first() -> None:
    first = _panels_in_reading_order()[0]
    assert "hit rate" in first["title"].lower()
    assert all('result="hit"' in t["expr"] for t in first["targets"])


def test_dashboard_shows_fetches_fill_and_evictions_per_node() -> None:
    queries = dashboard_queries(dashboard())
    shown = set().union(*(metric_names(q.expr) for q in queries))
    assert set(DASHBOARD_MUST_SHOW) <= shown
    quantiles = {q.expr.split(",")[0] for q in queries if "weightcache_fetch_duration_seconds_bucket" in q.expr}
    assert quantiles == {"histogram_quantile(0.5", "histogram_quantile(0.95"}
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert "node" in variables and variables["node"]["includeAll"]
    per_node = [q for q in queries if "weightcache_" in q.expr and "up{" not in q.expr]
    assert all('node=~"$node"' in q.expr for q in per_node), [q.source for q in per_node]


def _panel(title: str) -> dict[str, Any]:
    return next(p for p in dashboard()["panels"] if p["title"] == title)


def test_dashboard_shows_the_s3_egress_that_peers_save() -> None:
    panel = _panel(PEER_SAVINGS_PANEL)
    ratio, saved = panel["targets"]
    # The share: bytes from peers over bytes from every source, over the dashboard's range.
    numerator, _, denominator = ratio["expr"].rpartition(" / ")
    assert 'weightcache_fetch_bytes_total{source="peer"' in numerator and "[$__range]" in numerator
    assert "weightcache_fetch_bytes_total{" in denominator and "source" not in denominator
    assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"
    # The bytes themselves, in bytes.
    assert 'weightcache_fetch_bytes_total{source="peer"' in saved["expr"] and " / " not in saved["expr"]
    units = {o["matcher"]["options"]: p["value"] for o in panel["fieldConfig"]["overrides"]
             if o["matcher"]["id"] == "byFrameRefID" for p in o["properties"] if p["id"] == "unit"}
    assert units == {saved["refId"]: "bytes"}


def test_dashboard_shows_peer_errors_by_reason_and_bytes_served() -> None:
    targets = [t for p in dashboard()["panels"] for t in p.get("targets", [])]
    errors = [t for t in targets if "weightcache_peer_errors_total" in t["expr"]]
    assert errors and all("{{reason}}" in t["legendFormat"] for t in errors)
    assert all(re.search(r"sum by \([^)]*\breason\b", t["expr"]) for t in errors)
    assert any("weightcache_peer_served_bytes_total" in t["expr"] for t in targets)


def test_fetch_bytes_are_summed_over_their_source_or_split_by_it(monitoring: list[Obj]) -> None:
    # weightcache_fetch_bytes_total has a series per source (s3, peer): a query that neither sums over the
    # label nor names a source would draw two lines where one total was meant.
    exprs = [(q.source, q.expr, "") for q in rule_queries(_prometheus_rule(monitoring))]
    exprs += [(f"panel {p['title']!r}", t["expr"], t.get("legendFormat", ""))
              for p in dashboard()["panels"] for t in p.get("targets", [])]
    reading = [(where, expr, legend) for where, expr, legend in exprs if "weightcache_fetch_bytes_total" in expr]
    assert reading
    for where, expr, legend in reading:
        summed = _SUMMED_FETCH_BYTES.findall(expr)
        assert len(summed) == expr.count("weightcache_fetch_bytes_total"), f"{where}: {expr}"
        for by, matchers in summed:
            if "source" in by:
                assert "{{source}}" in legend, f"{where}: split by source without saying which"
            elif "source" not in matchers:
                # A total over every source: a title may not call it S3 alone.
                assert not ("S3" in where and "peer" not in where.lower()), f"{where} sums S3 and peer bytes"


def test_dashboard_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_the_dashboard_and_alerts_read_is_exported(monitoring: list[Obj]) -> None:
    exported = _exported_metric_names()
    queries = dashboard_queries(dashboard()) + rule_queries(_prometheus_rule(monitoring))
    for q in queries:
        missing = metric_names(q.expr) - exported
        assert not missing, f"{q.source} reads {sorted(missing)}, which neither the agent nor the server exports"


def test_alerts_cover_the_failure_modes_and_explain_themselves(monitoring: list[Obj]) -> None:
    rules = [r for g in _prometheus_rule(monitoring)["spec"]["groups"] for r in g["rules"]]
    assert ALERTS <= {r["alert"] for r in rules}
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert {"summary", "description"} <= rule["annotations"].keys()
        # Each alert is `signal OP threshold`, so the live test below can check that the signal has data.
        assert alert_signal(rule["expr"]) != rule["expr"].strip(), rule["alert"]


def _write_rules_file(monitoring: list[Obj], path: Path) -> Path:
    path.write_text(yaml.safe_dump({"groups": _prometheus_rule(monitoring)["spec"]["groups"]}, sort_keys=False))
    return path


def test_promtool_accepts_the_alert_rules(monitoring: list[Obj], tmp_path: Path) -> None:
    _, promtool = prometheus_binaries()
    rules = _write_rules_file(monitoring, tmp_path / "rules.yaml")
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_queries(_prometheus_rule(monitoring)))} rules found" in result.stdout


# --- live: a real Prometheus over a real agent and server -----------------------------------------------------


def _relabel_configs(endpoint: Obj) -> list[dict[str, Any]]:
    """A PodMonitor endpoint's relabelings in Prometheus' own spelling (what the operator generates)."""
    spelling = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{spelling.get(k, k): (v.lower() if k == "action" else v) for k, v in r.items()}
            for r in endpoint.get("relabelings", [])]


def _scrape_config(monitor: Obj, port: int, pod: str, node: str) -> dict[str, Any]:
    """Scrape one local process as if prometheus-operator had discovered it as a pod from `monitor`."""
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    namespace, name = monitor["metadata"]["namespace"], monitor["metadata"]["name"]
    return {
        # prometheus-operator sets the job label to <namespace>/<PodMonitor name>; the alerts select on it.
        "job_name": f"{namespace}/{name}",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "metrics_path": endpoint.get("path", "/metrics"),
        "static_configs": [{
            "targets": [f"127.0.0.1:{port}"],
            # What Kubernetes service discovery would attach; the PodMonitor's relabelings turn it into `node`.
            "labels": {"__meta_kubernetes_pod_node_name": node, "namespace": namespace, "pod": pod},
        }],
        "relabel_configs": _relabel_configs(endpoint),
    }


def _pods_yaml(pods: list[tuple[str, str]], node: str) -> str:
    docs = [{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "weightcache-demo", "uid": str(uuid.uuid5(uuid.NAMESPACE_OID, name)),
                     "annotations": {"weightcache.io/models": uri}},
        "spec": {"nodeName": node, "containers": [{"name": "server", "image": "registry.example.com/s:1"}],
                 "readinessGates": [{"conditionType": "weightcache.io/weights-ready"}]},
        "status": {"phase": "Pending"},
    } for name, uri in pods]
    return yaml.safe_dump_all(docs)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _model_states(agent_port: int) -> dict[str, str]:
    status, body = http_get(f"http://127.0.0.1:{agent_port}/v1/models")
    if status != 200:
        return {}
    loaded = json.loads(body)
    models = loaded.get("models", loaded) if isinstance(loaded, dict) else loaded
    if isinstance(models, dict):  # {uri: {...}}
        return {uri: m.get("state", "") for uri, m in models.items()}
    return {m["uri"]: m.get("state", "") for m in models}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEIGHTCACHE_", "KUBECONFIG"))}
    env.update(extra)
    return env


@pytest.fixture
def live_stack(moto_s3: Any, monitoring: list[Obj], tmp_path: Path) -> Iterator[dict[str, Any]]:
    prometheus, _ = prometheus_binaries()
    node = "node-a"
    bucket = f"wc-deploy-{uuid.uuid4().hex[:12]}"
    moto_s3.create_bucket(bucket)
    payload = os.urandom(256 * 1024)
    moto_s3.put(bucket, "m1/config.json", b'{"demo": true}')
    moto_s3.put(bucket, "m1/weights.safetensors", payload)
    moto_s3.put(bucket, "m2.safetensors", payload[::-1])
    uris = {"m1": f"s3://{bucket}/m1/", "m2": f"s3://{bucket}/m2.safetensors",
            "missing": f"s3://{bucket}/missing.safetensors"}

    # The agent, on a pods file: p1 misses m1, pf asks for an object that does not exist (a fetch failure).
    pods_file = tmp_path / "pods.yaml"
    _write_atomically(pods_file, _pods_yaml([("p1", uris["m1"]), ("pf", uris["missing"])], node))
    agent_port, server_port, prom_port = free_port(), free_port(), free_port()
    agent_env = _env(**moto_s3.env(), NODE_NAME=node, WEIGHTCACHE_METRICS_PORT=str(agent_port),
                     WEIGHTCACHE_METRICS_HOST="127.0.0.1", WEIGHTCACHE_MAX_BYTES=str(64 * 1024**2),
                     WEIGHTCACHE_MIN_FREE_BYTES="0", WEIGHTCACHE_FILE_POLL_INTERVAL="0.2",
                     WEIGHTCACHE_MAX_ATTEMPTS="2", WEIGHTCACHE_LOG_FORMAT="text",
                     # Its own control socket, not the node-wide default another agent on this machine may hold.
                     WEIGHTCACHE_CONTROL_SOCKET=str(tmp_path / "run" / "agent.sock"))
    agent_argv = [sys.executable, "-m", "agent", "run", "--pods-file", str(pods_file),
                  "--cache-dir", str(tmp_path / "cache")]

    # The server, on a 1 MiB demo model (no agent involved: WEIGHTCACHE_MODEL_PATH).
    model_dir = tmp_path / "demo-model"
    subprocess.run([sys.executable, "-m", "server.demo_model", "--size", "1MiB", str(model_dir)],
                   check=True, timeout=120, cwd=REPO_ROOT, env=_env(), capture_output=True)
    server_env = _env(WEIGHTCACHE_MODEL_PATH=str(model_dir), WEIGHTCACHE_PORT=str(server_port),
                      WEIGHTCACHE_HOST="127.0.0.1", WEIGHTCACHE_DEVICE="cpu")

    monitors = {m["metadata"]["name"]: m for m in monitoring if m["kind"] == "PodMonitor"}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(_write_rules_file(monitoring, tmp_path / "rules.yaml"))],
        "scrape_configs": [
            _scrape_config(monitors["weightcache-agent"], agent_port, "weightcache-agent-x7k2p", node),
            _scrape_config(monitors["demo-inference"], server_port, "demo-inference-5d9c-abcde", node),
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    prom_argv = [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"]

    with spawn("agent", agent_argv, tmp_path / "agent.log", agent_env, cwd=REPO_ROOT) as agent, \
            spawn("server", [sys.executable, "-m", "server"], tmp_path / "server.log", server_env,
                  cwd=REPO_ROOT) as server, \
            spawn("prometheus", prom_argv, tmp_path / "prometheus.log", _env()) as prom:
        yield {"agent": agent, "server": server, "prometheus": prom, "uris": uris, "pods_file": pods_file,
               "node": node, "agent_port": agent_port, "server_port": server_port,
               "api": PrometheusAPI(f"http://127.0.0.1:{prom_port}")}


def _has_data(answer: dict[str, Any]) -> bool:
    return answer.get("status") == "success" and bool(answer["data"]["result"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_dashboard_query_and_alert_evaluates_with_data_on_a_real_prometheus(
    live_stack: dict[str, Any], monitoring: list[Obj]
) -> None:
    s = live_stack
    api: PrometheusAPI = s["api"]
    procs: list[Running] = [s["agent"], s["server"], s["prometheus"]]
    agent_url, server_url = f"http://127.0.0.1:{s['agent_port']}", f"http://127.0.0.1:{s['server_port']}"

    wait_for("agent /readyz", lambda: http_ok(f"{agent_url}/readyz"), timeout=60, watch=procs)
    wait_for("m1 ready", lambda: _model_states(s["agent_port"]).get(s["uris"]["m1"]) == "ready",
             timeout=60, watch=procs)
    wait_for("server /readyz", lambda: http_ok(f"{server_url}/readyz"), timeout=180, watch=procs)
    # Some traffic, so the latency histogram has observations.
    for _ in range(3):
        status, body = http_post_json(f"{server_url}/v1/predict", {"inputs": [[0.0] * 64]})
        assert status == 200, body
    wait_for("two scrapes of both targets",
             lambda: len(api.query("count_over_time(up[1m]) >= 2")["data"]["result"]) == 2, timeout=60, watch=procs)

    # Now that Prometheus watches, more demand: p2 hits m1, p3 misses m2. Rates over the test window see both.
    _write_atomically(s["pods_file"], _pods_yaml(
        [("p1", s["uris"]["m1"]), ("pf", s["uris"]["missing"]), ("p2", s["uris"]["m1"]), ("p3", s["uris"]["m2"])],
        s["node"]))
    wait_for("m2 ready", lambda: _model_states(s["agent_port"]).get(s["uris"]["m2"]) == "ready",
             timeout=60, watch=procs)
    wait_for("the hit scraped",
             lambda: _has_data(api.query('weightcache_cache_requests_total{result="hit"} > 0')),
             timeout=30, watch=procs)
    wait_for("the failure scraped", lambda: _has_data(api.query("weightcache_fetch_failures_total > 0")),
             timeout=30, watch=procs)
    time.sleep(3)  # a few more scrapes after the last change, so every rate window holds two samples or more

    targets = api.get("/api/v1/targets")["data"]["activeTargets"]
    assert sorted((t["labels"]["job"], t["labels"]["node"], t["health"]) for t in targets) == [
        ("weightcache-demo/demo-inference", s["node"], "up"),
        ("weightcache-system/weightcache-agent", s["node"], "up"),
    ]

    failures: list[str] = []
    for q in dashboard_queries(dashboard()):
        answer = api.query(substitute_grafana_variables(q.expr))
        if not _has_data(answer):
            failures.append(f"{q.source}: {answer.get('error') or 'no data'}\n    {q.expr}")
    for q in rule_queries(_prometheus_rule(monitoring)):
        whole, signal = api.query(q.expr), api.query(alert_signal(q.expr))
        if whole.get("status") != "success":
            failures.append(f"{q.source}: {whole.get('error')}\n    {q.expr}")
        if not _has_data(signal):
            failures.append(f"{q.source} signal: {signal.get('error') or 'no data'}\n    {alert_signal(q.expr)}")
    assert not failures, "\n".join(failures)

    # The first panel, the hit rate, is a real ratio here: one hit and one or two misses since scraping began.
    first = _panels_in_reading_order()[0]["targets"][0]["expr"]
    value = float(api.query(substitute_grafana_variables(first))["data"]["result"][0]["value"][1])
    assert math.isfinite(value) and 0 < value < 1, value

    # No peers here: every fetched byte came from S3, and the peer-savings panel says 0 (not "no data").
    assert _has_data(api.query('sum(weightcache_fetch_bytes_total{source="s3"}) > 0'))
    ratio = _panel(PEER_SAVINGS_PANEL)["targets"][0]["expr"]
    assert float(api.query(substitute_grafana_variables(ratio))["data"]["result"][0]["value"][1]) == 0

    # Prometheus itself loaded and evaluated every alert rule without error.
    groups = api.get("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(rule_queries(_prometheus_rule(monitoring)))
    assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules


