"""Policies over the rendered objects: least privilege, read-only cache for inference pods, probes, resources,
pinned images, a locked-down security context, and manifests that agree with the agent's and server's settings.

The settings checks read `agent.config.AgentSettings` and `server.config.ServerSettings` (their dataclass fields
carry the env names and defaults), so renaming a setting without updating manifests/ fails here.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from pathlib import Path
from typing import Any

import pytest
import xxhash
import yaml

from .rendered import ENTRY_POINTS, Obj, PodTemplate, containers, entry_id, env_map, find, pod_templates

AGENT_ROLE_RULES = {
    ("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"),
    ("", "pods/status", "patch"),
    ("", "events", "create"), ("", "events", "patch"),
    ("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch"),
    ("", "nodes", "get"), ("", "nodes", "patch"),
}
READINESS_GATE = "weightcache.io/weights-ready"
MODELS_ANNOTATION = "weightcache.io/models"
IMAGE_UID = 65532  # the USER of both Dockerfiles


def _settings_env(cls: Any) -> dict[str, dataclasses.Field[Any]]:
    return {f.metadata["env"]: f for f in dataclasses.fields(cls)}


def _agent_settings() -> Any:
    config = pytest.importorskip("agent.config")
    return config


def _server_settings() -> Any:
    config = pytest.importorskip("server.config")
    return config


def _agent(objects: list[Obj]) -> PodTemplate:
    return next(t for t in pod_templates(objects) if t.owner == "DaemonSet/weightcache-agent")


def _inference(objects: list[Obj]) -> list[PodTemplate]:
    return [t for t in pod_templates(objects) if MODELS_ANNOTATION in t.metadata.get("annotations", {})]


def _all_templates(renders: dict[Path, list[Obj]]) -> list[tuple[str, PodTemplate]]:
    return [(entry_id(p), t) for p, objs in renders.items() for t in pod_templates(objs)]


def _volume(template: PodTemplate, name: str) -> Obj:
    return next(v for v in template.spec["volumes"] if v["name"] == name)


def _env_values(container: Obj, **field_refs: str) -> dict[str, str]:
    """The container's env as a process would see it; downward-API values supplied by the caller."""
    out: dict[str, str] = {}
    for name, entry in env_map(container).items():
        out[name] = entry["value"] if "value" in entry else field_refs[name]
    return out


def _uris(annotation: str) -> list[str]:
    # PRODUCT.md: comma- and/or whitespace-separated.
    return [u for u in re.split(r"[,\s]+", annotation) if u]


# --- RBAC ---------------------------------------------------------------------------------------------------


def test_rbac_grants_no_wildcards(every_object: list[tuple[str, Obj]]) -> None:
    for entry, obj in every_object:
        if obj["kind"] in ("Role", "ClusterRole"):
            for rule in obj.get("rules", []):
                for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                    assert "*" not in rule.get(key, []), f"{entry}: {obj['metadata']['name']} {key} has '*'"
                assert "nonResourceURLs" not in rule


def test_agent_cluster_role_grants_exactly_what_the_agent_uses(every_object: list[tuple[str, Obj]]) -> None:
    roles = [o for _, o in every_object if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "weightcache-agent"]
    assert roles
    for role in roles:
        granted = {
            (group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
        assert granted == AGENT_ROLE_RULES


def test_agent_role_is_bound_to_the_agent_service_account(base: list[Obj]) -> None:
    binding = find(base, "ClusterRoleBinding", "weightcache-agent")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "weightcache-agent"}
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "weightcache-agent", "namespace": "weightcache-system"}]
    assert _agent(base).spec["serviceAccountName"] == "weightcache-agent"


# --- every pod: images, probes, resources, security ---------------------------------------------------------


def test_no_image_is_unpinned_or_latest(renders: dict[Path, list[Obj]]) -> None:
    for entry, template in _all_templates(renders):
        for c in containers(template):
            image = c["image"]
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag, f"{entry} {template.owner}: image {image!r} has no tag"
            assert tag != "latest", f"{entry} {template.owner}: image {image!r} uses :latest"
            assert "/" in name, f"{entry} {template.owner}: image {image!r} was not mapped to a registry"


def test_every_container_has_liveness_and_readiness_probes(renders: dict[Path, list[Obj]]) -> None:
    for entry, template in _all_templates(renders):
        for c in template.spec["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in c, f"{entry} {template.owner}/{c['name']} has no {probe}"


def test_every_container_sets_requests_and_a_memory_limit(renders: dict[Path, list[Obj]]) -> None:
    for entry, template in _all_templates(renders):
        for c in containers(template):
            resources = c.get("resources", {})
            assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), f"{entry} {template.owner}"
            assert "memory" in resources.get("limits", {}), f"{entry} {template.owner}"


