"""A real Aggregator on 127.0.0.1 fed bad input by raw DEALER sockets: it answers ERROR and keeps
serving; then a well-behaved fake node registers and plays rounds (ok, rejected, dropped)."""
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from node import protocol as P
from testbed.aggregator import Aggregator
from testbed.rounds import check_result  # imports no torch (node.trainer loads it lazily)

pytestmark = pytest.mark.integration

RUN = "test-run"
SHARD = np.arange(5, dtype=np.int32)
GUARD_S = 10.0  # upper bound on waiting for a reply, only so a broken aggregator cannot hang the suite


def _welcome(name):
    return {"model": {}, "data": {}}, {"shard": SHARD.copy()}


@pytest.fixture
def agg():
    a = Aggregator(RUN, {"n0": "host", "n1": "host"}, _welcome, bind="127.0.0.1", port=0)
    try:
        yield a
    finally:
        a.close(say_bye=False)


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.term()  # blocks if a socket was left open: every socket below is closed first


@pytest.fixture
def dealer(agg, zctx):
    """Factory of DEALER sockets connected to the aggregator; all closed at teardown."""
    socks = []

    def make():
        s = zctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(agg.endpoint)
        socks.append(s)
        return s

    try:
        yield make
    finally:
        for s in socks:
            s.close(linger=0)


def _reply(agg, sock, frames=None):
    """Send `frames` (if any), let the aggregator handle it, return the decoded reply."""
    if frames is not None:
        sock.send_multipart(frames)
    end = time.monotonic() + GUARD_S
    while time.monotonic() < end:
        agg.poll(0.05)
        if sock.poll(0):
            return P.decode(sock.recv_multipart())
    raise AssertionError("no reply from the aggregator")


def _no_reply(agg, sock, frames, wait_s=0.3):
    sock.send_multipart(frames)
    agg.poll(wait_s)
    return sock.poll(100) == 0


def _msg(type_, run=RUN, rnd=0, meta=None, tensors=None, version=P.PROTOCOL_VERSION):
    return P.encode(P.Message(type_, run=run, round=rnd, meta=meta or {}, tensors=tensors or {}, version=version))


def _hello(sock, agg, name="n0"):
    return _reply(agg, sock, _msg(P.HELLO, run="", meta={"name": name, "profile": "host", "capabilities": {}}))


# -- bad input, one case each -------------------------------------------------------------

def test_garbage_gets_error_and_aggregator_keeps_serving(agg, dealer):
    s = dealer()
    for garbage in ([b"\xc1garbage"], [b"\x00" * 3, b"more"], [msgpack.packb([1, 2, 3])]):
        rep = _reply(agg, s, garbage)
        assert rep.type == P.ERROR
        assert rep.run == RUN
        assert rep.meta["fatal"] is False
        assert isinstance(rep.meta["error"], str) and rep.meta["error"]
    assert agg.rejected_total == 3
    # still serving: a good HELLO on the same connection is welcomed
    assert _hello(s, agg).type == P.WELCOME


def test_error_text_says_what_was_wrong(agg, dealer):
    s = dealer()
    assert "not valid msgpack" in _reply(agg, s, [b"\xc1"]).meta["error"]
    assert "header must be a map" in _reply(agg, s, [msgpack.packb("x")]).meta["error"]
    bad_dtype = {"type": P.RESULT, "version": P.PROTOCOL_VERSION, "run": RUN, "round": 0, "meta": {},
                 "tensors": [["w", "object", [1]]]}
    assert "dtype 'object'" in _reply(agg, s, [msgpack.packb(bad_dtype), b"\0" * 8]).meta["error"]


def test_wrong_protocol_version_is_fatal_and_named(agg, dealer):
    s = dealer()
    rep = _reply(agg, s, _msg(P.HELLO, run="", meta={"name": "n0"}, version=99))
    assert rep.type == P.ERROR
    assert rep.meta["fatal"] is True
    assert "99" in rep.meta["error"] and "version" in rep.meta["error"]
    assert "n0" not in agg.peers  # not registered
    assert agg.rejected_total == 1


