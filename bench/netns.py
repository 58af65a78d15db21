"""Separate hosts on one machine: network namespaces joined by a bridge, with links shaped by ``tc``.

Why: a benchmark of nodes that fetch from S3 *and from each other* must measure the design, not one loopback
interface. Here each "host" (the S3 server, every node) is its own network namespace with one veth into a Linux
bridge, and the links have rates: the S3 server's egress is one shared cap (HTB, one fair leaf per node: the
kernels we run on have no fq/sfq, and a single FIFO lets one TCP flow hog the queue), every node's link a higher
one (TBF each way). The bridge lives in a namespace of its own, so the root namespace's interfaces, routes and
qdiscs are never touched; the only trace outside is ``/run/netns/<name>``.

Names carry a per-run tag ``<prefix>-<owner pid>-<4 hex>``: two runs never clash, and :func:`sweep_stale` deletes
only the leftovers of runs whose owner is dead (a killed benchmark), never a live run's. Interface names stay
within 15 bytes. Cleanup (every process started here killed, every namespace deleted) runs on exceptions, Ctrl-C
and SIGTERM; signals are held off while it runs so a second Ctrl-C cannot leave half a topology behind.

Needs root and iproute2 (``ip``, ``tc``); the kernel needs veth, bridge, htb, tbf and the u32 classifier.
This module must never change anything in the root namespace.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Self

PREFIX = "wcnet"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
STOP_GRACE_S = 10.0
_NAME = re.compile(r"^(?P<tag>(?P<prefix>.+)-(?P<pid>\d+)-[0-9a-f]{4})-(?P<role>[a-z0-9]+)$")
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed, or the machine cannot build namespaces at all."""


@dataclass(frozen=True)
class Host:
    """One simulated machine: a network namespace with one address on the bridge."""

    name: str  # the namespace's name (``ip netns exec <name>``)
    role: str  # "s3" or "n<i>"
    ip: str


def _binary(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)),
                                      None)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (None when they can): callers skip with this text."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    missing = [b for b in ("ip", "tc") if _binary(b) is None]
    return f"iproute2 missing: no {' or '.join(missing)} binary" if missing else None


def _run(*argv: str) -> str:
    tool = _binary(argv[0]) or argv[0]
    r = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with *this thread* in namespace ``name``: sockets created inside stay there.

    Lets the benchmark poll agents in their namespaces without a process per request and without giving the
    root namespace a leg on the bridge."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def namespaces(prefix: str) -> list[str]:
    """Namespace names that start with ``<prefix>-``."""
    out = _run("ip", "netns", "list")
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{prefix}-")]


def _pids(name: str) -> list[int]:
    try:
        return [int(p) for p in _run("ip", "netns", "pids", name).split()]
    except NetnsError:
        return []


def _delete(names: Sequence[str]) -> list[str]:
    """Kill whatever still runs in each namespace, then delete it (its veth ends go with it). Returns errors."""
    errors = []
    for name in names:
        for pid in _pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            _run("ip", "netns", "del", name)
        except NetnsError as e:
            if (NETNS_DIR / name).exists():
                errors.append(str(e))
    return errors


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces left by runs of ``prefix`` whose owner process is gone (killed -9, a crashed host).
    Returns the names deleted. Live runs' namespaces are left alone."""
    stale = []
    for name in namespaces(prefix):
        m = _NAME.match(name)
        if m and m["prefix"] == prefix and not _owner_alive(int(m["pid"])):
            stale.append(name)
    _delete(sorted(stale, key=lambda n: n.endswith("-br")))  # hosts first, the bridge last
    return stale


def _tbf(ns: str, dev: str, mbps: float) -> None:
    """Cap ``dev``'s egress at ``mbps`` megabytes/s. Burst: 10 ms at the rate, at least one 64 KiB GSO packet."""
    burst = max(64 * 1024, int(mbps * 1e6 * 0.01))
    _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(mbps * 8e6)}bit",
         "burst", str(burst), "latency", "50ms")


def _shared_cap(ns: str, dev: str, mbps: float, clients: Sequence[str]) -> None:
    """One cap for all of ``dev``'s egress, shared fairly: an HTB leaf per client address under one parent.
    A client alone borrows the whole cap; k active clients get 1/k each."""
    rate, burst = f"{int(mbps * 8e6)}bit", str(max(64 * 1024, int(mbps * 1e6 * 0.01)))
    share = f"{max(8000, int(mbps * 8e6 / max(1, len(clients))))}bit"
    tc = ("tc", "-n", ns)
    _run(*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "ff")
    _run(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate, "ceil", rate,
         "burst", burst, "cburst", burst, "quantum", "60000")
    for minor, ip in [("ff", None), *((f"{i + 16:x}", c) for i, c in enumerate(clients))]:
        _run(*tc, "class", "add", "dev", dev, "parent", "1:1", "classid", f"1:{minor}", "htb", "rate", share,
             "ceil", rate, "burst", burst, "cburst", burst, "quantum", "60000")
        if ip is not None:
            _run(*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                 "match", "ip", "dst", f"{ip}/32", "flowid", f"1:{minor}")