def test_every_container_is_locked_down(renders: dict[Path, list[Obj]]) -> None:
    for entry, template in _all_templates(renders):
        pod_seccomp = template.spec.get("securityContext", {}).get("seccompProfile", {}).get("type")
        for c in containers(template):
            sc = c.get("securityContext", {})
            where = f"{entry} {template.owner}/{c['name']}"
            assert sc.get("privileged") is not True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert (sc.get("seccompProfile", {}).get("type") or pod_seccomp) == "RuntimeDefault", where
            # A read-only root filesystem needs somewhere to write temporary files.
            assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), where


def test_only_the_agent_runs_as_root(renders: dict[Path, list[Obj]]) -> None:
    for entry, template in _all_templates(renders):
        if template.owner == "DaemonSet/weightcache-agent":
            continue
        sc = template.spec.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser") == IMAGE_UID, f"{entry} {template.owner}"


def test_nonroot_overlay_runs_the_agent_as_the_image_user(renders: dict[Path, list[Obj]]) -> None:
    objects = next(o for p, o in renders.items() if entry_id(p) == "overlays/nonroot")
    agent = _agent(objects)
    assert agent.spec["securityContext"]["runAsNonRoot"] is True
    assert agent.spec["securityContext"]["runAsUser"] == IMAGE_UID
    assert _volume(agent, "cache")["hostPath"]["type"] == "Directory"
    # The socket's directory too: the agent must own it, so the node prepares it rather than the kubelet (root).
    assert _volume(agent, "control")["hostPath"]["type"] == "Directory"


def test_the_control_socket_has_a_hostpath_of_its_own_outside_the_cache(renders: dict[Path, list[Obj]]) -> None:
    for entry, objects in renders.items():
        template = _agent(objects)
        agent = template.spec["containers"][0]
        socket_dir = posixpath.dirname(env_map(agent)["WEIGHTCACHE_CONTROL_SOCKET"]["value"])
        mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == socket_dir)
        assert _volume(template, mount["name"])["hostPath"]["path"] == socket_dir, entry
        root = env_map(agent)["WEIGHTCACHE_ROOT"]["value"]
        assert not (socket_dir + "/").startswith(root.rstrip("/") + "/"), f"{entry}: the socket is under the root"


# --- the cache hostPath -------------------------------------------------------------------------------------


def test_inference_pods_mount_the_cache_read_only(renders: dict[Path, list[Obj]]) -> None:
    for entry, template in _all_templates(renders):
        if template.owner == "DaemonSet/weightcache-agent":
            continue
        host_volumes = {v["name"] for v in template.spec.get("volumes", []) if "hostPath" in v}
        for c in containers(template):
            for m in c.get("volumeMounts", []):
                if m["name"] in host_volumes:
                    assert m.get("readOnly") is True, f"{entry} {template.owner}/{c['name']} mounts {m['name']} rw"


def test_inference_pods_mount_the_same_host_path_the_agent_writes(base: list[Obj]) -> None:
    agent_path = _volume(_agent(base), "cache")["hostPath"]["path"]
    templates = _inference(base)
    assert templates, "the base has no example inference workload"
    for template in templates:
        paths = [v["hostPath"]["path"] for v in template.spec["volumes"] if "hostPath" in v]
        assert paths == [agent_path], template.owner


# --- the agent DaemonSet against AgentSettings --------------------------------------------------------------


def test_daemonset_sets_only_real_agent_settings(base: list[Obj]) -> None:
    fields = _settings_env(_agent_settings().AgentSettings)
    agent = _agent(base).spec["containers"][0]
    unknown = set(env_map(agent)) - set(fields)
    assert not unknown, f"env vars the agent does not read: {sorted(unknown)}"


def test_daemonset_env_values_load_as_agent_settings(base: list[Obj]) -> None:
    config = _agent_settings()
    agent = _agent(base).spec["containers"][0]
    settings = config.load_settings(env=_env_values(agent, NODE_NAME="node-a", POD_NAMESPACE="weightcache-system",
                                                    POD_IP="10.0.0.7"))
    assert settings.node_name == "node-a"
    assert settings.max_bytes > 0, "the DaemonSet should set a cache budget"


