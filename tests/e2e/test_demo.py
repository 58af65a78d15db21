"""``python -m demo`` — the README's main job — runs end to end, reports, and cleans up after itself.

The demo is what a newcomer runs first, so it is tested as they run it: one command, a small model, exit 0, the
report on stdout, and afterwards no process (rclone, agent, servers) and no work directory left behind.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.helpers import Children, python_module

# A real run takes ~6 s here; the bound leaves room for a busy machine yet keeps a hang from stalling CI.
DEMO_TIMEOUT_S = 60

pytestmark = [pytest.mark.slow, pytest.mark.timeout(DEMO_TIMEOUT_S + 30)]


def test_the_demo_runs_end_to_end_and_leaves_nothing_behind(tmp_path: Path) -> None:
    procs = Children(tmp_path)
    t = time.monotonic()
    try:
        done = subprocess.run(python_module("demo", "--size", "16MiB"), check=False, env=procs.env(),
                              capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, start_new_session=True)
    finally:
        leftovers = procs.leftovers()
        procs.kill_all()
    took = time.monotonic() - t
    output = f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    assert done.returncode == 0, output
    assert took < DEMO_TIMEOUT_S
    assert "weightcache demo report" in done.stdout, output
    assert re.search(r"cache requests\s+hit=1 miss=1", done.stdout), output
    assert "WeightsReady" in done.stdout, output
    assert leftovers == []
    removed = re.search(r"removed (\S+)\)", done.stdout)
    assert removed is not None, output
    assert not Path(removed.group(1)).exists()