@pytest.mark.parametrize("name", ["n7", "", None, 5])
def test_unknown_name_lists_expected(agg, dealer, name):
    s = dealer()
    rep = _reply(agg, s, _msg(P.HELLO, run="", meta={"name": name}))
    assert rep.type == P.ERROR
    assert rep.meta["fatal"] is True
    assert repr(name) in rep.meta["error"]
    assert "n0, n1" in rep.meta["error"]
    assert agg.peers == {}


def test_result_before_hello(agg, dealer):
    s = dealer()
    rep = _reply(agg, s, _msg(P.RESULT, meta={"task_id": "x", "samples": 1}, tensors={"w": np.ones(3, np.float32)}))
    assert rep.type == P.ERROR
    assert "RESULT before HELLO" in rep.meta["error"]
    assert agg.rejected_total == 1


def test_registered_node_wrong_run_and_forbidden_types(agg, dealer):
    s = dealer()
    _hello(s, agg)
    assert "this is run" in _reply(agg, s, _msg(P.HEARTBEAT, run="other-run", meta={"phase": "ready"})).meta["error"]
    # a heartbeat the node sent before our WELCOME reached it (run still unknown): dropped quietly
    assert _no_reply(agg, s, _msg(P.HEARTBEAT, run="", meta={"phase": "hello"}))
    assert "may not send TASK" in _reply(agg, s, _msg(P.TASK)).meta["error"]
    assert "meta.phase" in _reply(agg, s, _msg(P.HEARTBEAT, meta={"phase": 3})).meta["error"]
    assert agg.rejected_total == 3
    assert agg.ready() == set()


def test_overflowing_shape_does_not_crash_the_aggregator(agg, dealer):
    s = dealer()
    hdr = {"type": P.RESULT, "version": P.PROTOCOL_VERSION, "run": RUN, "round": 0, "meta": {},
           "tensors": [["w", "float32", [65536] * 4]]}
    rep = _reply(agg, s, [msgpack.packb(hdr), b""])
    assert rep.type == P.ERROR


# -- the whole sequence: bad input, then a good node plays three rounds -------------------

class FakeNode:
    """Plays one round in a thread: waits for a TASK, then answers as `behaviour` says."""

    def __init__(self, sock):
        self.sock = sock
        self.thread = None
        self.task = None
        self.error = None
        self.stop = threading.Event()

    def play(self, behaviour):
        self.stop.clear()
        self.task = None

        def run():
            try:
                end = time.monotonic() + GUARD_S
                while not self.stop.is_set() and time.monotonic() < end:
                    if self.sock.poll(50):
                        self.task = P.decode(self.sock.recv_multipart())
                        break
                else:
                    return
                for frames in behaviour(self.task):
                    self.sock.send_multipart(frames)
            except Exception as exc:  # surfaced by join()
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self):
        if self.thread is not None:
            self.stop.set()
            self.thread.join(GUARD_S)
            assert not self.thread.is_alive()
            self.thread = None
        if self.error:
            raise self.error


@pytest.fixture
def fake_node(dealer):
    nodes = []

    def make():
        n = FakeNode(dealer())
        nodes.append(n)
        return n

    try:
        yield make
    finally:
        for n in nodes:  # stop threads before the sockets are closed by `dealer`
            n.stop.set()
            if n.thread is not None:
                n.thread.join(GUARD_S)


def _check(node, sent, msg):
    return check_result(sent, msg)


def _result(task, tensors, samples=10, task_id=None, **meta):
    return _msg(P.RESULT, rnd=task.round, tensors=tensors,
                meta={"task_id": task_id or task.meta["task_id"], "samples": samples, **meta})


