"""A node started by hand (`python -m node --connect ...`, as on a real Pi) joins a run."""
from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
import uuid

import pytest

from tests.runs import ROOT, read_run, start_run, write_scenario

pytestmark = pytest.mark.integration

TINY = """
name: tiny-remote
seed: 3
backend: BACKEND
model: {name: all-minilm-l6-v2, num_layers: 2}
data: {dataset: rotten_tomatoes, test_size: 40, train_size: 300, max_len: 16, partition: {kind: iid}}
training: {rounds: 2, local_steps: 2, batch_size: 8, lr: 0.001, target_accuracy: 0.99, round_deadline_s: 300}
nodes:
  - {group: emu, count: 1, profile: host}
  - {group: pi, count: 1, profile: rpi4, backend: remote}
strategies:
  baseline: fedlora
  run: [{name: fedlora, params: {rank: 2}}]
aggregator: {bind: 127.0.0.1, port: PORT, register_timeout_s: 240}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def _needs_netns():
    from emulation.backends import netns_missing
    from emulation.probe import probe
    missing = netns_missing(probe())
    if missing:
        pytest.skip(f"netns unavailable: missing {', '.join(missing)}")


@pytest.fixture
def device_netns():
    """A 'device' on its own network: a namespace joined to the host by one veth pair
    (10.232.0.1 on the host, 10.232.0.2 inside), like a Pi on a LAN. Removed after the test."""
    from emulation import netns as N
    _needs_netns()
    tag = uuid.uuid4().hex[:6]
    ns, host_if, dev_if = f"{N.NS_PREFIX}t{tag}-pi", f"{N.IF_PREFIX}t{tag}h", f"{N.IF_PREFIX}t{tag}d"
    try:
        N.sh("ip", "netns", "add", ns)
        N.sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", dev_if)
        N.sh("ip", "link", "set", dev_if, "netns", ns)
        N.sh("ip", "addr", "add", "10.232.0.1/30", "dev", host_if)
        N.sh("ip", "link", "set", host_if, "up")
        for cmd in (["addr", "add", "10.232.0.2/30", "dev", dev_if], ["link", "set", dev_if, "up"],
                    ["link", "set", "lo", "up"]):
            N.sh("ip", "-n", ns, *cmd)
        yield ns
    finally:
        N.sh("ip", "link", "del", host_if, check=False)
        N.sh("ip", "netns", "del", ns, check=False)


# process / netns: the emulated node on that backend, the hand-started one on loopback;
# remote-netns: the hand-started node in a namespace of its own, reaching the aggregator over a veth
@pytest.mark.parametrize("backend", ["process", "netns", "remote-netns"])
def test_hand_started_node_joins_and_trains(backend, tmp_path, procs, request):
    prefix, bind = [], "127.0.0.1"
    if backend == "netns":
        _needs_netns()
    if backend == "remote-netns":
        ns = request.getfixturevalue("device_netns")
        prefix, bind, backend = ["ip", "netns", "exec", ns], "10.232.0.1", "process"
    port = free_port()
    scenario = write_scenario(tmp_path, TINY.replace("PORT", str(port)).replace("BACKEND", backend)
                              .replace("bind: 127.0.0.1", f"bind: {bind}"), "tiny.yaml")
    out = tmp_path / "run"
    run = start_run(scenario, out, env={**os.environ, "CI": "true"})
    procs.append(run)
    # the operator copies the join command the run prints (it carries the node's CURVE key)
    lines = []
    for line in run.stdout:
        lines.append(line)
        if "to join: " in line:
            break
    else:
        pytest.fail("the run printed no join command:\n" + "".join(lines)[-3000:])
    words = shlex.split(line.split("to join: ", 1)[1])
    env = dict(w.split("=", 1) for w in words[:words.index("python")])
    assert words[words.index("python"):][:4] == ["python", "-m", "node", f"--connect=tcp://{bind}:{port}"]
    key = [w for w in words if w.startswith("--server-key=")]
    assert key and env.get("FEDGE_NODE_KEY")
    # a stranger with the right name and address but no key: refused, and told so
    intruder = subprocess.Popen([*prefix, sys.executable, *words[words.index("python") + 1:words.index(key[0])],
                                 "--threads", "1", "--max-idle-s", "600"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    procs.append(intruder)
    node = subprocess.Popen([*prefix, sys.executable, *words[words.index("python") + 1:], "--threads", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})
    procs.append(node)
    rest, _ = run.communicate(timeout=600)
    output = "".join(lines) + rest
    assert run.returncode == 0, output[-3000:]
    assert oct((out / "join.sh").stat().st_mode & 0o777) == "0o600" and line.split("to join: ", 1)[1].strip() in \
        (out / "join.sh").read_text()
    assert node.wait(timeout=60) == 0, "the node must leave cleanly when the aggregator says BYE"
    _, said = intruder.communicate(timeout=60)
    assert intruder.returncode == 4 and "requires CURVE" in said, said[-2000:]
    result = read_run(out, run)
    assert result.manifest["refused_connections"] >= 1
    rows = result.rounds
    trained = [r for r in rows if r["round"] > 0]
    assert len(trained) == 2
    for r in trained:
        status = {n["node"]: n["status"] for n in r["nodes"]}
        assert status == {"emu-0": "ok", "pi-0": "ok"}
    device = {n["name"]: n for n in result.manifest["nodes"]}["pi-0"]
    assert device["remote"] is True and device["device"]["machine"] == platform.machine()
    assert device["device"]["python"] == platform.python_version() and device["device"]["cpus"] >= 1
