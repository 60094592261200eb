"""Released rounds (testbed/release.py): the release record, the node's shortened wait, the
round's unreleased time worked back from what each node saved, and where a scenario may not
release. Expectations are worked by hand from the definitions, not by the code under test."""
import copy
import json
import threading
import time
from types import SimpleNamespace

import pytest

from node import protocol as P
from node.agent import Agent
from node.device import read_release, released_end
from testbed.aggregator import MISSED, NodeRecord, RoundOutcome
from testbed.release import ReleaseFile
from testbed.rounds import RoundLoop
from testbed.scenario import ScenarioError, parse
from testbed.setup import release_notes

MINIMAL = {
    "name": "t",
    "nodes": [{"group": "pi5", "count": 2, "profile": "rpi5"}],
    "strategies": {"baseline": "fedlora", "run": [{"name": "fedlora"}]},
    "release_waits": True,
}


# -- the record and the node's side ---------------------------------------------------------

@pytest.mark.parametrize("end, at, factor, want", [
    (10.0, 4.0, 3.0, 6.0),     # 6 s left at the release pass in 2
    (10.0, 0.0, 10.0, 1.0),
    (10.0, 10.0, 4.0, 10.0),   # released as it ended: nothing left to shorten
    (10.0, 12.0, 4.0, 10.0),   # released after it ended
])
def test_released_end_shortens_what_is_left_by_the_factor(end, at, factor, want):
    assert released_end(end, at, factor) == pytest.approx(want)


def test_announce_writes_a_record_that_read_release_finds_for_its_round_only(tmp_path):
    rf = ReleaseFile(tmp_path / "release", 4.0)
    before = time.monotonic()
    at = rf.announce("fedlora/3")
    assert before <= at <= time.monotonic()
    assert json.loads(rf.path.read_text()) == {"key": "fedlora/3", "at": at, "factor": 4.0}
    assert read_release(str(rf.path), "fedlora/3") == (at, 4.0)
    assert read_release(str(rf.path), "fedlora/4") is None
    assert read_release(str(rf.path), "legend/3") is None
    rf.clear()
    assert not rf.path.exists() and read_release(str(rf.path), "fedlora/3") is None


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", '{"key": "s/1", "at": "soon", "factor": 4}',
                                  '{"key": "s/1", "at": 5.0, "factor": 1}', '{"key": "s/1", "at": 5.0}'])
def test_a_record_that_is_not_one_releases_nothing(tmp_path, text):
    path = tmp_path / "release"
    path.write_text(text)
    assert read_release(str(path), "s/1") is None


def test_a_release_factor_must_slow_nothing_down():
    with pytest.raises(ValueError, match="> 1"):
        ReleaseFile("release", 1.0)


def _agent():
    """An agent with no socket: its heartbeats are recorded."""
    a = Agent.__new__(Agent)
    a.phases = []
    a.phase = lambda phase, rnd=0: a.phases.append((phase, rnd))
    return a


def _task(path, task_id="fedlora/2/n0"):
    meta = {"task_id": task_id}
    if path is not None:
        meta["release"] = str(path)
    return P.Message(P.TASK, run="r", round=2, meta=meta)


def test_a_released_wait_ends_early_by_what_the_record_says(tmp_path):
    """A 3 s wait released 0.2 s in with factor 10: the node reports the seconds saved, which
    the record's moment gives exactly: (due - at) x (1 - 1/10)."""
    a, rf = _agent(), ReleaseFile(tmp_path / "release", 10.0)
    due = time.monotonic() + 3.0
    timer = threading.Timer(0.2, rf.announce, args=("fedlora/2",))
    timer.start()
    try:
        saved = a.wait_out(due, _task(rf.path))
    finally:
        timer.cancel()
    at, factor = read_release(str(rf.path), "fedlora/2")
    assert saved == pytest.approx((due - at) * (1 - 1 / factor), abs=1e-9)
    assert a.phases == [("computed", 2)]


def test_another_rounds_release_or_none_leaves_the_wait_whole(tmp_path):
    a, rf = _agent(), ReleaseFile(tmp_path / "release", 10.0)
    rf.announce("fedlora/1")  # the previous round's record, still there
    assert a.wait_out(time.monotonic() + 0.2, _task(rf.path)) == 0.0
    assert a.phases == [("computed", 2)]
    b = _agent()
    assert b.wait_out(time.monotonic() + 0.05, _task(None)) == 0.0
    assert b.phases == []  # a round that cannot be released: no "computed"


# -- the round's time -------------------------------------------------------------------------

def _loop(dilation=4.0, deadline=10.0, due=None, remote=()):
    loop = RoundLoop.__new__(RoundLoop)
    loop.sc = SimpleNamespace(training=SimpleNamespace(round_deadline_s=deadline))
    loop.setup = SimpleNamespace(dilation=dilation, virtual=False)
    loop.release = ReleaseFile("release", dilation)
    loop.remote = set(remote)
    loop.inj = SimpleNamespace(next_due=lambda: due)
    return loop