def test_bad_input_then_good_node_full_flow(agg, dealer, fake_node):
    bad = dealer()
    # (a) garbage
    assert _reply(agg, bad, [b"\xc1 not msgpack"]).type == P.ERROR
    # (b) wrong protocol version
    rep = _reply(agg, bad, _msg(P.HELLO, run="", meta={"name": "n0"}, version=99))
    assert rep.type == P.ERROR and rep.meta["fatal"] is True and "99" in rep.meta["error"]
    # (c) unknown name
    rep = _reply(agg, bad, _msg(P.HELLO, run="", meta={"name": "intruder"}))
    assert rep.type == P.ERROR and "n0, n1" in rep.meta["error"]
    # (d) RESULT before HELLO
    rep = _reply(agg, bad, _msg(P.RESULT, meta={"samples": 1}))
    assert rep.type == P.ERROR and "before HELLO" in rep.meta["error"]
    assert agg.rejected_total == 4
    assert agg.peers == {}

    # (e) a good node registers
    node = fake_node()
    welcome = _hello(node.sock, agg, "n0")
    assert welcome.type == P.WELCOME
    assert welcome.run == RUN
    assert welcome.meta == {"model": {}, "data": {}}
    assert welcome.tensors["shard"].dtype == np.int32
    np.testing.assert_array_equal(welcome.tensors["shard"], SHARD)
    assert agg.ready() == set()
    node.sock.send_multipart(_msg(P.HEARTBEAT, meta={"phase": "ready"}))
    end = time.monotonic() + GUARD_S
    while "n0" not in agg.ready() and time.monotonic() < end:
        agg.poll(0.05)
    assert agg.ready() == {"n0"}
    assert agg.wait_ready({"n0"}, 1.0, alive=lambda n: True) == {"n0"}

    plan = {"method": "full", "blocks": [0]}
    sent = {"w": np.ones(3, np.float32)}

    # round 1: a stale answer first (discarded), then the right one
    trained = {"w": np.array([1.5, 2.5, 3.5], np.float32)}
    node.play(lambda task: [_result(task, {"w": np.zeros(3, np.float32)}, task_id="old/0/n0"),
                            _result(task, trained, compute_s=1.25, peak_mem_mb=42.0)])
    out = agg.run_round(1, "t", {"n0": (plan, sent)}, 5.0, alive=lambda n: True, check=_check)
    node.join()
    assert node.task.type == P.TASK and node.task.round == 1
    assert node.task.meta["plan"] == plan
    assert node.task.meta["task_id"] == "t/1/n0"
    np.testing.assert_array_equal(node.task.tensors["w"], sent["w"])
    rec = out.records["n0"]
    assert rec.status == "ok", rec.reason
    assert rec.profile == "host"
    assert set(out.results) == {"n0"}
    np.testing.assert_array_equal(out.results["n0"].tensors["w"], trained["w"])
    assert out.results["n0"].meta["samples"] == 10
    assert rec.compute_s == 1.25 and rec.peak_mem_mb == 42.0
    assert rec.bytes_down == P.frames_nbytes(_msg(P.TASK, rnd=1, meta={"plan": plan, "task_id": "t/1/n0"},
                                                  tensors=sent))
    assert rec.bytes_up == P.frames_nbytes(_result(node.task, trained, compute_s=1.25, peak_mem_mb=42.0))
    assert agg.rejected_total == 4  # a stale result is discarded, not counted as bad

    # round 2: NaN tensors are rejected by the check
    node.play(lambda task: [_result(task, {"w": np.array([1, np.nan, 3], np.float32)})])
    out = agg.run_round(2, "t", {"n0": (plan, sent)}, 5.0, alive=lambda n: True, check=_check)
    node.join()
    assert out.records["n0"].status == "rejected"
    assert "finite" in out.records["n0"].reason
    assert out.results == {}
    assert agg.rejected_total == 5

    # round 3: the node takes the task and never answers
    node.play(lambda task: [])
    out = agg.run_round(3, "t", {"n0": (plan, sent)}, 0.5, alive=lambda n: True, check=_check)
    node.join()
    assert node.task is not None and node.task.round == 3  # it did get the task
    assert out.records["n0"].status == "dropped"
    assert out.records["n0"].reason == "missed the round deadline"
    assert out.results == {}
    assert out.wall_real_s >= 0.5  # the round lasted until its deadline
    assert agg.rejected_total == 5

    # round 4: an answer to an old round arriving now is discarded; the node reports an ERROR
    node.play(lambda task: [_result(P.Message(P.TASK, round=3, meta={"task_id": "t/3/n0"}), trained),
                            _msg(P.ERROR, rnd=task.round, meta={"task_id": task.meta["task_id"],
                                                                "error": "out of memory"})])
    out = agg.run_round(4, "t", {"n0": (plan, sent)}, 5.0, alive=lambda n: True, check=_check)
    node.join()
    assert out.records["n0"].status == "failed"
    assert out.records["n0"].reason == "out of memory"


