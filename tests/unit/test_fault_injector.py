"""The fault injector's bookkeeping against a recording backend (the real backends are exercised
by tests/integration/test_faults.py)."""
from __future__ import annotations

import json

import pytest

from emulation.backends import FaultUnsupported
from emulation.launch import Launch, Launcher
from testbed.faults import Injector
from testbed.linktrace import TraceError, load_availability
from testbed.scenario import expand_nodes, parse

BASE = {
    "name": "f", "seed": 2, "model": {"num_layers": 2},
    "training": {"rounds": 5},
    "nodes": [{"group": "pi", "count": 3, "profile": "rpi5"}, {"group": "agx", "count": 1, "profile": "agx-xavier"}],
    "strategies": {"baseline": "fedlora", "run": [{"name": "fedlora"}, {"name": "full"}]},
}


class Recorder:
    """A backend that records calls; `links` says whether it can do link faults."""
    name = "recorder"

    def __init__(self, links: bool = True):
        self.calls, self.links, self.launches = [], links, []

    def __getattr__(self, action):
        if action not in ("kill", "pause", "resume", "cut_link", "restore_link", "reshape", "restart"):
            raise AttributeError(action)

        def call(node):
            if action in ("cut_link", "restore_link", "reshape") and not self.links:
                raise FaultUnsupported("links live in the transport here")
            if isinstance(node, Launch):  # restart and reshape get the node's whole launch
                self.launches.append(node)
                node = node.name
            self.calls.append((action, node))
        return call

    def set_profile(self, launch):
        self.launches.append(launch)
        self.calls.append(("set_profile", launch.name, launch.profile.name))
        return "live"


class Agg:
    def __init__(self):
        self.forgotten = []

    def forget(self, name):
        self.forgotten.append(name)


class Clock:
    """Stands in for time.monotonic: the tests move it by hand."""
    t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr("testbed.faults.time.monotonic", c)
    return c


def make(faults, links=True, dilation=1.0):
    sc = parse({**BASE, "faults": faults})
    backend, agg = Recorder(links), Agg()
    inj = Injector(sc, expand_nodes(sc), backend, dilation)
    inj.begin_strategy("fedlora", agg, Launcher("run", "tcp://x", dilation))
    return inj, backend, agg


def test_round_events_fire_before_the_tasks_and_mid_round_on_the_tick(clock):
    inj, b, _ = make({"events": [{"round": 2, "action": "pause", "nodes": ["pi-0"]},
                                 {"round": 2, "after_s": 3, "action": "kill", "nodes": ["pi-1"]}]}, dilation=2)
    inj.begin_round(1, 0.0)
    assert b.calls == [] and inj.end_round() == []
    inj.begin_round(2, 10.0)
    assert b.calls == [("pause", "pi-0")]
    clock.t += 5.9          # 2.95 emulated seconds at dilation 2: not yet
    assert inj.tick() == pytest.approx(0.1), "0.05 emulated s to the kill: 0.1 wall s at dilation 2"
    assert b.calls == [("pause", "pi-0")]
    clock.t += 0.2
    assert inj.tick() is None, "nothing left to wait for"
    assert b.calls[-1] == ("kill", "pi-1")
    recs = inj.end_round()
    assert [(r["action"], r["node"], r["applied"]) for r in recs] == [("pause", "pi-0", True), ("kill", "pi-1", True)]
    assert recs[1]["at_s"] == pytest.approx(13.05, abs=0.01)
    assert inj.why_failed("pi-1") == "killed by a fault event" and inj.why_failed("pi-0") == "paused by a fault event"


def test_an_event_the_round_did_not_last_for_happens_at_its_end_and_says_so(clock):
    inj, b, _ = make({"events": [{"round": 1, "after_s": 50, "action": "pause", "nodes": ["agx"]}]})
    inj.begin_round(1, 0.0)
    clock.t += 4
    (rec,) = inj.end_round()
    assert rec["applied"] and "applied at the end" in rec["note"] and b.calls == [("pause", "agx-0")]