def _outcome(done_at, saved, answered=None):
    records = {n: NodeRecord(n, "p", status="ok", compute_s=3.0, bytes_up=100, bytes_down=50) for n in done_at}
    results = {n: P.Message(P.RESULT, meta={"samples": 1}) for n in done_at}
    return RoundOutcome(results, records, 0.0, set(answered or done_at), 100.0, dict(done_at), 101.0, dict(saved))


def test_the_unreleased_time_is_each_node_end_plus_what_it_saved():
    """Started at 100: n0 left at 110 having saved 5 s (115 unreleased), n1 at 111 having saved
    20 s (131): the devices took 31 real seconds, inside the deadline of 10 x 4 = 40."""
    out = _outcome({"n0": 110.0, "n1": 111.0}, {"n0": 5.0, "n1": 20.0})
    assert _loop()._released_devices(out) == pytest.approx(31.0)
    assert set(out.results) == {"n0", "n1"}


def test_a_result_late_once_unreleased_is_dropped_as_the_deadline_would_have():
    """n1 would have left at 100 + 12 + 30 = 142 real seconds, after the deadline at 40: dropped
    with no upload counted, and the round lasts its deadline."""
    out = _outcome({"n0": 110.0, "n1": 112.0}, {"n0": 5.0, "n1": 30.0})
    assert _loop()._released_devices(out) == pytest.approx(40.0)
    assert set(out.results) == {"n0"} and out.answered == {"n0"}
    rec = out.records["n1"]
    assert (rec.status, rec.reason, rec.bytes_up, rec.bytes_down, rec.compute_s) == ("dropped", MISSED, 0, 50, 0.0)


def test_a_node_still_out_at_the_deadline_makes_the_round_last_it():
    out = _outcome({"n0": 110.0}, {})
    out.records["n1"] = NodeRecord("n1", "p", reason=MISSED)
    assert _loop()._released_devices(out) == pytest.approx(40.0)


@pytest.mark.parametrize("due, remote, released", [
    (None, (), True),          # nothing queued
    (150.0, (), False),        # a fault due within the round's deadline (elapsed 100 + 60)
    (160.5, (), True),         # due after it
    (None, ("n1",), False),    # a real device cannot read the file
])
def test_which_rounds_may_be_released(due, remote, released):
    loop = _loop(deadline=60.0, due=due, remote=remote)
    got = loop._release({"n0": None, "n1": None}, 100.0)
    assert (got is loop.release) is released and (got is None) is (not released)


# -- where a scenario may not release ---------------------------------------------------------

@pytest.mark.parametrize("change, where, says", [
    ({"clock": "virtual"}, "release_waits", "clock: real"),
    ({"backend": "docker"}, "release_waits", "allowed backends: auto, process, netns"),
])
def test_release_waits_is_refused_where_no_node_could_read_the_file(change, where, says):
    doc = {**copy.deepcopy(MINIMAL), **change}
    with pytest.raises(ScenarioError) as err:
        parse(doc, "mem.yaml")
    assert f"mem.yaml: {where}" in str(err.value) and says in str(err.value)


def test_release_waits_is_refused_with_a_group_on_another_engine():
    doc = copy.deepcopy(MINIMAL)
    doc["engines"] = {"far": {"url": "unix:///run/other-docker.sock"}}
    doc["nodes"][0]["engine"] = "far"
    with pytest.raises(ScenarioError) as err:
        parse(doc, "mem.yaml")
    assert "mem.yaml: nodes[0]" in str(err.value) and "engine far" in str(err.value)


def test_release_notes_say_what_will_not_be_released():
    sc = parse(copy.deepcopy(MINIMAL), "mem.yaml")
    assert release_notes(sc, 4.0, remote=False) == []
    assert "no slowed wait" in release_notes(sc, 1.0, remote=False)[0]
    assert "remote" in release_notes(sc, 4.0, remote=True)[0]
    faulty = parse({**copy.deepcopy(MINIMAL), "faults": {"events": [
        {"round": 1, "after_s": 1, "action": "kill", "nodes": ["pi5-0"]}]}}, "mem.yaml")
    assert "fault" in release_notes(faulty, 4.0, remote=False)[0]
    mixed = parse({**copy.deepcopy(MINIMAL), "strategies": {"baseline": "fedlora", "run": [
        {"name": "fedlora"}, {"name": "fb", "type": "fedbuff"}]}}, "mem.yaml")
    assert [n.split(":")[1].split()[0] for n in release_notes(mixed, 4.0, remote=False)] == ["fb"]
    off = parse({**copy.deepcopy(MINIMAL), "release_waits": False}, "mem.yaml")
    assert release_notes(off, 1.0, remote=True) == []
