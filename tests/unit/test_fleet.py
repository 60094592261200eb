"""The Fleet: one run's nodes spread over the scenario's backend and extra docker engines."""
from __future__ import annotations

import os

import pytest
import yaml
import zmq

from emulation.backends.base import Backend
from emulation.backends.fleet import Fleet
from emulation.launch import Launcher
from emulation.profiles import Profile
from testbed import scenario as S
from tests.runs import run_scenario, write_scenario

P = Profile("t", 1.0, 1, 512, 0.0, 0.0, 0.0, "test")


class Fake(Backend):
    """Records calls; a stand-in for a backend owning some nodes."""
    name = "fake"

    def __init__(self, label: str, bind: str, fail_teardown: bool = False):
        super().__init__(f"run-{label}", "/tmp", {"cores": 2})
        self.label, self.bind, self.fail = label, bind, fail_teardown
        self.calls: list[tuple] = []
        self.running: set[str] = set()
        self.torn = False

    def bind_address(self, requested):
        return self.bind

    def start(self, launch):
        self.calls.append(("start", launch.name, launch.endpoint))
        self.running.add(launch.name)

    def alive(self, name):
        return name in self.running

    def kill(self, name):
        self.calls.append(("kill", name))
        self.running.discard(name)

    def stop(self, name):
        self.running.discard(name)

    def nodes(self):
        return sorted(self.running)

    def fidelity(self, profiles, dilation):
        return [f"{self.label}: {len(profiles)} node(s)"]

    def teardown(self):
        self.torn = True
        if self.fail:
            raise RuntimeError(f"{self.label} unreachable")


class FakeAgg:
    bind, port = "10.0.0.1", 5000

    def __init__(self, taken: set[str] = frozenset()):
        self.taken, self.extra = taken, []

    def listen_also(self, bind, port=0):
        if port and bind in self.taken:
            raise zmq.ZMQError(zmq.EADDRINUSE)
        ep = f"tcp://{bind}:{port or 6001}"
        self.extra.append(ep)
        return ep


def fleet(fail=False):
    main, e2, far = Fake("main", "10.0.0.1"), Fake("e2", "10.0.9.1"), Fake("far", "192.168.1.4", fail)
    placement = {"a-0": None, "b-0": "e2", "c-0": "far", "c-1": "far"}
    return Fleet(main, {"e2": e2, "far": far}, placement, {n: P for n in placement}), main, e2, far


def test_each_node_goes_to_its_backend_and_dials_where_that_engine_reaches_the_aggregator():
    f, main, e2, far = fleet()
    agg = FakeAgg(taken={"192.168.1.4"})
    eps = f.attach(agg, "127.0.0.1")
    assert eps == {"e2": "tcp://10.0.9.1:5000", "far": "tcp://192.168.1.4:6001"}, "port taken there: another one"
    assert agg.extra == ["tcp://10.0.9.1:5000", "tcp://192.168.1.4:6001"]
    launcher = Launcher("run", "tcp://10.0.0.1:5000", 1.0)
    for n in ("a-0", "b-0", "c-0", "c-1"):
        f.start(launcher.launch(n, P))
    assert main.calls == [("start", "a-0", "tcp://10.0.0.1:5000")]
    assert e2.calls == [("start", "b-0", "tcp://10.0.9.1:5000")]
    assert [c[1:] for c in far.calls] == [("c-0", "tcp://192.168.1.4:6001"), ("c-1", "tcp://192.168.1.4:6001")]
    f.kill("c-1")
    assert far.calls[-1] == ("kill", "c-1") and not f.alive("c-1") and f.alive("c-0")
    assert sorted(f.nodes()) == ["a-0", "b-0", "c-0"]
    assert f.fidelity([], 1.0) == ["main: 1 node(s)", "e2: 1 node(s)", "far: 2 node(s)"]


def test_messages_reach_every_member():
    f, *members = fleet()
    f.say = print
    assert all(m.say is print for m in members)