def test_duration_undoes_the_fault_on_the_strategys_clock(clock):
    inj, b, _ = make({"events": [{"round": 1, "action": "cut_link", "nodes": ["pi-2"], "duration_s": 6}]})
    inj.begin_round(1, 0.0)
    clock.t += 4
    inj.end_round()
    inj.begin_round(2, 4.0)
    assert b.calls == [("cut_link", "pi-2")]
    clock.t += 2.5
    inj.tick()
    assert b.calls[-1] == ("restore_link", "pi-2")
    (rec,) = inj.end_round()
    assert rec["why"] == "end of duration_s 6" and inj.why_failed("pi-2") is None


def test_at_s_events_and_group_count_pick_the_same_nodes_every_strategy(clock):
    faults = {"events": [{"at_s": 5, "action": "pause", "nodes": ["pi"], "count": 2}]}
    inj, b, _ = make(faults)
    picked = inj.targets(0)
    assert len(picked) == 2 and set(picked) <= {"pi-0", "pi-1", "pi-2"}
    inj.begin_round(1, 0.0)
    clock.t += 6
    inj.tick()
    assert sorted(c[1] for c in b.calls) == picked
    again, _, _ = make(faults)
    assert again.targets(0) == picked


def test_a_fault_the_backend_cannot_do_is_recorded_not_applied_and_counted(clock):
    inj, b, _ = make({"events": [{"round": 1, "action": "cut_link", "nodes": ["pi-0"]},
                                 {"round": 1, "action": "kill", "nodes": ["pi-1"]},
                                 {"round": 2, "action": "pause", "nodes": ["pi-1"]}]}, links=False)
    inj.begin_round(1, 0.0)
    recs = inj.end_round()
    assert [(r["action"], r["applied"]) for r in recs] == [("cut_link", False), ("kill", True)]
    assert "transport" in recs[0]["how"]
    inj.begin_round(2, 1.0)
    (rec,) = inj.end_round()
    assert not rec["applied"] and "dead" in rec["how"], "a dead node cannot be paused"
    assert (inj.injected, inj.not_applied) == (1, 2)


def test_restart_forgets_the_registration_and_profile_changes_are_what_strategies_see(clock):
    inj, b, agg = make({"events": [{"round": 1, "action": "kill", "nodes": ["pi-0"]},
                                   {"round": 2, "action": "restart", "nodes": ["pi-0"]},
                                   {"round": 2, "action": "profile", "nodes": ["agx-0"], "profile": "jetson-tx2"},
                                   {"round": 3, "action": "link", "nodes": ["pi-1"], "uplink_mbit": 1}]})
    for rnd in (1, 2, 3):
        inj.begin_round(rnd, float(rnd))
        inj.end_round()
    assert agg.forgotten == ["pi-0"] and ("restart", "pi-0") in b.calls
    assert inj.current["agx-0"].name == "jetson-tx2"
    assert inj.current["pi-1"].uplink_mbit == 1 and inj.current["pi-1"].downlink_mbit == 80
    # the backend gets each change as the node's whole launch: the new profile, its dilated limits
    assert [(x.name, x.profile.name, x.endpoint) for x in b.launches] == [
        ("pi-0", "rpi5", "tcp://x"), ("agx-0", "jetson-tx2", "tcp://x"), ("pi-1", "rpi5", "tcp://x")]
    assert b.launches[1].limits.cpus == 0.25 and b.launches[2].limits.uplink_mbit == 1.0
    restored = inj.end_strategy()
    assert {(r["action"], r["node"]) for r in restored} == {("profile", "agx-0"), ("profile", "pi-1")}
    assert inj.current == inj.base


def test_end_strategy_resumes_and_reconnects_what_is_still_faulty(clock):
    inj, b, _ = make({"events": [{"round": 1, "action": "pause", "nodes": ["pi-0"]},
                                 {"round": 1, "action": "cut_link", "nodes": ["agx-0"]}]})
    inj.begin_round(1, 0.0)
    inj.end_round()
    recs = inj.end_strategy()
    assert {(r["action"], r["node"]) for r in recs} == {("resume", "pi-0"), ("restore_link", "agx-0")}
    assert all(r["why"] == "restored before the next strategy" for r in recs)
    assert not inj.paused and not inj.cut


