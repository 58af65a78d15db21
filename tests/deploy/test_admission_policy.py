"""The ValidatingAdmissionPolicy that keeps pods away from the agent's control socket and from write access to the
cache, checked offline: its shape (what it matches, that it denies, that its paths and namespace agree with the
DaemonSet and the agent's settings) and its CEL, evaluated against pods that must be admitted and pods that must be
refused.

No API server runs here. The CEL runs in cel-python (a pure-Python CEL interpreter), with the two functions of
Kubernetes' extended strings library that the policy uses (``split``, ``join``) implemented alongside, and the
namespace selector is applied the way the API server applies it. What this cannot check: Kubernetes' type-checking
of the expressions against the Pod schema and its cost budget. `kubernetes-validate` checks the objects against the
admissionregistration.k8s.io/v1 schema (test_manifests_validate.py, Kubernetes 1.30 and 1.37).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import celpy  # a declared test dependency (cel-python): missing, these tests must fail, not skip
import pytest
from celpy import celtypes

from .rendered import Obj, entry_id, env_map, find, pod_templates, selects

POLICY = "weightcache-protect-node-cache"
AGENT_NAMESPACE = "weightcache-system"
CACHE = "/var/lib/weightcache"
SOCKET_DIR = "/run/weightcache"


# ----- a small evaluator: the API server's steps for one admission request ---------------------------------------


def _split(text: Any, sep: Any) -> Any:
    return celtypes.ListType([celtypes.StringType(part) for part in str(text).split(str(sep))])


def _join(items: Any, sep: Any = "") -> Any:
    return celtypes.StringType(str(sep).join(str(i) for i in items))


FUNCTIONS = {"split": _split, "join": _join}


def _program(expression: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(expression), functions=FUNCTIONS)


def admission(policy: Obj, pod: Obj, *, namespace: str, operation: str = "CREATE",
              subresource: str = "") -> list[str]:
    """The messages of the validations that fail for this request; [] when the pod is admitted (or not matched)."""
    spec = policy["spec"]
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    if not selects(spec["matchConstraints"].get("namespaceSelector") or {}, namespace_labels):
        return []
    resource = "pods" + (f"/{subresource}" if subresource else "")
    if not any(resource in r["resources"] and operation in r["operations"]
               for r in spec["matchConstraints"]["resourceRules"]):
        return []
    activation: dict[str, Any] = {"object": celpy.json_to_cel(pod)}
    variables: dict[str, Any] = {}
    for var in spec.get("variables") or []:
        activation["variables"] = celtypes.MapType({celtypes.StringType(k): v for k, v in variables.items()})
        value = _program(var["expression"]).evaluate(activation)
        assert not isinstance(value, celpy.CELEvalError), (var["name"], value)
        variables[var["name"]] = value
    activation["variables"] = celtypes.MapType({celtypes.StringType(k): v for k, v in variables.items()})
    failed = []
    for check in spec["validations"]:
        result = _program(check["expression"]).evaluate(activation)
        assert isinstance(result, celtypes.BoolType), (check["expression"], result)
        if not result:
            message = check.get("message")
            if "messageExpression" in check:
                message = str(_program(check["messageExpression"]).evaluate(activation))
            failed.append(str(message))
    return failed


def pod(*volumes: Obj, mounts: Mapping[str, bool | None] | None = None, where: str = "containers") -> Obj:
    """A pod with the given volumes, each mounted by one container of kind ``where`` (readOnly as given)."""
    mounts = mounts if mounts is not None else {v["name"]: True for v in volumes}
    volume_mounts = []
    for name, read_only in mounts.items():
        m: Obj = {"name": name, "mountPath": f"/mnt/{name}"}
        if read_only is not None:
            m["readOnly"] = read_only
        volume_mounts.append(m)
    spec: Obj = {"containers": [{"name": "main", "image": "example/infer:1"}], "volumes": list(volumes)}
    spec.setdefault(where, []).append({"name": "extra" if where != "containers" else "side",
                                       "image": "example/infer:1", "volumeMounts": volume_mounts})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "team-a"}, "spec": spec}


def host(name: str, path: str) -> Obj:
    return {"name": name, "hostPath": {"path": path}}


@pytest.fixture(scope="module")
def policy(base: list[Obj]) -> Obj:
    return find(base, "ValidatingAdmissionPolicy", POLICY)


# ----- shape -------------------------------------------------------------------------------------------------------


def test_the_policy_is_bound_to_deny_and_fails_closed(base: list[Obj], policy: Obj) -> None:
    binding = find(base, "ValidatingAdmissionPolicyBinding", POLICY)
    assert binding["spec"]["policyName"] == POLICY
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert policy["apiVersion"] == binding["apiVersion"] == "admissionregistration.k8s.io/v1"


def test_the_policy_sees_pod_creation_and_ephemeral_containers(policy: Obj) -> None:
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["operations"]))
             for r in policy["spec"]["matchConstraints"]["resourceRules"]}
    assert rules == {(("",), ("pods",), ("CREATE",)), (("",), ("pods/ephemeralcontainers",), ("UPDATE",))}


def test_every_expression_parses(policy: Obj) -> None:
    spec = policy["spec"]
    expressions = [v["expression"] for v in spec["variables"]]
    expressions += [e for c in spec["validations"] for e in (c["expression"], c.get("messageExpression")) if e]
    for expression in expressions:
        _program(expression)  # raises on a syntax error


def test_the_policy_is_in_every_entry_point_and_agrees_with_the_daemonset(renders: dict[Path, list[Obj]]) -> None:
    for path, objects in renders.items():
        where = entry_id(path)
        shipped = find(objects, "ValidatingAdmissionPolicy", POLICY)
        agent = next(t for t in pod_templates(objects) if t.owner == "DaemonSet/weightcache-agent")
        volumes = {v["name"]: v for v in agent.spec["volumes"]}
        cache_path = volumes["cache"]["hostPath"]["path"]
        control_path = volumes["control"]["hostPath"]["path"]
        env = env_map(agent.spec["containers"][0])
        assert env["WEIGHTCACHE_ROOT"]["value"] == cache_path == CACHE, where
        assert str(Path(env["WEIGHTCACHE_CONTROL_SOCKET"]["value"]).parent) == control_path == SOCKET_DIR, where
        text = "\n".join(v["expression"] for v in shipped["spec"]["variables"])
        assert f"'{cache_path.strip('/')}'" in text and f"'{control_path.strip('/')}'" in text, where
        exempt = shipped["spec"]["matchConstraints"]["namespaceSelector"]["matchExpressions"]
        assert exempt == [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [agent.namespace]}]
        # The DaemonSet itself would be refused anywhere else: the exemption is what lets the agent run.
        agent_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}, "spec": agent.spec}
        assert admission(shipped, agent_pod, namespace=agent.namespace) == [], where
        assert len(admission(shipped, agent_pod, namespace="default")) == 2, where


def test_the_agent_settings_default_to_the_paths_the_policy_protects() -> None:
    config = pytest.importorskip("agent.config")
    fields = {f.name: f for f in dataclasses.fields(config.AgentSettings)}
    assert str(fields["cache_dir"].default) == CACHE
    assert str(Path(str(fields["control_socket"].default)).parent) == SOCKET_DIR


# ----- behaviour ------------------------------------------------------------------------------------------------


def test_the_shipped_inference_pods_are_admitted(base: list[Obj], policy: Obj) -> None:
    inference = [t for t in pod_templates(base) if t.owner != "DaemonSet/weightcache-agent"]
    assert inference
    for template in inference:
        shipped_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template.metadata, "spec": template.spec}
        assert admission(policy, shipped_pod, namespace=template.namespace) == [], template.owner


@pytest.mark.parametrize("case", [
    pytest.param(pod(), id="no-volumes"),
    pytest.param(pod({"name": "tmp", "emptyDir": {}}, mounts={"tmp": False}), id="emptyDir-rw"),
    pytest.param(pod(host("w", CACHE)), id="cache-read-only"),
    pytest.param(pod(host("w", "/var/lib/weightcache/models/s3/b")), id="inside-the-cache-read-only"),
    pytest.param(pod(host("w", "/var/lib")), id="above-the-cache-read-only"),
    pytest.param(pod(host("w", "/var/lib/weightcache-other"), mounts={"w": False}), id="a-sibling-rw"),
    pytest.param(pod(host("w", "/var/lib/kubelet/pods"), mounts={"w": False}), id="unrelated-rw"),
    pytest.param(pod(host("w", "/run/containerd")), id="a-sibling-of-the-socket-dir"),
    pytest.param(pod(host("w", "/run/weightcache-other")), id="a-lookalike-of-the-socket-dir"),
    pytest.param(pod(host("w", CACHE), mounts={}), id="cache-volume-never-mounted"),
])
def test_admitted(policy: Obj, case: Obj) -> None:
    assert admission(policy, case, namespace="team-a") == []


@pytest.mark.parametrize(("case", "says"), [
    pytest.param(pod(host("w", CACHE), mounts={"w": None}), "containers must mount", id="cache-rw-by-default"),
    pytest.param(pod(host("w", CACHE), mounts={"w": False}), "containers must mount", id="cache-readOnly-false"),
    pytest.param(pod(host("w", "/var/lib/weightcache/"), mounts={"w": None}), "containers must", id="trailing-slash"),
    pytest.param(pod(host("w", "/var//lib/./weightcache"), mounts={"w": None}), "containers must", id="odd-spelling"),
    pytest.param(pod(host("w", "/var/lib/weightcache/models"), mounts={"w": None}), "containers must",
                 id="inside-the-cache-rw"),
    pytest.param(pod(host("w", "/var/lib"), mounts={"w": None}), "containers must", id="above-the-cache-rw"),
    pytest.param(pod(host("w", CACHE), mounts={"w": None}, where="initContainers"), "init containers must",
                 id="init-container-rw"),
    pytest.param(pod(host("w", CACHE), mounts={"w": None}, where="ephemeralContainers"), "ephemeral containers",
                 id="ephemeral-container-rw"),
    pytest.param(pod(host("s", SOCKET_DIR)), "control socket", id="socket-dir-read-only"),
    pytest.param(pod(host("s", "/run/weightcache/agent.sock")), "control socket", id="the-socket-itself"),
    pytest.param(pod(host("s", "/var/run/weightcache")), "control socket", id="via-var-run"),
    pytest.param(pod(host("s", "/run//./weightcache/")), "control socket", id="socket-dir-odd-spelling"),
    pytest.param(pod(host("s", "/run")), "control socket", id="above-the-socket-dir"),
    pytest.param(pod(host("s", "/")), "control socket", id="the-host-root"),
])
def test_refused(policy: Obj, case: Obj, says: str) -> None:
    messages = admission(policy, case, namespace="team-a")
    assert messages and any(says in m for m in messages), messages


def test_the_message_names_the_offending_volume(policy: Obj) -> None:
    (message,) = admission(policy, pod(host("hostroot", "/")), namespace="team-a")[:1]
    assert "hostroot" in message and SOCKET_DIR in message


def test_an_ephemeral_container_added_later_is_checked(policy: Obj) -> None:
    running = pod(host("w", CACHE))
    debugged = copy.deepcopy(running)
    debugged["spec"]["ephemeralContainers"] = [{"name": "debug", "image": "busybox:1",
                                                "volumeMounts": [{"name": "w", "mountPath": "/w"}]}]
    assert admission(policy, running, namespace="team-a", operation="UPDATE", subresource="ephemeralcontainers") == []
    assert admission(policy, debugged, namespace="team-a", operation="UPDATE", subresource="ephemeralcontainers")


def test_only_the_agents_namespace_is_exempt(policy: Obj) -> None:
    bad = pod(host("s", SOCKET_DIR))
    assert admission(policy, bad, namespace=AGENT_NAMESPACE) == []
    for namespace in ("default", "kube-system", "weightcache-demo", "weightcache-system-2"):
        assert admission(policy, bad, namespace=namespace), namespace
