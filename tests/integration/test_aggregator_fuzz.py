"""Fuzz a real Aggregator over real sockets with thousands of random and mutated messages, from
strangers and from a registered node, also while a round is running: every one is handled by
validation (the last-resort catch in Aggregator.poll is never reached), and a good node is
served throughout."""
from __future__ import annotations

import random
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import protocol as P
from testbed.aggregator import Aggregator
from testbed.rounds import check_result

pytestmark = pytest.mark.integration
RUN = "fuzz-run"
GUARD_S = 10.0
SENT = {"n": 0}

# msgpack-able values of every kind, nested
leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=20))
value = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
                     max_leaves=12)
TYPES = st.sampled_from([*P.TYPES, "NOPE", ""])


def _welcome(name):
    return {"model": {}, "data": {}}, {"shard": np.arange(4, dtype=np.int32)}


def valid(type_: str, rnd: int = 0, meta=None, tensors=None, run: str = RUN) -> list[bytes]:
    frames = P.encode(P.Message(type_, run=run, round=rnd, meta=meta or {}, tensors=tensors or {}))
    return [bytes(memoryview(f).cast("B")) for f in frames]


@st.composite
def header_fields(draw):
    """A header with the right keys and random values (or a random key missing, or extra)."""
    h = {"type": draw(st.one_of(TYPES, value)), "version": draw(st.one_of(st.just(P.PROTOCOL_VERSION), value)),
         "run": draw(st.one_of(st.just(RUN), st.just(""), value)),
         "round": draw(st.one_of(st.integers(-3, 5), value)),
         "meta": draw(st.one_of(st.dictionaries(st.sampled_from(["name", "task_id", "samples", "phase", "error",
                                                                 "compute_s", "profile", "capabilities"]), value,
                                                max_size=5), value)),
         "tensors": draw(st.one_of(st.just([]), st.lists(st.lists(value, max_size=4), max_size=3), value))}
    if draw(st.booleans()):
        h.pop(draw(st.sampled_from(sorted(h))))
    n_frames = draw(st.integers(0, 3))
    return [msgpack.packb(h, use_bin_type=True), *[draw(st.binary(max_size=64)) for _ in range(n_frames)]]


@st.composite
def mutated(draw):
    """A valid message of some type, then bytes flipped, cut, frames dropped or added."""
    kind = draw(st.sampled_from(["hello", "heartbeat", "result", "bye", "error", "task"]))
    tensors = {"w": np.ones(draw(st.integers(0, 6)), np.float32)} if kind in ("result", "task") else {}
    meta = {"hello": {"name": draw(st.sampled_from(["n0", "n1", "x"])), "profile": "host", "capabilities": {}},
            "heartbeat": {"phase": draw(st.sampled_from(["ready", "train", "upload", 3]))},
            "result": {"task_id": draw(st.sampled_from(["t/1/n0", "t/1/n1", "zz"])), "samples": draw(value)},
            "bye": {}, "error": {"error": draw(value)}, "task": {"plan": draw(value)}}[kind]
    frames = valid(kind.upper(), draw(st.integers(0, 3)), meta, tensors)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "drop", "add", "swap"]))
        i = draw(st.integers(0, len(frames) - 1))
        f = bytearray(frames[i])
        if op == "flip" and f:
            j = draw(st.integers(0, len(f) - 1))
            f[j] ^= 1 << draw(st.integers(0, 7))
            frames[i] = bytes(f)
        elif op == "cut":
            frames[i] = bytes(f[: draw(st.integers(0, len(f)))])
        elif op == "drop" and len(frames) > 1:
            frames.pop(i)
        elif op == "add":
            frames.append(draw(st.binary(max_size=32)))
        elif op == "swap" and len(frames) > 1:
            frames[0], frames[-1] = frames[-1], frames[0]
    return frames


message = st.one_of(st.lists(st.binary(max_size=128), min_size=1, max_size=4), header_fields(), mutated())


@pytest.fixture(scope="module")
def served():
    """An aggregator, a registered node n1 whose socket the fuzzer uses, and a stranger's socket."""
    agg = Aggregator(RUN, {"n0": "host", "n1": "host"}, _welcome, bind="127.0.0.1", port=0,
                     max_frame_bytes=1 << 20)
    ctx = zmq.Context()
    socks = []

    def dealer():
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(agg.endpoint)
        socks.append(s)
        return s

    member, stranger = dealer(), dealer()
    member.send_multipart(valid(P.HELLO, run="", meta={"name": "n1", "profile": "host", "capabilities": {}}))
    end = time.monotonic() + GUARD_S
    while "n1" not in agg.peers and time.monotonic() < end:
        agg.poll(0.05)
    assert "n1" in agg.peers
    try:
        yield agg, member, stranger, dealer
    finally:
        for s in socks:
            s.close(linger=0)
        agg.close(say_bye=False)
        ctx.term()


