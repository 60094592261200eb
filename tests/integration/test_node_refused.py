"""A node the aggregator will never talk to leaves at once with a message that says why (exit 4),
whatever the moment its handshake fails; one that hears nothing leaves after --max-idle-s (exit 3).

A failed handshake takes the socket's only peer away within milliseconds, so a blocking send
after it (the HELLO, once) waited for ever: a keyless node hung until killed."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np

import pytest
import zmq

from testbed.aggregator import Aggregator
from testbed.auth import RunKeys, curve_available
from tests.runs import ROOT

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not curve_available(), reason="this libzmq has no CURVE")]


@pytest.fixture
def aggregator():
    """A CURVE aggregator for node n0, polled in a thread until the test ends."""
    keys = RunKeys.generate(["n0"])
    agg = Aggregator("refused-test", {"n0": "host"}, lambda name: ({"model": {}, "data": {}}, {}),
                     bind="127.0.0.1", port=0, keys=keys)
    stop = threading.Event()
    poller = threading.Thread(target=lambda: [agg.poll(0.05) for _ in iter(stop.is_set, True)], daemon=True)
    poller.start()
    yield agg, keys
    stop.set()
    poller.join(5)
    agg.close(say_bye=False)


def _node(endpoint: str, *args: str, key: str | None = None) -> subprocess.Popen:
    env = {"PATH": "/usr/bin:/bin", **({"FEDGE_NODE_KEY": key} if key else {})}
    return subprocess.Popen([sys.executable, "-m", "node", f"--connect={endpoint}", "--name=n0", "--threads=1", *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_nodes_the_aggregator_refuses_leave_and_say_why(aggregator):
    agg, keys = aggregator
    nodes = {  # --max-idle-s 600: only the refusal can end them within the test's minute
        "requires CURVE": _node(agg.endpoint, "--max-idle-s=600"),
        "refused this node's key": _node(agg.endpoint, "--max-idle-s=600", f"--server-key={keys.server_public}",
                                         key=zmq.curve_keypair()[1].decode()),
        "is --server-key this run's server key": _node(agg.endpoint, "--max-idle-s=600",
                                                       f"--server-key={zmq.curve_keypair()[0].decode()}",
                                                       key=keys.nodes["n0"][1]),
    }
    try:
        for reason, node in nodes.items():
            _, said = node.communicate(timeout=60)
            assert node.returncode == 4 and reason in said, said[-2000:]
    finally:
        for node in nodes.values():
            node.kill()
            node.wait()


def test_a_node_that_hears_nothing_leaves_after_max_idle():
    with zmq.Context.instance().socket(zmq.ROUTER) as silent:  # accepts, never answers
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        node = _node(f"tcp://127.0.0.1:{port}", "--max-idle-s=2")
        try:
            _, said = node.communicate(timeout=60)
        finally:
            node.kill()
        assert node.returncode == 3 and "nothing from the aggregator for 2 s" in said, said[-2000:]


def test_a_stalled_handshake_is_tried_again_not_taken_for_a_refusal():
    """A peer that accepts the connection and never answers (an overloaded aggregator, a lost
    packet): the node drops the handshake after 5 s and tries again, and never says refused."""
    import socket
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)  # the kernel accepts; nobody speaks ZMTP
        node = _node(f"tcp://127.0.0.1:{mute.getsockname()[1]}", "--max-idle-s=14")
        try:
            _, said = node.communicate(timeout=90)
        finally:
            node.kill()
    assert node.returncode == 3 and said.count("stalled; trying again") >= 2, said[-2000:]
    assert "s after the stalled handshake" in said, "the log says how long connecting again took"


def test_a_node_whose_data_differ_from_the_runs_refuses_to_train(tmp_path):
    """The WELCOME names the data and their fingerprint; a node that reads other examples (another
    version of the file, another copy on a device) says so and leaves (exit 5), before training."""
    import csv
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("text", "label"), ("good", "pos"), ("bad", "neg"), ("fine", "pos")])
    welcome = {"model": {"name": "all-minilm-l6-v2", "num_labels": 2, "num_layers": 1, "seed": 0},
               "data": {"source": {"path": str(path)}, "fingerprint": "0123456789abcdef", "max_len": 16}}
    code, said = _welcomed(welcome)
    assert code == 5, said[-2000:]
    assert f"this node's data ({path}) differ from the aggregator's" in said and "0123456789abcdef" in said


def test_a_node_whose_checkpoint_differs_from_the_runs_refuses_to_train(tmp_path):
    from tests.unit.test_local_checkpoints import checkpoint
    folder = checkpoint(tmp_path, "bert")
    welcome = {"model": {"name": "local", "num_labels": 2, "num_layers": None, "seed": 0, "path": folder},
               "model_fingerprint": "fedcba9876543210",
               "data": {"source": {"dataset": "rotten_tomatoes"}, "fingerprint": _rt_fingerprint(), "max_len": 16}}
    code, said = _welcomed(welcome)
    assert code == 5 and f"this node's model ({folder}) differs from the aggregator's" in said, said[-2000:]


def _welcomed(welcome: dict) -> tuple[int | None, str]:
    """Start node n0 against an aggregator whose WELCOME is `welcome`; its exit code and output."""
    keys = RunKeys.generate(["n0"])
    agg = Aggregator("welcome-test", {"n0": "host"}, lambda name: (welcome, {"shard": np.arange(2)}),
                     bind="127.0.0.1", port=0, keys=keys)
    node = _node(agg.endpoint, "--max-idle-s=600", f"--server-key={keys.server_public}", key=keys.nodes["n0"][1])
    try:
        deadline = time.monotonic() + 90
        while node.poll() is None and time.monotonic() < deadline:
            agg.poll(0.1)
        _, said = node.communicate(timeout=10)
    finally:
        node.kill()
        agg.close(say_bye=False)
    return node.returncode, said


def _rt_fingerprint() -> str:
    from node.data import load_dataset
    return load_dataset("rotten_tomatoes").fingerprint
