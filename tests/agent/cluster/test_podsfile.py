"""``--pods-file``: Pod manifests from a YAML file that may change while the agent runs. Parsing (documents,
Lists, bad documents), the polling watcher (edits, typos, a vanished file), and the daemon end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cluster.pods import PodInfo
from agent.cluster.podsfile import read_pods_file, watch_pods_file
from agent.uris import parse_model_uri
from tests.agent.daemon_helpers import (
    AgentProcess,
    agent_environment,
    pod_manifest,
    start_agent,
    wait_until,
)
from tests.fixtures.s3servers import S3Server

# The fakes and fixtures these tests share (kube, models_bucket, agents, s3_environment).
pytest_plugins = ["tests.agent.daemon_helpers"]


def write(path: Path, docs: list[Any] | str) -> None:
    """Replace the file atomically (as a ConfigMap update does), YAML documents or raw text."""
    text = docs if isinstance(docs, str) else yaml.safe_dump_all(docs)
    staged = path.with_name(path.name + ".new")
    staged.write_text(text)
    os.replace(staged, path)


# ----- parsing -------------------------------------------------------------------------------------------------


def test_every_document_and_list_item_is_a_pod(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    pod_list = {"apiVersion": "v1", "kind": "List", "items": [pod_manifest("b", "s3://x/b/"),
                                                              pod_manifest("c", None, namespace="ns")]}
    write(path, [pod_manifest("a", "s3://x/a/", gate=True), None, pod_list])
    pods = read_pods_file(path)
    assert [(p.key, p.annotation, p.has_gate) for p in pods] == [
        ("default/a", "s3://x/a/", True), ("default/b", "s3://x/b/", False), ("ns/c", None, False)]


def test_a_pod_without_a_uid_gets_a_stable_one(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    write(path, [pod_manifest("a", "s3://x/a/")])
    first = read_pods_file(path)[0].uid
    write(path, [pod_manifest("a", "s3://x/other/")])
    assert read_pods_file(path)[0].uid == first, "an edit of the same pod is an update, not a new pod"


@pytest.mark.parametrize(("text", "complaint"), [
    ("a: [b\n", "not valid YAML"),
    ("kind: Deployment\nmetadata: {name: d}\n", "document 1: expected kind Pod"),
    ("---\nmetadata: {name: ok}\n---\nmetadata: {namespace: x}\n", "document 2: pod has no metadata.name"),
    ("- just\n- a list\n", "expected a Pod mapping"),
])
def test_a_bad_file_is_refused_naming_the_problem(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "pods.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=complaint.replace("[", r"\[")):
        read_pods_file(path)


# ----- the polling watcher --------------------------------------------------------------------------------------


class Lists:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def on_list(self, pods: list[PodInfo]) -> None:
        self.calls.append(sorted(p.key for p in pods))


@contextlib.asynccontextmanager
async def polling(path: Path, lists: Lists) -> AsyncIterator[None]:
    task = asyncio.create_task(watch_pods_file(path, on_list=lists.on_list, interval=0.05), name="pods-file")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(predicate: Callable[[], Any], *, timeout: float = 5.0, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_an_edited_file_is_read_again(tmp_path: Path) -> None:
    path, lists = tmp_path / "pods.yaml", Lists()
    write(path, [pod_manifest("a", "s3://x/a/")])
    async with polling(path, lists):
        await eventually(lambda: lists.calls == [["default/a"]], what="the first read")
        write(path, [pod_manifest("a", "s3://x/a/"), pod_manifest("b", "s3://x/b/")])
        await eventually(lambda: lists.calls[-1] == ["default/a", "default/b"], what="the edit")
        await asyncio.sleep(0.2)
    assert len(lists.calls) == 2, "an unchanged file is not re-announced"


async def test_invalid_yaml_keeps_the_previous_pods(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, lists = tmp_path / "pods.yaml", Lists()
    write(path, [pod_manifest("a", "s3://x/a/")])
    async with polling(path, lists):
        await eventually(lambda: lists.calls, what="the first read")
        write(path, "metadata: {name: [oops\n")
        await eventually(lambda: "keeping the previous pods" in caplog.text, what="the complaint")
        write(path, [pod_manifest("c", "s3://x/c/")])
        await eventually(lambda: lists.calls[-1] == ["default/c"], what="the fixed file")
    assert lists.calls == [["default/a"], ["default/c"]], "the typo never reached the reconciler"


async def test_a_missing_file_means_no_pods_until_it_appears(tmp_path: Path) -> None:
    path, lists = tmp_path / "pods.yaml", Lists()
    async with polling(path, lists):
        await eventually(lambda: lists.calls == [[]], what="an empty first listing")
        write(path, [pod_manifest("a", "s3://x/a/")])
        await eventually(lambda: lists.calls[-1] == ["default/a"], what="the file appearing")
        path.unlink()
        await eventually(lambda: lists.calls[-1] == [], what="the file removed")


# ----- the daemon with --pods-file ----------------------------------------------------------------------------


def test_the_daemon_follows_the_pods_file_while_it_runs(moto_s3: S3Server, models_bucket: str, tmp_path: Path,
                                                       agents: list[AgentProcess]) -> None:
    moto_s3.put(models_bucket, "m1/weights.bin", b"1" * 3000)
    moto_s3.put(models_bucket, "m2.bin", b"2" * 1000)
    m1, m2 = f"s3://{models_bucket}/m1/", f"s3://{models_bucket}/m2.bin"
    root, pods = tmp_path / "cache", tmp_path / "pods.yaml"
    write(pods, [pod_manifest("p1", m1)])
    env = agent_environment(s3=moto_s3, root=root)
    del env["NODE_NAME"]  # no cluster at all
    agent = start_agent(agents, env, tmp_path / "agent.log", args=("run", "--pods-file", str(pods)))

    def pins() -> set[str]:
        try:
            return set(json.loads((root / "state" / "pins.json").read_text())["model_ids"])
        except FileNotFoundError:
            return set()

    def states() -> dict[str, str]:
        status, body = agent.get("/v1/models")
        return {m["uri"]: m["state"] for m in json.loads(body)["models"]} if status == 200 else {}

    wait_until(lambda: states().get(m1) == "ready", what="p1's model ready", agent=agent)
    assert "default/p1 WeightsReady" in agent.log_text(), "events become log lines without a cluster"

    write(pods, [pod_manifest("p2", m2)])  # p1 gone, p2 new
    wait_until(lambda: states().get(m2) == "ready", what="p2's model ready", agent=agent)
    wait_until(lambda: pins() == {parse_model_uri(m2).model_id}, what="p1's model unpinned", agent=agent)

    write(pods, "- metadata: {name: [broken\n")
    wait_until(lambda: "keeping the previous pods" in agent.log_text(), what="the typo noticed", agent=agent)
    time.sleep(0.5)  # a few polls: the previous state must survive them
    assert pins() == {parse_model_uri(m2).model_id}
    assert agent.get("/healthz")[0] == 200