def test_node_name_comes_from_the_downward_api(base: list[Obj]) -> None:
    agent = _agent(base).spec["containers"][0]
    assert env_map(agent)["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_metrics_port_matches_the_agent_default_and_the_probes(base: list[Obj]) -> None:
    fields = _settings_env(_agent_settings().AgentSettings)
    agent = _agent(base).spec["containers"][0]
    port = int(env_map(agent)["WEIGHTCACHE_METRICS_PORT"]["value"])
    assert port == fields["WEIGHTCACHE_METRICS_PORT"].default == 9400
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    # The metrics port and the peer port (checked in test_peers.py), nothing else.
    assert ports == {"metrics": port, "peer": int(env_map(agent)["WEIGHTCACHE_PEER_PORT"]["value"])}
    paths = {probe: agent[probe]["httpGet"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {h["port"] for h in paths.values()} == {"metrics"}
    assert paths["livenessProbe"]["path"] == "/healthz"
    assert paths["readinessProbe"]["path"] == "/readyz"


def test_cache_root_matches_the_agent_default_and_the_mount(base: list[Obj]) -> None:
    fields = _settings_env(_agent_settings().AgentSettings)
    template = _agent(base)
    agent = template.spec["containers"][0]
    root = env_map(agent)["WEIGHTCACHE_ROOT"]["value"]
    assert root == str(fields["WEIGHTCACHE_ROOT"].default)
    mount = next(m for m in agent["volumeMounts"] if m["name"] == "cache")
    assert mount["mountPath"] == root and not mount.get("readOnly")
    assert _volume(template, "cache")["hostPath"] == {"path": root, "type": "DirectoryOrCreate"}


def test_policy_file_is_a_key_of_the_mounted_policy_configmap(base: list[Obj]) -> None:
    template = _agent(base)
    agent = template.spec["containers"][0]
    policy_file = env_map(agent)["WEIGHTCACHE_POLICY_FILE"]["value"]
    directory, key = posixpath.split(policy_file)
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == directory)
    assert mount.get("readOnly") is True
    configmap = find(base, "ConfigMap", _volume(template, mount["name"])["configMap"]["name"])
    assert key in configmap["data"]


def test_policy_configmap_follows_the_documented_format_with_comments(base: list[Obj]) -> None:
    text = find(base, "ConfigMap", "weightcache-policy")["data"]["policy.yaml"]
    # The ConfigMap is the policy's documentation for whoever edits it in the cluster.
    assert sum(line.strip().startswith("#") for line in text.splitlines()) >= 5
    policy = yaml.safe_load(text)
    assert set(policy) <= {"allow", "namespaces", "warm", "warmDeadlineSeconds"}
    uris = list(policy["allow"]) + [u for us in policy["namespaces"].values() for u in us]
    uris += [u for w in policy["warm"] for u in w["models"]]
    assert all(u.startswith("s3://") for u in uris)
    assert all(isinstance(w["nodeSelector"], dict) for w in policy["warm"])
    assert isinstance(policy["warmDeadlineSeconds"], int)


def test_shipped_policy_parses_and_allows_the_example_its_models(base: list[Obj]) -> None:
    policy_mod = pytest.importorskip("agent.cluster.policy")
    uris_mod = pytest.importorskip("agent.uris")
    policy = policy_mod.parse_policy(find(base, "ConfigMap", "weightcache-policy")["data"]["policy.yaml"])
    # Otherwise the example pod gets a Warning Event instead of its weights.
    for template in _inference(base):
        for uri in _uris(template.metadata["annotations"][MODELS_ANNOTATION]):
            assert policy.allows(template.namespace, uris_mod.parse_model_uri(uri)), (template.owner, uri)
    # The documented warm set applies to the node type it names.
    assert policy.warm_models({"node.kubernetes.io/instance-type": "p5.48xlarge"})


def test_termination_grace_outlasts_the_agent_shutdown_grace(base: list[Obj]) -> None:
    fields = _settings_env(_agent_settings().AgentSettings)
    template = _agent(base)
    grace = float(env_map(template.spec["containers"][0])["WEIGHTCACHE_SHUTDOWN_GRACE_SECONDS"]["value"])
    assert grace == fields["WEIGHTCACHE_SHUTDOWN_GRACE_SECONDS"].default
    assert template.spec["terminationGracePeriodSeconds"] == 30 >= grace + 5


def test_agent_runs_on_gpu_nodes_despite_their_taints(renders: dict[Path, list[Obj]]) -> None:
    for entry, objects in renders.items():
        spec = _agent(objects).spec
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        keys = {e["key"] for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]}
        assert "nvidia.com/gpu.present" in keys, entry
        tolerated = {(t["key"], t["effect"]) for t in spec["tolerations"] if t["operator"] == "Exists"}
        assert {("nvidia.com/gpu", "NoSchedule"), ("weightcache.io/warming", "NoSchedule")} <= tolerated


def test_agent_has_a_priority_class_of_its_own(base: list[Obj]) -> None:
    name = _agent(base).spec["priorityClassName"]
    priority = find(base, "PriorityClass", name)
    assert 0 < priority["value"] < 1_000_000_000 and not priority.get("globalDefault")


def test_agent_rolls_out_one_node_at_a_time(base: list[Obj]) -> None:
    strategy = find(base, "DaemonSet", "weightcache-agent")["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


# --- the example inference Deployment against ServerSettings ------------------------------------------------


def test_inference_pods_wait_for_the_weights_ready_gate(base: list[Obj]) -> None:
    for template in _inference(base):
        assert {"conditionType": READINESS_GATE} in template.spec["readinessGates"], template.owner


def test_inference_affinity_prefers_nodes_labelled_with_the_agents_hash(base: list[Obj]) -> None:
    uris_mod = pytest.importorskip("agent.uris")
    for template in _inference(base):
        uris = _uris(template.metadata["annotations"][MODELS_ANNOTATION])
        preferred = template.spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        keys = {e["key"]: e for p in preferred for e in p["preference"]["matchExpressions"]}
        for uri in uris:
            key = "models.weightcache.io/" + xxhash.xxh3_64(uri.encode()).hexdigest()[:16]
            assert key == uris_mod.label_key_for(uri), "the agent computes the label differently"
            assert keys[key] == {"key": key, "operator": "In", "values": ["ready"]}


def test_server_env_is_real_server_settings_and_loads(base: list[Obj]) -> None:
    config = _server_settings()
    fields = _settings_env(config.ServerSettings)
    for template in _inference(base):
        server = template.spec["containers"][0]
        env = _env_values(server)
        unknown = set(env) - set(fields) - {"HOME"}
        assert not unknown, f"env vars the server does not read: {sorted(unknown)}"
        settings = config.ServerSettings.from_env({k: v for k, v in env.items() if k in fields})
        assert settings.port == next(p["containerPort"] for p in server["ports"] if p["name"] == "http")


def test_server_serves_a_model_its_pod_annotates_from_the_mounted_root(base: list[Obj]) -> None:
    for template in _inference(base):
        server = template.spec["containers"][0]
        env = _env_values(server)
        assert env["WEIGHTCACHE_MODEL"] in _uris(template.metadata["annotations"][MODELS_ANNOTATION])
        mount = next(m for m in server["volumeMounts"] if m["mountPath"] == env["WEIGHTCACHE_ROOT"])
        assert mount["readOnly"] is True
        assert "hostPath" in _volume(template, mount["name"])


def test_server_probes_use_its_health_endpoints(base: list[Obj]) -> None:
    for template in _inference(base):
        server = template.spec["containers"][0]
        assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert server["startupProbe"]["httpGet"]["path"] == "/readyz"


def test_startup_probe_outlasts_the_servers_wait_for_weights(base: list[Obj]) -> None:
    for template in _inference(base):
        server = template.spec["containers"][0]
        wait = float(_env_values(server)["WEIGHTCACHE_WAIT_TIMEOUT_SECONDS"])
        startup = server["startupProbe"]
        assert startup["failureThreshold"] * startup["periodSeconds"] > wait + 60, template.owner


def test_hpa_scales_the_example_deployment(base: list[Obj]) -> None:
    hpa = find(base, "HorizontalPodAutoscaler", "demo-inference")
    target = hpa["spec"]["scaleTargetRef"]
    deployment = find(base, target["kind"], target["name"])
    assert deployment["metadata"]["namespace"] == hpa["metadata"]["namespace"]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


# --- namespaces and overlays --------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=entry_id)
def test_every_namespace_used_is_created_with_pod_security_labels(
    entry: Path, renders: dict[Path, list[Obj]]
) -> None:
    objects = renders[entry]
    namespaces = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Namespace"}
    used = {o["metadata"]["namespace"] for o in objects if "namespace" in o["metadata"]}
    assert used <= set(namespaces)
    for ns in namespaces.values():
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/warn"] == "restricted"


def test_eks_overlay_gives_the_agent_an_iam_role(renders: dict[Path, list[Obj]]) -> None:
    objects = next(o for p, o in renders.items() if entry_id(p) == "overlays/eks")
    account = find(objects, "ServiceAccount", "weightcache-agent")
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/.+", account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    # No static credentials anywhere: IRSA is the only source.
    for template in pod_templates(objects):
        for c in containers(template):
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env_map(c))
