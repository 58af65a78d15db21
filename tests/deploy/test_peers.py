"""The Kubernetes side of peer exchange (PRODUCT.md "Peers"), over every entry point, offline.

The DaemonSet serves peers on the agent's peer port and mounts the optional token Secret where the agent reads it,
readable by the agent's user and by no one else; the agent learns its namespace and address from the downward API
and finds its peers with a selector that picks exactly the agent's pods; a Role lets it read pods in its own
namespace and nothing more; and the NetworkPolicy, evaluated here the way a network plugin applies it, lets only
agent pods of that namespace reach the peer port while the metrics port stays open to Prometheus and the kubelet.

The settings checks read `agent.config.AgentSettings` (env names and defaults on its dataclass fields), so a
renamed peer setting fails here rather than in a cluster.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .rendered import Obj, PodTemplate, entry_id, env_map, find, pod_templates, selects

AGENT_NAMESPACE = "weightcache-system"
SERVICE_ACCOUNT = "weightcache-agent"
PEER_SECRET = "weightcache-peer-token"
PEER_ROLE = "weightcache-agent-peers"
PEER_PORT = 9401  # PRODUCT.md "Peers": the default WEIGHTCACHE_PEER_PORT
READ_PODS = {("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch")}


def _agent_fields() -> dict[str, dataclasses.Field[Any]]:
    config = pytest.importorskip("agent.config")
    return {f.metadata["env"]: f for f in dataclasses.fields(config.AgentSettings)}


def _agent(objects: list[Obj]) -> PodTemplate:
    return next(t for t in pod_templates(objects) if t.owner == "DaemonSet/weightcache-agent")


def _container(template: PodTemplate) -> Obj:
    return next(c for c in template.spec["containers"] if c["name"] == "agent")


def _ports(container: Obj) -> dict[str, tuple[int, str]]:
    return {p["name"]: (p["containerPort"], p.get("protocol", "TCP")) for p in container.get("ports", [])}


def _volume(template: PodTemplate, name: str) -> Obj:
    return next(v for v in template.spec["volumes"] if v["name"] == name)


def _each_agent(renders: dict[Path, list[Obj]]) -> list[tuple[str, list[Obj], PodTemplate]]:
    return [(entry_id(path), objects, _agent(objects)) for path, objects in renders.items()]


def _token_mount(template: PodTemplate) -> tuple[Obj, Obj, str]:
    """(volumeMount, volume, file name) that WEIGHTCACHE_PEER_TOKEN_FILE resolves to."""
    agent = _container(template)
    directory, name = posixpath.split(env_map(agent)["WEIGHTCACHE_PEER_TOKEN_FILE"]["value"])
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"].rstrip("/") == directory)
    return mount, _volume(template, mount["name"]), name


def _equality_selector(text: str) -> dict[str, str]:
    """A `k=v,k2=v2` label selector (the form WEIGHTCACHE_PEER_SELECTOR takes) as matchLabels."""
    labels: dict[str, str] = {}
    for term in text.split(","):
        key, sep, value = term.replace("==", "=").partition("=")
        assert sep and key.strip() and "!" not in key, f"not an equality selector: {text!r}"
        labels[key.strip()] = value.strip()
    return labels


# --- the DaemonSet: port, token, downward API ----------------------------------------------------------------


def test_agent_serves_peers_on_its_default_peer_port(renders: dict[Path, list[Obj]]) -> None:
    fields = _agent_fields()
    assert "WEIGHTCACHE_PEER_PORT" in fields, "agent.config.AgentSettings has no WEIGHTCACHE_PEER_PORT"
    assert fields["WEIGHTCACHE_PEER_PORT"].default == PEER_PORT
    for entry, _, template in _each_agent(renders):
        agent = _container(template)
        port = int(env_map(agent)["WEIGHTCACHE_PEER_PORT"]["value"])
        assert port == PEER_PORT, entry
        assert _ports(agent)["peer"] == (port, "TCP"), entry


def test_daemonset_env_loads_as_the_agents_peer_settings(base: list[Obj]) -> None:
    config = pytest.importorskip("agent.config")
    fields = _agent_fields()
    agent = _container(_agent(base))
    downward = {"NODE_NAME": "node-a", "POD_NAMESPACE": AGENT_NAMESPACE, "POD_IP": "10.0.0.7"}
    env = {name: e["value"] if "value" in e else downward[name] for name, e in env_map(agent).items()}
    settings = config.load_settings(env=env)

    def setting(env_name: str) -> Any:
        assert env_name in fields, f"agent.config.AgentSettings has no {env_name}"
        return getattr(settings, fields[env_name].name)

    assert setting("WEIGHTCACHE_PEER_PORT") == PEER_PORT
    assert Path(setting("WEIGHTCACHE_PEER_TOKEN_FILE")) == Path(env["WEIGHTCACHE_PEER_TOKEN_FILE"])
    assert setting("POD_NAMESPACE") == AGENT_NAMESPACE
    assert setting("POD_IP") == "10.0.0.7"


def test_peer_discovery_reads_namespace_and_address_from_the_downward_api(renders: dict[Path, list[Obj]]) -> None:
    for entry, _, template in _each_agent(renders):
        env = env_map(_container(template))
        assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, entry
        assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, entry


def test_peer_token_is_the_optional_secret_mounted_read_only_where_the_agent_reads_it(
    renders: dict[Path, list[Obj]]
) -> None:
    for entry, _, template in _each_agent(renders):
        mount, volume, name = _token_mount(template)
        assert mount.get("readOnly") is True, entry
        # A subPath mount would never see the Secret change; the whole directory is mounted instead.
        assert "subPath" not in mount and "subPathExpr" not in mount, entry
        secret = volume["secret"]
        assert secret["secretName"] == PEER_SECRET, entry
        # Optional: without the Secret the pod still starts, and the agent runs with peer exchange off.
        assert secret["optional"] is True, entry
        # Only the token key lands in the directory, under the name the agent reads.
        assert secret.get("items", [{"key": "token", "path": "token"}]) == [{"key": "token", "path": name}], entry
        assert name == "token", entry


def test_no_entry_point_ships_a_secret(every_object: list[tuple[str, Obj]]) -> None:
    # The peer token is generated by whoever installs (README "Peer exchange"), never committed or generated here.
    assert not [(entry, o["metadata"]["name"]) for entry, o in every_object if o["kind"] == "Secret"]


def test_only_the_agents_user_can_read_the_peer_token(renders: dict[Path, list[Obj]]) -> None:
    for entry, _, template in _each_agent(renders):
        agent = _container(template)
        pod_sc, sc = template.spec.get("securityContext", {}), agent.get("securityContext", {})
        uid, gid = sc.get("runAsUser", pod_sc.get("runAsUser")), sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        assert uid is not None and gid is not None, f"{entry}: the agent's uid/gid should be explicit"
        # Every capability is dropped, so root has no CAP_DAC_OVERRIDE/READ_SEARCH: it reads through the mode bits
        # like anyone else (as the owner, the kubelet creating the files as root).
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), entry
        fs_group = pod_sc.get("fsGroup")
        groups = {gid, *pod_sc.get("supplementalGroups", []), *([fs_group] if fs_group is not None else [])}
        file_uid, file_gid = 0, (fs_group if fs_group is not None else 0)  # the kubelet gives the file fsGroup
        _, volume, name = _token_mount(template)
        item: Obj = next((i for i in volume["secret"].get("items", []) if i["path"] == name), {})
        mode = item.get("mode", volume["secret"].get("defaultMode", 0o644))
        readable = bool((uid == file_uid and mode & 0o400) or (file_gid in groups and mode & 0o040) or mode & 0o004)
        assert readable, f"{entry}: uid {uid} (groups {sorted(groups)}) cannot read a {mode:o} {file_uid}:{file_gid} file"
        assert mode & 0o007 == 0, f"{entry}: the token is world-readable ({mode:o})"
        assert mode & 0o333 == 0, f"{entry}: the token file is writable or executable ({mode:o})"


def test_peer_selector_picks_exactly_the_agent_pods(renders: dict[Path, list[Obj]]) -> None:
    fields = _agent_fields()
    assert "WEIGHTCACHE_PEER_SELECTOR" in fields, "agent.config.AgentSettings has no WEIGHTCACHE_PEER_SELECTOR"
    for entry, objects, template in _each_agent(renders):
        env = env_map(_container(template))
        text = str(env["WEIGHTCACHE_PEER_SELECTOR"]["value"] if "WEIGHTCACHE_PEER_SELECTOR" in env else (
            fields["WEIGHTCACHE_PEER_SELECTOR"].default))
        selector = {"matchLabels": _equality_selector(text)}
        assert selects(selector, template.metadata["labels"]), f"{entry}: {text!r} misses the agent's own pods"
        others = [t.owner for t in pod_templates(objects)
                  if t.owner != template.owner and selects(selector, t.metadata.get("labels", {}))]
        assert not others, f"{entry}: {text!r} also selects {others}"


# --- RBAC: a Role for discovery --------------------------------------------------------------------------------


def _granted(role: Obj) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_peer_role_reads_pods_in_the_agent_namespace_only(renders: dict[Path, list[Obj]]) -> None:
    for entry, objects, template in _each_agent(renders):
        daemonset = find(objects, "DaemonSet", "weightcache-agent")
        role = find(objects, "Role", PEER_ROLE)
        assert role["metadata"]["namespace"] == daemonset["metadata"]["namespace"] == AGENT_NAMESPACE, entry
        assert _granted(role) == READ_PODS, entry
        assert not any(rule.get("resourceNames") for rule in role["rules"]), entry
        binding = find(objects, "RoleBinding", PEER_ROLE)
        assert binding["metadata"]["namespace"] == AGENT_NAMESPACE, entry
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": PEER_ROLE}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": AGENT_NAMESPACE}]
        assert template.spec["serviceAccountName"] == SERVICE_ACCOUNT, entry


def test_nothing_bound_to_the_agent_reads_secrets(every_object: list[tuple[str, Obj]]) -> None:
    # The peer token reaches the agent as a mounted file; no role needs the Secrets API.
    bound = {(entry, o["roleRef"]["kind"], o["roleRef"]["name"], o["metadata"].get("namespace"))
             for entry, o in every_object if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
             and any(s.get("kind") == "ServiceAccount" and s.get("name") == SERVICE_ACCOUNT for s in o["subjects"])}
    assert bound
    for entry, kind, name, namespace in bound:
        role = next(o for e, o in every_object if e == entry and o["kind"] == kind and o["metadata"]["name"] == name
                    and (kind == "ClusterRole" or o["metadata"]["namespace"] == namespace))
        assert not {r for _, r, _ in _granted(role)} & {"secrets", "*"}, f"{entry}: {kind}/{name}"


# --- NetworkPolicy, evaluated ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a connection comes from: a pod (its namespace and labels), or an address outside the pod network."""

    what: str
    ip: str
    namespace: str | None = None  # None: not a pod (a node's kubelet, something outside the cluster)
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _policy_types(policy: Obj) -> list[str]:
    spec = policy["spec"]
    return list(spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else [])))


