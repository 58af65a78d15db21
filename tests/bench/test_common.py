"""bench/common.py: the VM's free page reporting is held off while a benchmark runs, and always given back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import machine_note, page_reporting_held

REPO = Path(__file__).resolve().parents[2]


def test_the_order_is_raised_while_held_and_restored_after(tmp_path: Path) -> None:
    setting = tmp_path / "page_reporting_order"
    setting.write_text("9\n")
    with page_reporting_held(setting) as held:
        assert held
        assert setting.read_text().strip() == "11"  # above the largest order: nothing is reported
        assert "free page reporting held off" in machine_note()
    assert setting.read_text().strip() == "9"
    assert "free page reporting" not in machine_note()


def test_an_error_inside_still_restores_it(tmp_path: Path) -> None:
    setting = tmp_path / "page_reporting_order"
    setting.write_text("9\n")
    with pytest.raises(RuntimeError), page_reporting_held(setting):
        raise RuntimeError("benchmark failed")
    assert setting.read_text().strip() == "9"


def test_a_vm_without_the_setting_is_measured_as_it_is(tmp_path: Path) -> None:
    with page_reporting_held(tmp_path / "absent") as held:
        assert not held
    assert not (tmp_path / "absent").exists()


def test_sigterm_restores_it(tmp_path: Path) -> None:
    setting = tmp_path / "page_reporting_order"
    setting.write_text("9\n")
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom bench.common import page_reporting_held\n"
        "with page_reporting_held(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(setting)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "BENCH_KEEP_PAGE_REPORTING": ""})
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    assert setting.read_text().strip() == "11"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert setting.read_text().strip() == "9"
