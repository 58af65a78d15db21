"""The namespace harness of the scale-up benchmark (``bench/netns.py``): hosts reach each other, and nothing stays.

Needs root and iproute2; skipped (with the reason) without them. Bounded: a few seconds.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import netns

REASON = netns.unavailable_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"bench/netns.py: {REASON}"),
              pytest.mark.timeout(20)]
PREFIX = "wctest"
REPO = Path(__file__).resolve().parents[2]

CLIENT = """
import sys, time, urllib.request
deadline = time.monotonic() + 5
while True:
    try:
        print(urllib.request.urlopen(sys.argv[1], timeout=1).read().decode(), end="")
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
"""


def test_a_node_reaches_a_server_in_another_namespace_and_cleanup_leaves_nothing(tmp_path: Path) -> None:
    with netns.Topology(2, s3_mbps=20, node_mbps=100, prefix=PREFIX) as topo:
        names = [h.name for h in topo.hosts] + [topo.bridge]
        assert sorted(netns.namespaces(topo.tag)) == sorted(names)
        server, client = topo.nodes
        (tmp_path / "served.txt").write_text("hello")
        topo.popen(server, [sys.executable, "-m", "http.server", "--bind", server.ip, "8000"], cwd=tmp_path,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = topo.popen(client, [sys.executable, "-c", CLIENT, f"http://{server.ip}:8000/served.txt"],
                         stdout=subprocess.PIPE)
        stdout, _ = out.communicate(timeout=10)
        assert out.returncode == 0 and stdout == b"hello"
        assert topo.http_get(topo.s3, f"http://{server.ip}:8000/served.txt") == b"hello"  # from a third host
    assert netns.namespaces(topo.tag) == []


def _root_network() -> tuple[str, str]:
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "route", "show"], capture_output=True, text=True, check=True).stdout
    return "\n".join(line.split(":")[1] for line in links.splitlines()), routes


def test_the_root_namespace_networking_is_untouched() -> None:
    before = _root_network()
    with netns.Topology(2, prefix=PREFIX):
        assert _root_network() == before
    assert _root_network() == before


def test_sweep_stale_removes_only_namespaces_of_dead_owners() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}-{dead.pid}-abcd-n0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with netns.Topology(1, prefix=PREFIX) as live:
            swept = netns.sweep_stale(PREFIX)
            assert stale in swept
            assert not set(swept) & {h.name for h in live.hosts}
            assert sorted(netns.namespaces(live.tag)) == sorted([h.name for h in live.hosts] + [live.bridge])
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)
    assert stale not in netns.namespaces(PREFIX)


HOLDER = """
import signal, sys, time
from bench.netns import Topology
# As in a terminal: a shell's background job (CI started with `&`) inherits SIGINT ignored, and Python keeps that.
signal.signal(signal.SIGINT, signal.default_int_handler)
with Topology(1, prefix=sys.argv[1]) as topo:
    sleeper = topo.popen(topo.nodes[0], ["sleep", "60"])
    print(topo.tag, sleeper.pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_kills_its_processes_and_deletes_its_namespaces(sig: signal.Signals) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, PREFIX], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    tag, sleeper = holder.stdout.readline().split()
    holder.send_signal(sig)
    holder.wait(10)
    assert netns.namespaces(tag) == []
    assert not Path(f"/proc/{sleeper}").exists()
