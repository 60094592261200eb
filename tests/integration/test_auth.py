"""CURVE: only nodes holding the run's keys get in, each under its own name; the rest are refused
and counted, and the aggregator keeps serving the good nodes."""
from __future__ import annotations

import time

import pytest
import zmq

from node import protocol as P
from testbed.aggregator import Aggregator
from testbed.auth import RunKeys, curve_available

# serial: a node must register within 3 s
pytestmark = [pytest.mark.integration, pytest.mark.serial,
              pytest.mark.skipif(not curve_available(), reason="this libzmq has no CURVE")]
RUN = "auth-test"


def _welcome(name):
    return {"model": {}, "data": {}}, {}


@pytest.fixture
def agg():
    keys = RunKeys.generate(["n0", "n1"])
    a = Aggregator(RUN, {"n0": "host", "n1": "host"}, _welcome, bind="127.0.0.1", port=0, keys=keys)
    yield a, keys
    a.close(say_bye=False)


def _dealer(endpoint: str, server: str | None, secret: str | None) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if server:
        s.curve_serverkey, s.curve_secretkey = server.encode(), secret.encode()
        s.curve_publickey = zmq.curve_public(secret.encode())
    s.connect(endpoint)
    return s


def _hello(s: zmq.Socket, name: str) -> None:
    s.send_multipart(P.encode(P.Message(P.HELLO, meta={"name": name})))


def _answer(a: Aggregator, s: zmq.Socket, wait_s: float = 3.0) -> P.Message | None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        a.poll(0.05)
        if s.poll(10):
            return P.decode(s.recv_multipart())
    return None


def test_only_the_runs_keys_get_in_each_under_its_own_name(agg):
    a, keys = agg
    socks = []
    try:
        # no CURVE at all: the handshake fails, nothing reaches the aggregator
        plain = _dealer(a.endpoint, None, None)
        socks.append(plain)
        _hello(plain, "n0")
        assert _answer(a, plain, 2.0) is None
        # CURVE with a key the run did not make: refused by the ZAP handler
        stranger = _dealer(a.endpoint, keys.server_public, zmq.curve_keypair()[1].decode())
        socks.append(stranger)
        _hello(stranger, "n0")
        assert _answer(a, stranger, 2.0) is None
        # n1's key saying HELLO as n0: a fatal ERROR, no WELCOME
        thief = _dealer(a.endpoint, keys.server_public, keys.nodes["n1"][1])
        socks.append(thief)
        _hello(thief, "n0")
        err = _answer(a, thief)
        assert err is not None and err.type == P.ERROR and err.meta["fatal"]
        assert "belongs to node 'n1', not 'n0'" in err.meta["error"]
        # the real n0 is welcomed and registers
        good = _dealer(a.endpoint, keys.server_public, keys.nodes["n0"][1])
        socks.append(good)
        _hello(good, "n0")
        msg = _answer(a, good)
        assert msg is not None and msg.type == P.WELCOME
        good.send_multipart(P.encode(P.Message(P.HEARTBEAT, run=RUN, meta={"phase": "ready"})))
        deadline = time.monotonic() + 3
        while "n0" not in a.ready() and time.monotonic() < deadline:
            a.poll(0.05)
        assert a.ready() == {"n0"}
        assert a.authenticator.refused_total == 1, "the stranger's key"
        assert a.refused_total >= 2, "the stranger and the client without CURVE"
        assert a.rejected_total == 1, "the wrong-name HELLO"
    finally:
        for s in socks:
            s.close(linger=0)