def _peer_matches(peer: Obj, policy_namespace: str, source: Source) -> bool:
    if "ipBlock" in peer:
        ip = ipaddress.ip_address(source.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if source.namespace is None:
        return False
    if "namespaceSelector" in peer:
        namespace_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source.namespace})
    else:  # a podSelector alone means pods of the policy's own namespace
        namespace_ok = source.namespace == policy_namespace
    return namespace_ok and selects(peer.get("podSelector") or {}, source.labels)


def _port_matches(rule_ports: list[Obj] | None, port: int, protocol: str, named: Mapping[str, int]) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        value: int | str = p["port"]
        if isinstance(value, str):
            if named.get(value) == port:
                return True
        elif value <= port <= int(p.get("endPort", value)):
            return True
    return False


def admits(policies: list[Obj], *, namespace: str, labels: Mapping[str, str], named_ports: Mapping[str, int],
           source: Source, port: int, protocol: str = "TCP") -> bool:
    """Whether ingress to a pod (namespace, labels) on port/protocol from source is allowed, by NetworkPolicy
    semantics: not isolated unless a policy with Ingress selects the pod; then the union of their rules."""
    isolating = [p for p in policies if p["metadata"]["namespace"] == namespace
                 and "Ingress" in _policy_types(p) and selects(p["spec"]["podSelector"], labels)]
    if not isolating:
        return True
    return any(
        _port_matches(rule.get("ports"), port, protocol, named_ports)
        and (not rule.get("from") or any(_peer_matches(peer, p["metadata"]["namespace"], source)
                                         for peer in rule["from"]))
        for p in isolating for rule in p["spec"].get("ingress") or [])