def test_cores_and_memory_per_host():
    """The dilation is sized per host: engines on this machine share its cores, another host has its own."""
    f, main, e2, far = fleet()
    main.core_demands = lambda ps: {"this host": (2, [0.5] * len(ps))}
    e2.core_demands = lambda ps: {"this host": (2, [1.0] * len(ps))}
    far.core_demands = lambda ps: {"tcp://far": (8, [0.25] * len(ps))}
    far.on_this_host = lambda name: False
    assert f.core_demands({n: P for n in ("a-0", "b-0", "c-0", "c-1")}) == {
        "this host": (2, [0.5, 1.0]), "tcp://far": (8, [0.25, 0.25])}
    assert [f.on_this_host(n) for n in ("a-0", "b-0", "c-0")] == [True, True, False]


def test_only_the_main_backends_nodes_fork():
    """zygote: auto counts the nodes that would fork: an engine's containers never do."""
    f, main, e2, far = fleet()
    assert [f.forks(n) for n in ("a-0", "b-0", "c-0")] == [False, False, False], "the fake main does not fork"
    main.forks_nodes = e2.forks_nodes = True
    assert [f.forks(n) for n in ("a-0", "b-0", "c-0", "c-1")] == [True, False, False, False]


def test_teardown_reaches_every_member_even_when_one_fails():
    f, main, e2, far = fleet(fail=True)
    with pytest.raises(RuntimeError, match="far unreachable"):
        f.teardown()
    assert main.torn and e2.torn and far.torn


SMOKE = __import__("pathlib").Path(__file__).resolve().parents[2] / "scenarios" / "smoke.yaml"


@pytest.mark.parametrize("url,connect,same", [
    ("unix:///run/docker2.sock", None, True),
    ("tcp://localhost:2375", None, True),
    ("tcp://127.0.0.1:2375", None, True),
    ("tcp://10.1.2.3:2376", "10.1.2.1", False),
    ("ssh://me@lab2", "192.168.1.4", False),
])
def test_engine_same_host_default(url, connect, same):
    doc = yaml.safe_load(open(SMOKE))
    doc["engines"] = {"e": {"url": url, **({"connect": connect} if connect else {})}}
    doc["nodes"][0]["engine"] = "e"
    sc = S.parse(doc)
    assert sc.engines["e"].same_host is same
    nodes = S.expand_nodes(sc)
    assert {n.engine for n in nodes if n.group == doc["nodes"][0]["group"]} == {"e"}
    assert {n.engine for n in nodes if n.group != doc["nodes"][0]["group"]} == {None}


def test_readme_engines_example_is_a_valid_scenario():
    import re
    readme = (SMOKE.parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n(engines:.*?)```", readme, re.S).group(1)
    doc = yaml.safe_load(SMOKE.read_text())
    doc.update(yaml.safe_load(block))
    sc = S.parse(doc, "README.md")
    assert {k: (e.same_host, e.connect) for k, e in sc.engines.items()} == {
        "lab2": (False, "192.168.1.10"), "lab3": (False, "192.168.1.10")}
    assert sum(1 for n in S.expand_nodes(sc) if n.engine) == 40


def test_an_unreachable_engine_stops_the_run_before_any_node_starts(tmp_path):
    doc = yaml.safe_load(SMOKE.read_text())
    doc["backend"] = "process"
    doc["engines"] = {"gone": {"url": f"unix://{tmp_path}/no-such-docker.sock"}}
    doc["nodes"][0]["engine"] = "gone"
    scenario = write_scenario(tmp_path, doc, "gone.yaml")
    out = tmp_path / "run"
    r = run_scenario(scenario, out, timeout=120, expect_rc=None,
                     env={**os.environ, "FEDGE_STATE": str(tmp_path / "state")}).proc
    assert r.returncode != 0
    assert f"engine gone (unix://{tmp_path}/no-such-docker.sock) is not reachable" in r.stderr, r.stderr[-2000:]
    assert not (out / "rounds.jsonl").exists() and not (out / "logs").exists()
    assert not (tmp_path / "state" / "engines.json").exists(), "an engine never used is not remembered"