class Topology:
    """``with Topology(4) as t:`` — an S3 host and 4 node hosts on one bridge, shaped; all gone on exit.

    ``t.popen(t.nodes[0], argv)`` runs a process in a host; ``t.http_get(host, url)`` fetches from inside one."""

    def __init__(self, nodes: int, *, s3_mbps: float = 50.0, node_mbps: float = 1000.0, prefix: str = PREFIX,
                 handle_sigterm: bool = True) -> None:
        if not 1 <= nodes <= 200:
            raise ValueError("between 1 and 200 nodes")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", prefix):
            raise ValueError("prefix: lowercase letters and digits, at most 12")
        rand = secrets.token_hex(2)
        self.tag = f"{prefix}-{os.getpid()}-{rand}"
        self._short = rand  # interface names: "<4 hex><role>", 15 bytes at most
        a, b = secrets.randbelow(200) + 20, secrets.randbelow(254) + 1
        self.subnet = f"10.{a}.{b}.0/24"
        self.s3_mbps, self.node_mbps = s3_mbps, node_mbps
        self.bridge = f"{self.tag}-br"
        self.s3 = Host(f"{self.tag}-s3", "s3", f"10.{a}.{b}.2")
        self.nodes = [Host(f"{self.tag}-n{i}", f"n{i}", f"10.{a}.{b}.{10 + i}") for i in range(nodes)]
        self._procs: list[subprocess.Popen[bytes]] = []
        self._created: list[str] = []
        self._handle_sigterm = handle_sigterm
        self._old_sigterm: Any = None

    @property
    def hosts(self) -> list[Host]:
        return [self.s3, *self.nodes]

    def address(self, host: Host | str) -> str:
        return self._host(host).ip

    def _host(self, host: Host | str) -> Host:
        if isinstance(host, Host):
            return host
        return next(h for h in self.hosts if host in (h.name, h.role))

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._created.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        self._add_ns(self.bridge)
        br = f"{self._short}br"
        _run("ip", "-n", self.bridge, "link", "add", br, "type", "bridge")
        _run("ip", "-n", self.bridge, "link", "set", br, "up")
        for h in self.hosts:
            self._add_ns(h.name)
            leg = f"{self._short}{h.role}"
            _run("ip", "-n", self.bridge, "link", "add", leg, "type", "veth", "peer", "name", "eth0",
                 "netns", h.name)
            _run("ip", "-n", self.bridge, "link", "set", leg, "master", br, "up")
            _run("ip", "-n", h.name, "addr", "add", f"{h.ip}/24", "dev", "eth0")
            _run("ip", "-n", h.name, "link", "set", "eth0", "up")
            if h is self.s3:
                _shared_cap(h.name, "eth0", self.s3_mbps, [n.ip for n in self.nodes])
            else:
                _tbf(h.name, "eth0", self.node_mbps)  # the node's upload
                _tbf(self.bridge, leg, self.node_mbps)  # its download (S3's share is capped before this)

    def popen(self, host: Host | str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None, stdout: int | IO[Any] | None = None,
              stderr: int | IO[Any] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host`` (``ip netns exec`` execs in place: the pid is the program's own),
        in its own session so it can be signalled as a group; killed at cleanup if still running."""
        ip = _binary("ip") or "ip"
        proc = subprocess.Popen([ip, "netns", "exec", self._host(host).name, *argv],
                                env=dict(env) if env is not None else None, cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True)
        self._procs.append(proc)
        return proc

    def http_get(self, host: Host | str, url: str, *, timeout: float = 2.0) -> bytes:
        """GET ``url`` from inside ``host``'s namespace (urllib's errors propagate)."""
        with entered(self._host(host).name), urllib.request.urlopen(url, timeout=timeout) as r:
            return bytes(r.read())

    def stop(self, proc: subprocess.Popen[bytes], *, grace: float = STOP_GRACE_S) -> int:
        """SIGTERM the process, wait ``grace`` seconds, then SIGKILL its group. Returns its exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            return proc.wait()

    def close(self) -> None:
        """Kill every process started here, then delete the namespaces (hosts first, the bridge last)."""
        main = threading.current_thread() is threading.main_thread()
        if main:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for p in self._procs:
                if p.poll() is None:
                    _killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + 3.0
            for p in self._procs:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _killpg(p.pid)
                    p.wait()
            self._procs.clear()
            errors = _delete(list(reversed(self._created)))
            self._created.clear()
        finally:
            if main:
                if self._old_sigterm is not None:
                    signal.signal(signal.SIGTERM, self._old_sigterm)
                    self._old_sigterm = None
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if errors:
            raise NetnsError("cleanup left namespaces behind: " + "; ".join(errors))

    def __enter__(self) -> Self:
        reason = unavailable_reason()
        if reason:
            raise NetnsError(reason)
        if self._handle_sigterm and threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    """SIGTERM → SystemExit, so ``with Topology(...)`` unwinds and cleans up as it does for Ctrl-C."""
    raise SystemExit(128 + signum)


def _killpg(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
