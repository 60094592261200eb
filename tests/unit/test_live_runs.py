"""`testbed clean` leaves a live run alone: a run's orchestrator holds a marker while it runs,
and clean refuses that run (or every run, when none is named) unless forced."""
from __future__ import annotations

import subprocess
import sys

import pytest

from emulation.cleanup import LIVE_DIR_ENV, LiveRun, LiveRunError, clean, live_runs

HOLDER = "import sys, time; from emulation.cleanup import LiveRun\nwith LiveRun(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"


@pytest.fixture
def holder(tmp_path, monkeypatch):
    """Another process that holds run 'alive-run' as live, as a run's orchestrator does."""
    monkeypatch.setenv(LIVE_DIR_ENV, str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, "alive-run"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_run_is_refused_by_name_and_by_default(holder):
    assert live_runs() == {"alive-run": holder.pid}
    with pytest.raises(LiveRunError, match=rf"still running: alive-run \(pid {holder.pid}\)"):
        clean()
    with pytest.raises(LiveRunError, match="alive-run"):
        clean(run_id="alive-run")
    assert clean(run_id="some-crashed-run") == []  # another run's leftovers may still be cleaned
    assert holder.poll() is None, "the live run's orchestrator was not touched"


def test_a_dead_orchestrators_marker_does_not_count(holder):
    holder.kill()
    holder.wait()
    assert live_runs() == {}


def test_the_marker_lives_as_long_as_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(LIVE_DIR_ENV, str(tmp_path))
    with LiveRun("mine"):
        assert set(live_runs()) == {"mine"}
        clean(run_id="mine-other")  # this process's own run does not block it
    assert live_runs() == {} and not list(tmp_path.iterdir())