def _network(objects: list[Obj]) -> tuple[list[Obj], PodTemplate, dict[str, int], dict[str, Source]]:
    template = _agent(objects)
    labels = template.metadata["labels"]
    inference = next(t for t in pod_templates(objects) if t.owner != template.owner)
    sources = {
        "another agent": Source("another agent", "10.1.2.3", AGENT_NAMESPACE, labels),
        "inference pod": Source("inference pod", "10.1.3.4", inference.namespace, inference.metadata["labels"]),
        "unlabelled pod in the agent namespace": Source("debug pod", "10.1.4.5", AGENT_NAMESPACE, {"run": "debug"}),
        "agent look-alike elsewhere": Source("look-alike", "10.1.5.6", "team-a", labels),
        "prometheus (monitoring)": Source("prometheus", "10.1.6.7", "monitoring",
                                          {"app.kubernetes.io/name": "prometheus"}),
        "prometheus (observability)": Source("prometheus", "10.1.7.8", "observability",
                                             {"app.kubernetes.io/name": "prometheus"}),
        "kubelet": Source("kubelet", "10.0.0.10"),
        "outside": Source("outside", "203.0.113.7"),
    }
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    named = {name: number for name, (number, _) in _ports(_container(template)).items()}
    return policies, template, named, sources


def test_a_network_policy_isolates_the_agent_pods_for_ingress_only(renders: dict[Path, list[Obj]]) -> None:
    for entry, objects in ((entry_id(p), o) for p, o in renders.items()):
        policies, template, _, _ = _network(objects)
        selecting = [p for p in policies if p["metadata"]["namespace"] == template.namespace
                     and selects(p["spec"]["podSelector"], template.metadata["labels"])]
        assert selecting, f"{entry}: no NetworkPolicy selects the agent pods"
        # Egress stays open: the agent reaches S3, the API server and the other agents' peer ports.
        assert all(_policy_types(p) == ["Ingress"] for p in selecting), entry