def test_round_with_dead_node_fails_fast(agg, dealer):
    s = dealer()
    _hello(s, agg, "n1")
    out = agg.run_round(1, "t", {"n1": ({}, {"w": np.ones(1, np.float32)})}, 30.0,
                        alive=lambda n: False, check=_check)
    assert out.records["n1"].status == "failed"
    assert out.records["n1"].reason == "node process exited"


def test_check_rejects_wrong_names_shapes_and_samples(agg, dealer, fake_node):
    node = fake_node()
    _hello(node.sock, agg, "n0")
    sent = {"w": np.ones(3, np.float32)}
    cases = [
        ({"v": np.ones(3, np.float32)}, 10, "names differ"),
        ({"w": np.ones(4, np.float32)}, 10, "shape"),
        ({"w": np.ones(3, np.int32)}, 10, "dtype int32 != float32"),
        ({"w": np.ones(3, np.float64)}, 10, "dtype float64 != float32 (as sent)"),
        ({"w": np.array([1, np.inf, 0], np.float32)}, 10, "not finite floats"),
        ({"w": np.ones(3, np.float32)}, -1, "samples"),
    ]
    for rnd, (tensors, samples, why) in enumerate(cases, 1):
        node.play(lambda task, t=tensors, n=samples: [_result(task, t, samples=n)])
        out = agg.run_round(rnd, "c", {"n0": ({}, sent)}, 5.0, alive=lambda n: True, check=_check)
        node.join()
        assert out.records["n0"].status == "rejected", why
        assert why in out.records["n0"].reason
    assert agg.rejected_total == len(cases)


def _two_ready_nodes(agg, fake_node) -> dict:
    """Fake nodes n0 and n1, registered and ready."""
    nodes = {}
    for name in ("n0", "n1"):
        nodes[name] = fake_node()
        _hello(nodes[name].sock, agg, name)
        nodes[name].sock.send_multipart(_msg(P.HEARTBEAT, meta={"phase": "ready"}))
    end = time.monotonic() + GUARD_S
    while agg.ready() != {"n0", "n1"} and time.monotonic() < end:
        agg.poll(0.05)
    return nodes


def test_a_round_with_one_task_at_a_time_sends_the_next_when_one_is_back(agg, fake_node):
    """`parallel=1` (the virtual clock's waves): the second node gets its task only after the
    first answered."""
    nodes = _two_ready_nodes(agg, fake_node)
    got, answered = {}, {}

    def answer(name):
        def behaviour(task):
            got[name] = time.monotonic()
            time.sleep(0.3)
            answered[name] = time.monotonic()
            return [_result(task, {"w": np.ones(3, np.float32)})]
        return behaviour

    for name, node in nodes.items():
        node.play(answer(name))
    sent = {"w": np.ones(3, np.float32)}
    out = agg.run_round(1, "t", {n: ({"method": "full", "blocks": [0]}, sent) for n in nodes}, 10.0,
                        alive=lambda n: True, check=_check, parallel=1)
    for node in nodes.values():
        node.join()
    assert set(out.results) == {"n0", "n1"}
    first, second = sorted(got, key=got.get)
    assert got[second] >= answered[first], "the second task went out after the first answer"


def test_accepted_results_go_where_keep_puts_them_and_rejected_ones_nowhere(agg, fake_node, tmp_path):
    """`keep` (testbed/spill.py): each accepted result's tensors are written to a file as it
    arrives, and the round's results read them back from there; a rejected one is not kept."""
    from testbed.spill import Spill, SpilledTensors
    nodes = _two_ready_nodes(agg, fake_node)
    nodes["n0"].play(lambda task: [_result(task, {"w": np.array([1.5, -2.0, 3.25], np.float32)})])
    nodes["n1"].play(lambda task: [_result(task, {"w": np.array([1.0, np.nan, 0.0], np.float32)})])  # not finite
    spill = Spill(tmp_path / "spill")
    sent = {"w": np.zeros(3, np.float32)}
    out = agg.run_round(1, "t", {n: ({"method": "full", "blocks": [0]}, sent) for n in nodes}, 10.0,
                        alive=lambda n: True, check=_check, keep=spill.keep)
    for node in nodes.values():
        node.join()
    assert set(out.results) == {"n0"} and out.records["n1"].status == "rejected"
    kept = out.results["n0"].tensors
    assert isinstance(kept, SpilledTensors) and kept["w"].tolist() == [1.5, -2.0, 3.25]
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["n0.bin"]