def _drain(agg, *socks):
    """Let the aggregator handle everything sent; throw away its answers."""
    agg.poll(0.02)
    while agg.sock.poll(0):
        agg.poll(0)
    for s in socks:
        while s.poll(0):
            s.recv_multipart()


def _crashes(agg) -> list:
    return [r for r in agg.rejected if r[1] == "?"]  # what only the last-resort catch records


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(batch=st.lists(st.tuples(st.booleans(), message), min_size=10, max_size=30))
def test_random_and_mutated_messages_never_reach_the_last_resort(served, batch):
    agg, member, stranger, _ = served
    for as_member, frames in batch:
        (member if as_member else stranger).send_multipart(frames)
        SENT["n"] += 1
    _drain(agg, member, stranger)
    assert not _crashes(agg), _crashes(agg)[:3]


def test_a_good_node_is_served_while_a_registered_node_floods_the_round(served):
    agg, member, _, dealer = served
    member.send_multipart(valid(P.HELLO, run="", meta={"name": "n1", "profile": "host", "capabilities": {}}))
    _drain(agg, member)  # (the fuzz may have moved n1 to the stranger's connection)
    assert "n1" in agg.peers
    good = dealer()
    good.send_multipart(valid(P.HELLO, run="", meta={"name": "n0", "profile": "host", "capabilities": {}}))
    end = time.monotonic() + GUARD_S
    while not good.poll(0) and time.monotonic() < end:  # (the fuzz may have registered "n0" already)
        agg.poll(0.05)
    assert P.decode(good.recv_multipart()).type == P.WELCOME
    good.send_multipart(valid(P.HEARTBEAT, meta={"phase": "ready"}))
    stop, rng = threading.Event(), random.Random(1)
    trained = {"w": np.full(8, 2.0, np.float32)}

    def node():  # answers its task properly after a moment in the flood
        end = time.monotonic() + GUARD_S
        while time.monotonic() < end:
            if good.poll(50):
                task = P.decode(good.recv_multipart())
                if task.type == P.TASK:
                    time.sleep(0.3)
                    good.send_multipart(valid(P.RESULT, task.round, {"task_id": task.meta["task_id"],
                                                                     "samples": 4}, trained))
                    return

    def flood():  # the registered n1 sends junk, results for n0's task, and tries to become n0
        kinds = [lambda: [rng.randbytes(rng.randint(1, 64))],
                 lambda: valid(P.RESULT, 1, {"task_id": "t/1/n0", "samples": 4}, {"w": np.full(8, np.nan, np.float32)}),
                 lambda: valid(P.RESULT, 1, {"task_id": "t/1/n1", "samples": -1}, {"w": np.ones(3, np.float32)}),
                 lambda: valid(P.HELLO, run="", meta={"name": "n0"}),
                 lambda: valid(P.HEARTBEAT, 1, {"phase": None})]
        while not stop.is_set():
            member.send_multipart(rng.choice(kinds)())
            SENT["n"] += 1
            time.sleep(0.0005)

    threads = [threading.Thread(target=node, daemon=True), threading.Thread(target=flood, daemon=True)]
    for t in threads:
        t.start()
    try:
        out = agg.run_round(1, "t", {"n0": ({"method": "full"}, {"w": np.ones(8, np.float32)})}, GUARD_S,
                            alive=lambda n: True, check=lambda n, sent, msg: check_result(sent, msg))
    finally:
        stop.set()
        for t in threads:
            t.join(GUARD_S)
    assert out.records["n0"].status == "ok", out.records["n0"].reason
    np.testing.assert_array_equal(out.results["n0"].tensors["w"], trained["w"])
    assert not _crashes(agg)
    assert any("is registered as node 'n1', not 'n0'" in r[2] for r in agg.rejected), "n1 cannot become n0"


def test_an_oversized_frame_costs_the_sender_its_connection_not_the_aggregator_its_memory(served):
    agg, _, _, dealer = served
    big = dealer()
    big.send_multipart(valid(P.HELLO, run="", meta={"name": "n1"})[:1] + [b"\0" * (2 << 20)])
    agg.poll(0.3)
    ok = dealer()
    ok.send_multipart([b"\xc1"])
    end = time.monotonic() + GUARD_S
    while not ok.poll(0) and time.monotonic() < end:
        agg.poll(0.05)
    assert P.decode(ok.recv_multipart()).type == P.ERROR, "still serving"
    assert not big.poll(200), "the oversized message was never handled"


def test_thousands_were_sent():
    assert SENT["n"] >= 2000, SENT