def test_peer_port_admits_agent_pods_of_the_agent_namespace_only(renders: dict[Path, list[Obj]]) -> None:
    for entry, objects in ((entry_id(p), o) for p, o in renders.items()):
        policies, template, named, sources = _network(objects)
        admitted = {name for name, s in sources.items()
                    if admits(policies, namespace=template.namespace, labels=template.metadata["labels"],
                              named_ports=named, source=s, port=named["peer"])}
        assert admitted == {"another agent"}, entry


def test_metrics_port_and_probes_stay_reachable(renders: dict[Path, list[Obj]]) -> None:
    for entry, objects in ((entry_id(p), o) for p, o in renders.items()):
        policies, template, named, sources = _network(objects)

        def reaches(source: str, port: int, policies: list[Obj] = policies, template: PodTemplate = template,
                    named: dict[str, int] = named, sources: dict[str, Source] = sources) -> bool:
            return admits(policies, namespace=template.namespace, labels=template.metadata["labels"],
                          named_ports=named, source=sources[source], port=port)

        # Prometheus scrapes from whatever namespace it runs in (the PodMonitor does not say).
        assert reaches("prometheus (monitoring)", named["metrics"]), entry
        assert reaches("prometheus (observability)", named["metrics"]), entry
        agent = _container(template)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = agent[probe]["httpGet"]["port"]
            assert reaches("kubelet", named.get(port, port)), f"{entry}: {probe}"


def test_nothing_else_reaches_the_agent_pods(renders: dict[Path, list[Obj]]) -> None:
    for entry, objects in ((entry_id(p), o) for p, o in renders.items()):
        policies, template, named, sources = _network(objects)
        closed = [(p, "TCP") for p in (22, 80, 443, 8080, 9402, 10250) if p not in named.values()]
        closed += [(p, "UDP") for p in named.values()]
        for source in sources.values():
            for port, protocol in closed:
                assert not admits(policies, namespace=template.namespace, labels=template.metadata["labels"],
                                  named_ports=named, source=source, port=port, protocol=protocol), (
                    f"{entry}: {source.what} reaches {port}/{protocol}")


def test_the_policy_evaluator_reads_from_clauses_as_the_api_defines_them() -> None:
    # The subtle part of NetworkPolicy: one peer with both selectors is an AND, two peers are an OR.
    def policy(*peers: Obj) -> Obj:
        return {"kind": "NetworkPolicy", "metadata": {"namespace": "ns"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": list(peers)}]}}

    app = {"podSelector": {"matchLabels": {"app": "x"}}}
    other_ns = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}}}
    x_in_other = Source("x", "10.0.0.1", "other", {"app": "x"})
    y_in_other = Source("y", "10.0.0.2", "other", {"app": "y"})
    x_in_ns = Source("x", "10.0.0.3", "ns", {"app": "x"})

    def ok(p: Obj, s: Source) -> bool:
        return admits([p], namespace="ns", labels={}, named_ports={}, source=s, port=1)

    assert ok(policy(app), x_in_ns) and not ok(policy(app), x_in_other)  # podSelector alone: own namespace
    assert ok(policy({**app, **other_ns}), x_in_other) and not ok(policy({**app, **other_ns}), y_in_other)
    assert ok(policy(app, other_ns), y_in_other) and ok(policy(app, other_ns), x_in_ns)
    assert not ok({**policy(app), "spec": {"podSelector": {}, "ingress": []}}, x_in_ns)  # isolated, no rule
    assert ok({**policy(app), "spec": {"podSelector": {"matchLabels": {"a": "b"}}, "ingress": []}}, x_in_other)
