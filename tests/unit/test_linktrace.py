"""Links and availability over time: trace files, the two generators, the transport's piecewise
link, and the injector replaying them (expected values worked by hand in each test)."""
from __future__ import annotations

import numpy as np
import pytest

from emulation.launch import Launcher
from node.device import Emulated
from node.shaping import Link
from testbed.faults import Injector
from testbed.linktrace import (TraceError, gilbert_elliott, load_availability, load_rate_trace, markov_on_off)
from testbed.scenario import ScenarioError, expand_nodes, parse
from tests.unit.test_fault_injector import BASE, Agg, Recorder


def _csv(tmp_path, text, name="t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


# -- rate traces ----------------------------------------------------------------------------------
def test_a_held_trace_is_a_step_function_that_keeps_its_last_rates(tmp_path):
    (tr,) = set(load_rate_trace(_csv(tmp_path, "time_s,uplink_mbit,downlink_mbit\n0,10,20\n5,2,4\n# a comment\n"
                                                 "12.5,1,8\n"), ["pi-0", "pi-1"]).values())
    assert [tr.at(t) for t in (0, 4.99, 5, 12.4, 12.5, 1e6)] == [(10, 20), (10, 20), (2, 4), (2, 4), (1, 8), (1, 8)]
    assert [tr.next_change(t) for t in (0, 5, 12.5)] == [5, 12.5, None]
    assert tr.schedule(3, 13) == [(3, 10, 20), (5, 2, 4), (12.5, 1, 8)]


def test_a_looped_trace_starts_over_after_its_period(tmp_path):
    f = _csv(tmp_path, "time_s,uplink_mbit,downlink_mbit\n0,10,10\n4,1,1\n")
    tr = load_rate_trace(f, ["pi-0"], end="loop")["pi-0"]  # period: 4 + the gap before the last row (4) = 8
    assert tr.period_s == 8
    assert [tr.at(t) for t in (3.9, 4, 7.9, 8, 12, 17)] == [(10, 10), (1, 1), (1, 1), (10, 10), (1, 1), (10, 10)]
    assert [tr.next_change(t) for t in (0, 4, 8, 9)] == [4, 8, 12, 12]
    assert load_rate_trace(f, ["pi-0"], end="loop", period_s=5)["pi-0"].at(5.5) == (10, 10)


def test_a_per_node_trace_leaves_the_nodes_it_does_not_list_alone(tmp_path):
    f = _csv(tmp_path, "node,time_s,uplink_mbit,downlink_mbit\npi-1,0,3,3\npi-0,0,5,6\npi-0,1,7,8\n")
    traces = load_rate_trace(f, ["pi-0", "pi-1", "pi-2"])
    assert set(traces) == {"pi-0", "pi-1"} and traces["pi-0"].at(2) == (7, 8) and traces["pi-1"].at(2) == (3, 3)


HEAD = "time_s,uplink_mbit,downlink_mbit\n"


@pytest.mark.parametrize("text, needle", [
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    (HEAD, "a header and no rows"),
    ("time,up,down\n0,1,1\n", "line 1: the header must be time_s,uplink_mbit,downlink_mbit"),
    (HEAD + "1,5,5\n", "line 2: a trace starts at time_s 0"),
    (HEAD + "0,5,5\n3,5,5\n2,5,5\n", "line 4: time_s must increase, got 2 after 3"),
    (HEAD + "0,5,5\n3,5,5\n3,1,1\n", "line 4: time_s must increase"),
    (HEAD + "0,-5,5\n", "line 2: rates must be > 0 Mbit/s, got -5, 5"),
    (HEAD + "0,5,0\n", "line 2: rates must be > 0"),
    (HEAD + "0,fast,5\n", "line 2: time_s, uplink_mbit and downlink_mbit must be numbers"),
    (HEAD + "0,inf,5\n", "must be finite"),
    (HEAD + "0,5\n", "line 2: expected 3 fields"),
    ("node," + HEAD + "nx-0,0,5,5\n", "line 2: unknown node 'nx-0'; this group's nodes are pi-0, pi-1"),
])
def test_bad_rate_traces_name_the_file_and_line(tmp_path, text, needle):
    f = _csv(tmp_path, text)
    with pytest.raises(TraceError, match=needle.replace("(", r"\(")) as exc:
        load_rate_trace(f, ["pi-0", "pi-1"])
    assert str(exc.value).startswith(str(f))


def test_a_loop_period_must_outlast_the_trace(tmp_path):
    with pytest.raises(TraceError, match="period_s 3 must exceed the last time_s \\(4\\)"):
        load_rate_trace(_csv(tmp_path, HEAD + "0,1,1\n4,2,2\n"), ["pi-0"], end="loop", period_s=3)


def test_gilbert_elliott_scales_the_profile_and_spends_its_long_run_share_in_the_bad_state():
    p_gb, p_bg = 0.1, 0.3
    tr = gilbert_elliott(10.0, 40.0, p_gb, p_bg, bad_factor=0.25, good_factor=1.0, step_s=2.0, seed=[1, "pi-0"])
    rates = [tr.at(2.0 * k) for k in range(40_000)]
    assert set(rates) == {(10.0, 40.0), (2.5, 10.0)}
    bad = np.array([r == (2.5, 10.0) for r in rates])
    assert bad.mean() == pytest.approx(p_gb / (p_gb + p_bg), abs=0.02)     # stationary share 0.25
    runs = np.diff(np.flatnonzero(np.diff(bad.astype(int)) != 0))          # lengths of the runs between switches
    assert runs.mean() == pytest.approx((1 / p_gb + 1 / p_bg) / 2, rel=0.1)  # geometric: 10 and 3.33 steps
    assert tr.at(3.9) == tr.at(2.0) and tr.next_change(3.9) == 4.0
    again = gilbert_elliott(10.0, 40.0, p_gb, p_bg, 0.25, 1.0, 2.0, seed=[1, "pi-0"])
    assert [again.at(2.0 * k) for k in range(500)] == rates[:500], "seeded: the same link under every strategy"


# -- availability -------------------------------------------------------------------------------
def test_markov_on_off_has_the_given_mean_times_and_online_share():
    iv = markov_on_off(30.0, 10.0, seed=[3, "pi-0"])
    iv.online_at(400_000.0)
    spans = iv.spans
    on = np.array([hi - lo for lo, hi in spans])
    off = np.array([b[0] - a[1] for a, b in zip(spans, spans[1:])])
    assert on.mean() == pytest.approx(30.0, rel=0.05) and off.mean() == pytest.approx(10.0, rel=0.05)
    assert on.sum() / spans[-1][1] == pytest.approx(0.75, abs=0.02)
    lo, hi = spans[3]
    assert iv.online_at(lo) and iv.online_at((lo + hi) / 2) and not iv.online_at(hi)
    assert iv.next_change(lo) == hi and iv.next_change(hi) == spans[4][0]


def test_availability_intervals_must_be_in_order(tmp_path):
    with pytest.raises(TraceError, match="line 3: pi-0's intervals must be in order and not overlap"):
        load_availability(_csv(tmp_path, "node,online_from_s,online_to_s\npi-0,0,10\npi-0,5,20\n"), {"pi-0"})
    with pytest.raises(TraceError, match="the file is empty"):
        load_availability(_csv(tmp_path, ""), {"pi-0"})


# -- the transport ------------------------------------------------------------------------------
class FakeTime:
    def __init__(self):
        self.t = 0.0

    def clock(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_a_message_that_crosses_a_step_is_sent_at_each_rate_for_its_part():
    ft = FakeTime()
    link = Link(8.0, 0.0, ft.clock, ft.sleep, schedule=[(1.0, 16.0), (3.0, 80.0)])  # 1, then 2, then 10 MB/s
    assert link.transfer(1_500_000) == pytest.approx(1.25)   # 1 MB in the first second, 0.5 MB at 2 MB/s
    assert link.transfer(4_000_000) == pytest.approx(1.8)    # 3.5 MB at 2 MB/s up to 3 s, 0.5 MB at 10 MB/s
    assert link.delay_for(1_000_000, at=0.5) == pytest.approx(0.75)
    assert Link(8.0, 20.0, ft.clock, ft.sleep).delay_for(1_000_000) == pytest.approx(1.02), "constant: as before"


def test_the_device_carries_its_trace_steps_over_the_wire():
    dev = Emulated(0.5, "wall", 4.0, 8.0, 0.0, ((0.0, 4.0, 8.0), (2.5, 1.0, 2.0)))
    assert Emulated.from_dict({**dev.to_dict(), "rate_steps": [[0, 4, 8], [2.5, 1, 2]]}) == dev
    with pytest.raises(ValueError, match="rate_steps must be a list"):
        Emulated.from_dict({**dev.to_dict(), "rate_steps": [[0, "fast", 8]]})
    with pytest.raises(ValueError, match="numbers >= 0"):
        Emulated.from_dict({**dev.to_dict(), "rate_steps": [[0, -1, 8]]})


# -- the injector ------------------------------------------------------------------------------
@pytest.fixture
def clock(monkeypatch):
    from tests.unit.test_fault_injector import Clock
    c = Clock()
    monkeypatch.setattr("testbed.faults.time.monotonic", c)
    return c


def _injector(tmp_path, nodes_extra=None, faults=None, dilation=1.0):
    f = _csv(tmp_path, HEAD + "0,20,40\n3,5,10\n", "link.csv")
    groups = [{**BASE["nodes"][0], "link_trace": {"file": str(f)}, **(nodes_extra or {})}, BASE["nodes"][1]]
    sc = parse({**BASE, "nodes": groups, "faults": faults or {}})
    backend, agg = Recorder(), Agg()
    agg.busy = set()
    inj = Injector(sc, expand_nodes(sc), backend, dilation)
    inj.begin_strategy("fedlora", agg, Launcher("run", "tcp://x", dilation))
    return inj, backend, agg


def test_the_injector_replays_a_trace_on_the_strategys_clock(tmp_path, clock):
    inj, b, _ = _injector(tmp_path, dilation=2.0)
    first = {l.name: (l.limits.uplink_mbit, l.limits.downlink_mbit) for l in b.launches}
    assert first == {f"pi-{i}": (10.0, 20.0) for i in range(3)}, "time 0: the first row, at the dilation 2"
    inj.begin_round(1, 0.0)
    clock.t += 5.9                                        # 2.95 emulated seconds
    assert inj.tick() == pytest.approx(0.1) and len(b.launches) == 3
    clock.t += 0.2
    inj.tick()
    assert [(l.name, l.limits.uplink_mbit) for l in b.launches[3:]] == [(f"pi-{i}", 2.5) for i in range(3)]
    assert inj.profile_now("pi-0").downlink_mbit == 10 and inj.current["pi-0"].downlink_mbit != 10
    inj.end_round()
    inj.end_strategy()
    inj.begin_strategy("full", inj.agg, inj.launcher)     # the next strategy starts the trace over
    assert [l.limits.uplink_mbit for l in b.launches[6:]] == [10.0] * 3 and inj.rate_steps == 9


def test_the_transport_schedule_is_in_wall_seconds_at_the_dilated_rates(tmp_path, clock):
    inj, _, _ = _injector(tmp_path, dilation=2.0)
    inj.begin_round(1, 1.0)                               # one emulated second in: the step is 2 s away
    assert inj.transport_schedule("pi-0", 10.0) == [(0.0, 10.0, 20.0), (4.0, 2.5, 5.0)]


def test_a_node_that_goes_offline_mid_round_loses_its_work_and_is_paused_until_it_is_back(tmp_path, clock):
    av = _csv(tmp_path, "node,online_from_s,online_to_s\npi-0,0,2\npi-0,6,100\n", "av.csv")
    inj, b, agg = _injector(tmp_path, faults={"availability": {"trace": str(av)}})
    inj.begin_round(1, 0.0)
    agg.busy = {"pi-0"}
    clock.t += 2.5
    inj.tick()
    assert ("pause", "pi-0") in b.calls and inj.gone == {"pi-0"}
    assert inj.why_failed("pi-0") == "went offline at 2.0 s (faults.availability)"
    (rec,) = [r for r in inj.end_round() if r["type"] == "offline"]
    assert rec["node"] == "pi-0" and rec["at_s"] == 2.0 and "paused" in rec["how"]
    assert "pi-0" not in inj.online(2, 2.5)
    inj.begin_round(2, 2.5)
    clock.t += 4
    inj.tick()
    assert b.calls[-1] == ("resume", "pi-0") and not inj.offline and "pi-0" in inj.online(3, 6.5)


def test_an_idle_node_that_goes_offline_is_only_left_out(tmp_path, clock):
    inj, b, _ = _injector(tmp_path, faults={"availability": {"markov": {"mean_on_s": 5, "mean_off_s": 5}}})
    inj.begin_round(1, 0.0)
    clock.t += 200
    inj.tick()
    assert not any(c[0] == "pause" for c in b.calls) and not inj.gone
    assert set(inj.intervals) == {"pi-0", "pi-1", "pi-2", "agx-0"}
    assert 0 < sum(len(inj.online(r, 10.0 * r)) for r in range(1, 20)) < 4 * 19


# -- the scenario -------------------------------------------------------------------------------
@pytest.mark.parametrize("group, faults, needle", [
    ({"link_trace": {"gilbert_elliott": {"p_good_to_bad": 0.1, "p_bad_to_good": 0.5, "bad_factor": 0.2}},
      "profile": "rpi5", "overrides": {"uplink_mbit": 0}}, {},
     "nodes[0].link_trace.gilbert_elliott: it scales the profile's rates, and rpi5's uplink_mbit is 0"),
    ({"link_trace": {"file": "x.csv"}, "backend": "remote"}, {}, "nodes[0].link_trace: group pi is remote"),
    ({"link_trace": {}}, {}, "give exactly one of file or gilbert_elliott"),
    ({"link_trace": {"file": "x.csv", "period_s": 5}}, {}, "period_s goes with end: loop"),
    ({}, {"availability": {"markov": {"mean_on_s": 1, "mean_off_s": 1, "nodes": ["tx2"]}}},
     "faults.availability.markov.nodes: unknown node or group ['tx2']"),
    ({}, {"availability": {"trace": "a.csv", "markov": {"mean_on_s": 1, "mean_off_s": 1}}},
     "give at most one of trace or markov"),
])
def test_bad_link_and_availability_settings_fail_validation(group, faults, needle):
    with pytest.raises(ScenarioError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        parse({**BASE, "nodes": [{**BASE["nodes"][0], **group}, BASE["nodes"][1]], "faults": faults}, "s.yaml")


def test_a_bad_trace_file_fails_validation_naming_the_field(tmp_path):
    (tmp_path / "link.csv").write_text(HEAD + "0,5,5\n2,-1,5\n")
    import yaml
    scn = tmp_path / "s.yaml"
    scn.write_text(yaml.safe_dump({**BASE, "nodes": [{**BASE["nodes"][0], "link_trace": {"file": "link.csv"}},
                                                     BASE["nodes"][1]]}))
    from testbed.scenario import load
    with pytest.raises(ScenarioError, match=r"s.yaml: nodes\[0\].link_trace.file: .*link.csv line 3: rates must be > 0"):
        load(str(scn))


def test_a_looped_trace_of_fractional_times_always_moves_on(tmp_path):
    tr = load_rate_trace(_csv(tmp_path, HEAD + "0,1,1\n0.1,2,2\n0.2,3,3\n"), ["pi-0"], end="loop", period_s=0.3)["pi-0"]
    t, seen = 0.0, []
    for _ in range(3000):            # 1000 periods of 0.3 s, stepped edge to edge
        nxt = tr.next_change(t)
        assert nxt > t
        seen.append(tr.at(nxt)[0])
        t = nxt
    assert seen[:6] == [2, 3, 1, 2, 3, 1] and seen[-3:] == [2, 3, 1]
    assert t == pytest.approx(300.0)
