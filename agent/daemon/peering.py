"""Peer exchange for the daemon: whether it is on, the peer server, the swarm that fetches use, and membership.

On only with a token file (``WEIGHTCACHE_PEER_TOKEN_FILE``): every agent of a cluster shares one Secret, and a
caller without it gets nothing. Peers come from ``WEIGHTCACHE_PEERS`` or, in Kubernetes, from the agent's own pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from agent.config import AgentSettings
from agent.errors import ConfigError
from agent.store.cache import Cache
from agent.transfer.peerclient import Membership, PeerClient
from agent.transfer.peerserver import PeerServer, start_peer_server
from agent.transfer.peerwire import PeerToken
from agent.transfer.sourceboard import SourceBoard
from agent.transfer.swarm import Swarm

if TYPE_CHECKING:
    from agent.cluster.kube import KubeApi

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class Peering:
    """The peer side of one agent: built by :func:`open_peering`, closed by :meth:`aclose`."""

    def __init__(self, settings: AgentSettings, token: PeerToken) -> None:
        self.settings, self.token = settings, token
        self.membership = Membership(settings)
        self.client = PeerClient(settings, token, self.membership)
        self.swarm = Swarm(settings, self.client, self.membership)
        self._runner: web.AppRunner | None = None
        self._follow: asyncio.Task[None] | None = None

    async def start(self, cache: Cache, board: SourceBoard, kube_api: KubeApi | None) -> None:
        self._runner = await start_peer_server(PeerServer(cache, board, self.token), host=self.settings.peer_host,
                                               port=self.settings.peer_port)
        if self.membership.static:
            log.info("peers (static): %s", ", ".join(map(str, self.membership.peers())) or "none")
        elif kube_api is not None:
            namespace = self.settings.pod_namespace or _own_namespace()
            if not namespace:
                log.warning("peer discovery off: POD_NAMESPACE unset and no service account namespace file")
                return
            selector = self.settings.peer_selector

            async def list_pods() -> list[str]:
                return await asyncio.to_thread(kube_api.list_agent_pod_ips, namespace, selector)

            self._follow = asyncio.create_task(self.membership.follow_pods(list_pods), name="peer-membership")
            log.info("peers: the pods %s in namespace %s", selector, namespace)
        else:
            log.warning("peer exchange serves others, but has no peers to ask: set WEIGHTCACHE_PEERS")

    async def aclose(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
        if self._runner is not None:
            await self._runner.cleanup()
        await self.client.aclose()


def open_peering(settings: AgentSettings) -> Peering | None:
    """Peering if a token file is configured and readable; else None, and the log says why."""
    if settings.peer_token_file is None:
        log.info("peer exchange off: no WEIGHTCACHE_PEER_TOKEN_FILE (every node fetches from S3 on its own)")
        return None
    try:
        token = PeerToken(settings.peer_token_file)
    except ConfigError as e:
        log.warning("peer exchange off: %s", e)
        return None
    return Peering(settings, token)


def _own_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text("utf-8").strip()
    except OSError:
        return ""
