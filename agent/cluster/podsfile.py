"""``--pods-file``: Pod manifests from a YAML file (one or many documents, or a List) that may change while the
agent runs — the same pipeline as the Kubernetes watch, without a cluster (demos, tests, bare-metal nodes).

The file is re-read when its content changes (polled: ConfigMap mounts swap symlinks, which inotify misses).
An unreadable or invalid file is logged and the previous state kept: a typo never unpins every model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from agent.cluster.pods import PodFormatError, PodInfo, pod_from_dict

log = logging.getLogger(__name__)


def read_pods_file(path: Path) -> list[PodInfo]:
    """Parse every Pod in the file; raise ValueError naming the first bad document."""
    text = path.read_text("utf-8")
    pods: list[PodInfo] = []
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        items: list[Any] = doc.get("items", []) if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
        for item in items:
            try:
                pods.append(pod_from_dict(item))
            except PodFormatError as e:
                raise ValueError(f"{path}: document {i + 1}: {e}") from e
    return pods


async def watch_pods_file(path: Path, *, on_list: Callable[[list[PodInfo]], Awaitable[None]],
                          interval: float = 1.0) -> None:
    """Call ``on_list`` with the file's pods at start and whenever its content changes."""
    last_digest: str | None = None
    first = True
    while True:
        try:
            data = await asyncio.to_thread(path.read_bytes)
            digest = hashlib.sha256(data).hexdigest()
            if digest != last_digest:
                pods = await asyncio.to_thread(read_pods_file, path)
                last_digest = digest
                log.info("pods file %s: %d pods", path, len(pods))
                await on_list(pods)
        except FileNotFoundError:
            if first or last_digest is not None:
                log.warning("pods file %s does not exist (yet); no pods", path)
                last_digest = None
                await on_list([])
        except (OSError, ValueError, UnicodeDecodeError) as e:
            log.error("cannot read pods file (keeping the previous pods): %s", e)
        first = False
        await asyncio.sleep(interval)
