"""Prometheus metrics, defined once, on the agent's own registry.

Names and labels are part of the product contract (PRODUCT.md "Metrics"); dashboards and alerts depend on them.
Label values are bounded (results, reasons, states): never a URI, a pod name or anything a user controls.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# `_created` series double every counter's cardinality and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus_client (0.26)

REGISTRY = CollectorRegistry(auto_describe=True)

CACHE_REQUESTS = Counter(
    "weightcache_cache_requests", "Demands for a model by a pod, counted when first seen: hit if already ready.",
    ["result"], registry=REGISTRY)
FETCH_BYTES = Counter("weightcache_fetch_bytes", "Bytes of model data fetched, by source: s3 or peer (another agent).",
                      ["source"], registry=REGISTRY)
PEER_SERVED_BYTES = Counter("weightcache_peer_served_bytes", "Bytes this agent served to other agents.",
                            registry=REGISTRY)
PEER_ERRORS = Counter(
    "weightcache_peer_errors",
    "Peer exchange failures, by reason: unauthorized (a caller without the token, or a peer refusing ours), "
    "refused (a peer answered an error), connection (unreachable or dropped), stalled (silent past the timeout), "
    "corrupt (bytes that did not match their chunk digest). The bytes then come from another peer or S3.",
    ["reason"], registry=REGISTRY)
PEER_ERROR_REASONS = ("unauthorized", "refused", "connection", "stalled", "corrupt")
FETCH_DURATION = Histogram(
    "weightcache_fetch_duration_seconds", "Time to make a model ready when it had to be fetched.",
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600), registry=REGISTRY)
FETCH_FAILURES = Counter("weightcache_fetch_failures", "Fetches that failed, by reason.", ["reason"],
                         registry=REGISTRY)
FETCH_IN_PROGRESS = Gauge("weightcache_fetch_in_progress", "Model fetches running now.", registry=REGISTRY)
CACHE_BYTES_USED = Gauge("weightcache_cache_bytes_used", "Bytes the cache occupies on disk.", registry=REGISTRY)
CACHE_BYTES_CAPACITY = Gauge(
    "weightcache_cache_bytes_capacity",
    "The cache's capacity: the byte budget, or (without one) what the filesystem allows.", registry=REGISTRY)
EVICTIONS = Counter("weightcache_evictions", "Models evicted.", registry=REGISTRY)
EVICTED_BYTES = Counter("weightcache_evicted_bytes", "Bytes freed by eviction.", registry=REGISTRY)
MODELS = Gauge("weightcache_models", "Models known to the agent, by state.", ["state"], registry=REGISTRY)
WATCH_RECONNECTS = Counter(
    "weightcache_watch_reconnects",
    "Pod watch reconnects: expired (410, relisted), error (relisted after backoff), inactive (silent stream, "
    "resumed from the last resourceVersion without a relist).", ["reason"], registry=REGISTRY)
NODE_API_ERRORS = Counter(
    "weightcache_node_api_errors",
    "Failed reads and writes of this node's object (labels, taint), all retried with capped backoff; conflict = "
    "another writer changed the node between our read and our write.", ["op"], registry=REGISTRY)
WARM_SET_UNRESOLVED = Gauge(
    "weightcache_warm_set_unresolved",
    "1 while this node's warm set cannot be resolved (its labels cannot be read); retried until it can.",
    registry=REGISTRY)
CONTROL_REQUESTS = Counter(
    "weightcache_control_requests", "Requests on the control socket, by result (refused: wrong uid or pid "
    "namespace, checked with SO_PEERCRED).", ["result"], registry=REGISTRY)
POLICY_REJECTIONS = Counter("weightcache_policy_rejections", "Model demands refused by policy or as invalid.",
                            ["reason"], registry=REGISTRY)
EVENTS_POSTED = Counter("weightcache_events_posted", "Kubernetes Events posted (created or count-bumped).",
                        ["reason"], registry=REGISTRY)
HIT_LATENCY = Histogram(
    "weightcache_demand_to_event_seconds", "From a demand seen to its Ready/Failed Event posted.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800), registry=REGISTRY)

MODEL_STATES = ("pending", "fetching", "ready", "failed", "rejected")
for _state in MODEL_STATES:
    MODELS.labels(state=_state)
for _source in ("s3", "peer"):
    FETCH_BYTES.labels(source=_source)
for _reason in PEER_ERROR_REASONS:
    PEER_ERRORS.labels(reason=_reason)
for _result in ("hit", "miss"):
    CACHE_REQUESTS.labels(result=_result)
for _reason in ("expired", "error", "inactive"):
    WATCH_RECONNECTS.labels(reason=_reason)
for _op in ("read", "patch", "conflict"):
    NODE_API_ERRORS.labels(op=_op)
for _result in ("allowed", "refused"):
    CONTROL_REQUESTS.labels(result=_result)