# -- released rounds (testbed/release.py) -------------------------------------------------

def _released(path, key):
    """Wait until the release file holds round `key`; its record."""
    import json
    end = time.monotonic() + GUARD_S
    while time.monotonic() < end:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            rec = None
        if rec and rec.get("key") == key:
            return rec
        time.sleep(0.02)
    raise AssertionError(f"round {key} was never released")


def _play_round(agg, nodes, behaviours, rnd=1, release=None):
    """Each fake node answers its task of round `rnd` as its behaviour says; the round's outcome."""
    for name, node in nodes.items():
        node.play(behaviours[name])
    sent = {"w": np.ones(3, np.float32)}
    out = agg.run_round(rnd, "t", {n: ({"method": "full", "blocks": [0]}, sent) for n in nodes}, 10.0,
                        alive=lambda n: True, check=_check, release=release)
    for node in nodes.values():
        node.join()
    return out


def test_a_round_is_released_once_every_node_still_out_has_computed(agg, fake_node, tmp_path):
    """The release is announced once, after the last node still out said "computed", and
    each task named the file."""
    from testbed.release import ReleaseFile
    release = ReleaseFile(tmp_path / "release", 4.0)
    nodes, said = _two_ready_nodes(agg, fake_node), {}

    def fast(task):
        nodes["n0"].sock.send_multipart(_msg(P.HEARTBEAT, rnd=1, meta={"phase": "computed"}))
        _released(release.path, "t/1")
        return [_result(task, {"w": np.ones(3, np.float32)}, released_s=1.25)]

    def slow(task):
        time.sleep(0.3)
        said["n1"] = time.monotonic()
        nodes["n1"].sock.send_multipart(_msg(P.HEARTBEAT, rnd=1, meta={"phase": "computed"}))
        _released(release.path, "t/1")
        return [_result(task, {"w": np.ones(3, np.float32)}, released_s=0.0)]

    out = _play_round(agg, nodes, {"n0": fast, "n1": slow}, release=release)
    rec = _released(release.path, "t/1")
    assert set(out.results) == {"n0", "n1"}
    assert all(nodes[n].task.meta["release"] == str(release.path) for n in nodes)
    assert rec["factor"] == 4.0 and out.released_at == rec["at"] and rec["at"] >= said["n1"]
    assert out.released_s == {"n0": 1.25}  # n1's wait lost nothing
    assert set(out.done_at) == {"n0", "n1"} and out.started_at <= min(out.done_at.values())


def test_a_node_still_training_holds_the_release_until_it_answers(agg, fake_node, tmp_path):
    """A node that never says "computed" (it did not wait) holds the release until its result
    is in; a round run without a release file names none and writes none."""
    from testbed.release import ReleaseFile
    release = ReleaseFile(tmp_path / "release", 4.0)
    nodes, answered = _two_ready_nodes(agg, fake_node), {}

    def waiting(task):
        nodes["n0"].sock.send_multipart(_msg(P.HEARTBEAT, rnd=1, meta={"phase": "computed"}))
        _released(release.path, "t/1")
        return [_result(task, {"w": np.ones(3, np.float32)})]

    def training(task):
        time.sleep(0.4)
        answered["n1"] = time.monotonic()
        return [_result(task, {"w": np.ones(3, np.float32)})]

    out = _play_round(agg, nodes, {"n0": waiting, "n1": training}, release=release)
    assert set(out.results) == {"n0", "n1"} and out.released_at >= answered["n1"]
    release.clear()
    plain = lambda task: [_result(task, {"w": np.ones(3, np.float32)})]  # noqa: E731
    out = _play_round(agg, nodes, {"n0": plain, "n1": plain}, rnd=2)
    assert out.released_at is None and not release.path.exists()
    assert all("release" not in nodes[n].task.meta for n in nodes)