def test_events_limited_to_some_strategies(clock):
    inj, b, _ = make({"events": [{"round": 1, "action": "pause", "nodes": ["pi-0"], "strategies": ["full"]}]})
    inj.begin_round(1, 0.0)
    assert inj.end_round() == []
    inj.begin_strategy("full", Agg(), "tcp://x")
    inj.begin_round(1, 0.0)
    assert len(inj.end_round()) == 1


def test_availability_probability_is_seeded_per_round(clock):
    inj, _, _ = make({"availability": {"probability": 0.5}})
    rounds = [inj.online(r, 0.0) for r in range(1, 30)]
    assert rounds == [inj.online(r, 0.0) for r in range(1, 30)]
    sizes = [len(s) for s in rounds]
    assert 0 < sum(sizes) / len(sizes) < 4 and len(set(map(frozenset, rounds))) > 3


def test_availability_trace(tmp_path, clock):
    trace = tmp_path / "t.csv"
    trace.write_text("node,online_from_s,online_to_s\n# pi-0 is away between 10 and 20 s\npi-0,0,10\npi-0,20,1e9\n"
                     "agx-0,5,15\n")
    inj, _, _ = make({"availability": {"trace": str(trace)}})
    assert inj.online(1, 0.0) == {"pi-0", "pi-1", "pi-2"}
    assert inj.online(2, 12.0) == {"pi-1", "pi-2", "agx-0"}
    assert inj.online(3, 25.0) == {"pi-0", "pi-1", "pi-2"}


@pytest.mark.parametrize("text, needle", [
    ("node,from,to\n", "line 1: the header must be node,online_from_s,online_to_s"),
    ("node,online_from_s,online_to_s\npi-9,0,1\n", "line 2: unknown node 'pi-9'"),
    ("node,online_from_s,online_to_s\npi-0,a,1\n", "line 2: online_from_s and online_to_s must be numbers"),
    ("node,online_from_s,online_to_s\npi-0,0,1,2\n", "line 2: expected 3 fields"),
    ("node,online_from_s,online_to_s\npi-0,5,5\n", "line 2: need 0 <= online_from_s < online_to_s"),
])
def test_bad_traces_name_the_line(tmp_path, text, needle):
    trace = tmp_path / "t.csv"
    trace.write_text(text)
    with pytest.raises(TraceError, match=needle.replace("(", r"\(")):
        load_availability(trace, {"pi-0", "pi-1"})


def test_snapshot_survives_pickling_and_restore_applies_the_faults_in_force(clock):
    inj, b, _ = make({"events": [{"round": 1, "action": "pause", "nodes": ["pi-0"], "duration_s": 100},
                                 {"round": 1, "action": "kill", "nodes": ["pi-1"]},
                                 {"round": 1, "action": "profile", "nodes": ["agx-0"], "profile": "rpi4"},
                                 {"round": 4, "action": "restart", "nodes": ["pi-1"]}]})
    inj.begin_round(1, 0.0)
    inj.end_round()
    snap = json.loads(json.dumps(inj.snapshot()))  # plain data: what a checkpoint may hold
    fresh, b2, agg2 = make({"events": [e.model_dump() for e in inj.events]})
    recs = fresh.restore(snap, "fedlora", agg2, Launcher("run", "tcp://y", 1.0))
    assert {(r["action"], r["node"]) for r in recs} == {("pause", "pi-0"), ("kill", "pi-1"), ("profile", "agx-0")}
    assert fresh.current["agx-0"].name == "rpi4" and fresh.killed == {"pi-1"}
    fresh.begin_round(4, 50.0)   # the queue goes on: round 4's restart, and the pause's undo at 100 s
    assert ("restart", "pi-1") in b2.calls
    clock.t += 60
    fresh.tick()
    assert b2.calls[-1] == ("resume", "pi-0")
