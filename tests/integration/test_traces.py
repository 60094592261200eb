"""Links and availability over time with real processes: scenarios/traces-ci.yaml on the machine's
default backend (netns as root, where htb follows the trace; the process backend elsewhere, where
the node's transport replays it)."""
from __future__ import annotations

import csv

import pytest

from emulation.cleanup import tagged_processes
from tests.runs import ROOT, kill_run_processes, run_scenario

# serial: it measures the links' rates over time
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.serial]


@pytest.fixture(scope="module")
def traces_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("traces") / "run"
    yield run_scenario("scenarios/traces-ci.yaml", out, timeout=900)
    kill_run_processes(out)


def _example_steps():
    """The example trace read here with csv alone: (time, up, down) rows and the loop's period."""
    rows = [r for r in csv.reader((ROOT / "scenarios/traces/example-link.csv").read_text().splitlines())
            if r and not r[0].startswith("#")][1:]
    steps = [tuple(map(float, r)) for r in rows]
    return steps, steps[-1][0] + (steps[-1][0] - steps[-2][0])


def _rate_over(steps, period, t0, t1):
    """The uplink rate if it is the same all through [t0, t1], else None."""
    def up(t):
        t %= period
        return [s for s in steps if s[0] <= t][-1][1]
    edges = [k * period + s[0] for k in range(int(t1 // period) + 1) for s in steps]
    return up(t0) if not any(t0 < e <= t1 for e in edges) else None


def test_the_links_follow_their_traces(traces_run):
    assert traces_run.proc.returncode == 0, traces_run.tail()
    steps, period = _example_steps()
    checked = 0
    for r in traces_run.rows("fedlora"):
        start = r["elapsed_s"] - r["wall_s"]
        for n in r["nodes"]:
            if n["node"].startswith("pi"):
                t = start % period
                want = [s for s in steps if s[0] <= t][-1]
                assert (n["link_mbit"]["up"], n["link_mbit"]["down"]) == (want[1], want[2]), (r["round"], n)
                rate = _rate_over(steps, period, start, r["elapsed_s"])
                if n["status"] == "ok" and rate is not None:  # the link cannot be faster than its trace
                    floor = n["bytes_up"] * 8 / (rate * 1e6)  # (the profile's own 40 Mbit/s: 20-160x less)
                    assert n["upload_s"] >= 0.9 * floor, (r["round"], n, floor)
                    checked += 1
            elif n["node"].startswith("agx") and r["round"]:  # Gilbert-Elliott: the profile's 10 Mbit/s x 1 or 0.2
                assert n["link_mbit"]["up"] in (10.0, 2.0), n
    assert checked >= 2
    assert traces_run.manifest["faults"]["link_trace_steps"] >= 3


def test_a_node_that_goes_offline_mid_round_loses_that_rounds_work_and_comes_back(traces_run):
    r1 = traces_run.row("fedlora", 1)
    gone = next(n for n in r1["nodes"] if n["node"] == "pi-1")
    assert gone["status"] == "dropped" and gone["reason"].startswith("went offline at 0.3 s"), gone
    assert r1["participants"] == 3
    (ev,) = [e for e in r1["events"] if e["type"] == "offline"]
    assert ev["node"] == "pi-1" and ev["applied"]
    back = [n for r in traces_run.rows("fedlora") for n in r["nodes"] if n["node"] == "pi-1" and n["status"] == "ok"]
    assert back, "online again from 3 s: sampled once its stale task is done"
    assert traces_run.manifest["faults"]["dropped_offline"] == 1


def test_nothing_is_left_behind(traces_run):
    assert not tagged_processes(traces_run.run_id)
