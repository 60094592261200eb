"""Nodes on more than one docker engine (scenario `engines:`), tested with a second dockerd on
this machine: its own socket, data-root and exec-root, no iptables of its own.

Two ways of using it:
- `e2` (unix:// socket: the same host): shaped from here as root, internal network, the
  aggregator listens on that network's gateway;
- `far` (the same engine declared `same_host: false`): what an engine on another host gets, a
  routed network, its nodes dialling `connect` (an address of this host on a veth made for the
  test), the uplink shaped by tc inside the container, the downlink in the node's transport.

Skipped, with the reason, without root, dockerd, a reachable default engine or the node image.
Traffic goes only to this machine's own addresses and the containers the tests start.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from emulation import image
from emulation.launch import Launcher
from emulation.profiles import Profile
from tests.runs import run_scenario, run_testbed, write_scenario

CONNECT = "10.231.254.1"  # the test's stand-in for "this host's address on the LAN" (outside pick_subnet's 1..250)
BRIDGE = "e2br0"  # the second engine's default bridge (10.231.253.1/24)


def _default_engine():
    try:
        return image.client(timeout=5)
    except image.ImageError:
        return None


CLIENT = _default_engine()


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "a second dockerd needs root"
    if not shutil.which("dockerd") or not shutil.which("docker"):
        return "no dockerd/docker CLI (apt-get install docker.io)"
    if CLIENT is None:
        return "no docker engine reachable to copy the node image from"
    if image.find_image(CLIENT, image.image_tag()) is None:
        return f"node image {image.image_tag()} is not built: run `make image`"
    return None


# serial: docker runs side by side were never tried (no engine on the machine the suite is made on)
pytestmark = [pytest.mark.emulation, pytest.mark.serial, pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")]


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def labelled(client, run_id: str) -> list[str]:
    sel = {"label": f"fedge.run={run_id}"}
    return ([f"container {c.name}" for c in client.containers.list(all=True, filters=sel)]
            + [f"network {n.name}" for n in client.networks.list(filters=sel)])


@pytest.fixture(scope="module")
def second_engine():
    """A second docker engine on this machine, holding the node image; stopped and removed after."""
    import docker
    base = Path(tempfile.mkdtemp(prefix="fedge-e2-", dir="/tmp"))  # short: socket paths have 108 bytes
    sock = base / "docker.sock"
    state = base / "state"
    # its default network on a bridge of its own: `--bridge none` would make it delete docker0, the
    # default engine's bridge (dockerd removes "docker0" when its default bridge is disabled)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", "10.231.253.1/24", "dev", BRIDGE], check=True)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
    cmd = ["dockerd", "--data-root", str(base / "data"), "--exec-root", str(base / "exec"), "-H", f"unix://{sock}",
           "--pidfile", str(base / "docker.pid"), "--bridge", BRIDGE, "--iptables=false", "--ip6tables=false"]
    log = open(base / "dockerd.log", "wb")
    docker0 = _link_exists("docker0")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    veth = ["ip", "link", "add", "e2c0a", "type", "veth", "peer", "name", "e2c0b"]
    old_state = os.environ.get("FEDGE_STATE")
    os.environ["FEDGE_STATE"] = str(state)  # engines.json of these tests only (subprocesses inherit it)
    try:
        client = None
        deadline = time.monotonic() + 60
        while client is None:
            try:
                client = docker.DockerClient(base_url=f"unix://{sock}", timeout=600)
                client.ping()
            except Exception:
                client = None
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"a second dockerd did not start: {(base / 'dockerd.log').read_text()[-800:]}")
                time.sleep(0.3)
        copied = image.copy_image(client, say=lambda m: None)  # from this host's engine
        subprocess.run(["ip", "link", "del", "e2c0a"], capture_output=True)
        subprocess.run(veth, check=True)
        subprocess.run(["ip", "addr", "add", f"{CONNECT}/32", "dev", "e2c0a"], check=True)
        for dev in ("e2c0a", "e2c0b"):
            subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        yield {"url": f"unix://{sock}", "client": client, "copied_s": copied, "state": state}
    finally:
        if old_state is None:
            os.environ.pop("FEDGE_STATE", None)
        else:
            os.environ["FEDGE_STATE"] = old_state
        subprocess.run(["ip", "link", "del", "e2c0a"], capture_output=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(base))]
        for m in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        assert _link_exists("docker0") == docker0, "the second engine must leave the default engine's docker0 alone"


@pytest.fixture(scope="module")
def host_caps():
    from emulation.probe import probe
    return probe()


def make_backend(second_engine, host_caps, tmp_path, **kw):
    from emulation.backends.docker import DockerBackend, Engine
    run_id = f"pytest-engine-{uuid.uuid4().hex[:6]}"
    return DockerBackend(run_id, tmp_path, host_caps, Engine(url=second_engine["url"], **kw))


PROFILE = Profile("t", cpu_share=0.5, threads=1, memory_mb=512, uplink_mbit=6.0, downlink_mbit=12.0,
                  latency_ms=0.0, source="test")


def test_image_is_copied_once(second_engine):
    e2 = second_engine["client"]
    assert image.find_image(e2, image.image_tag()) is not None
    assert second_engine["copied_s"] is None or second_engine["copied_s"] > 0
    assert image.copy_image(e2, CLIENT) is None, "a present image is not copied again"


def test_same_host_engine_limits_and_shaping(second_engine, host_caps, tmp_path):
    b = make_backend(second_engine, host_caps, tmp_path, name="e2")
    e2 = second_engine["client"]
    try:
        gw = b.bind_address("127.0.0.1")
        net = e2.networks.get(b.network.name)
        assert net.attrs["Internal"] is True and net.attrs["Labels"]["fedge.engine"] == "e2"
        b.start(Launcher(b.run_id, f"tcp://{gw}:9", 1.0).launch("n0", PROFILE))  # dummy endpoint: the node keeps retrying
        assert b.alive("n0")
        c = e2.containers.get(b.containers["n0"].id)
        assert c.attrs["HostConfig"]["NanoCpus"] == 500_000_000
        assert c.attrs["HostConfig"]["Memory"] == c.attrs["HostConfig"]["MemorySwap"] == 512 * 2**20
        assert labelled(CLIENT, b.run_id) == [], "nothing of it on the default engine"
        lim = b.limits("n0")
        assert re.search(r"rate 6Mbit", lim["uplink"]), lim["uplink"]
        assert re.search(r"rate 12Mbit", lim["downlink"]), lim["downlink"]
        assert e2.info()["DockerRootDir"] != CLIENT.info()["DockerRootDir"]  # really another engine
        assert e2.containers.get(f"fedge-{b.hash}-n0") and b.engine_facts["url"] == second_engine["url"]
    finally:
        b.teardown()
    assert labelled(e2, b.run_id) == []


def test_engine_on_another_host_is_shaped_inside_and_dials_connect(second_engine, host_caps, tmp_path):
    from emulation.backends import FaultUnsupported
    b = make_backend(second_engine, host_caps, tmp_path, name="far", same_host=False, connect=CONNECT)
    e2 = second_engine["client"]
    try:
        assert b.bind_address("127.0.0.1") == CONNECT == b.connect_address(CONNECT)
        assert e2.networks.get(b.network.name).attrs["Internal"] is False, "it must route to this host"
        b.start(Launcher(b.run_id, f"tcp://{CONNECT}:9", 2.0).launch("n0", PROFILE))
        c = b.containers["n0"]
        cmd = c.attrs["Config"]["Cmd"]
        assert "--downlink-mbit=6" in cmd and not any(a.startswith("--uplink-mbit") for a in cmd), cmd
        inside = c.exec_run(["tc", "class", "show", "dev", "eth0"])
        assert inside.exit_code == 0 and b"rate 3Mbit" in inside.output, inside.output
        notes = b.fidelity([PROFILE], 2.0)
        assert any("another host" in n and "transport" in n for n in notes), notes
        with pytest.raises(FaultUnsupported, match="root|engine on this host"):
            b.cut_link("n0")
        b.pause("n0")
        assert b.alive("n0")
        b.resume("n0")
    finally:
        b.teardown()
    assert labelled(e2, b.run_id) == []


RUN = """
name: two-engines
seed: 3
model: {name: all-minilm-l6-v2, num_layers: 2}
data: {dataset: rotten_tomatoes, test_size: 40, train_size: 300, max_len: 16, partition: {kind: iid}}
training: {rounds: 2, local_steps: 2, batch_size: 8, lr: 0.001, target_accuracy: 0.99, round_deadline_s: 300}
engines:
  e2: {url: "URL"}
  far: {url: "URL", same_host: false, connect: CONNECT}
nodes:
  - {group: here, count: 1, profile: rpi4}
  - {group: near, count: 1, profile: rpi4, engine: e2}
  - {group: away, count: 1, profile: rpi4, engine: far}
strategies:
  baseline: fedlora
  run: [{name: fedlora, params: {rank: 2}}]
aggregator: {register_timeout_s: 300}
"""


@pytest.mark.slow
def test_run_places_groups_on_engines(second_engine, tmp_path):
    url = second_engine["url"]
    scenario = write_scenario(tmp_path, RUN.replace("URL", url).replace("CONNECT", CONNECT), "two.yaml")
    out = tmp_path / "run"
    run = run_scenario(scenario, out, timeout=900)
    m = run.manifest
    assert m["status"] == "finished"
    assert {n["name"]: n.get("engine") for n in m["nodes"]} == {"here-0": None, "near-0": "e2", "away-0": "far"}
    assert m["engines"]["e2"]["nodes"] == ["near-0"] and m["engines"]["far"]["nodes"] == ["away-0"]
    assert m["engines"]["far"]["endpoint"].startswith(f"tcp://{CONNECT}:")
    assert m["engines"]["e2"]["url"] == url and m["engines"]["e2"]["cores"] >= 1
    assert any("engine far" in f and "another host" in f for f in m["fidelity"])
    rows = run.rounds
    trained = [row for row in rows if row["round"] > 0]
    assert len(trained) == 2
    for row in trained:
        assert {n["node"]: n["status"] for n in row["nodes"]} == {"here-0": "ok", "near-0": "ok", "away-0": "ok"}
    assert sorted(p.name for p in (out / "logs").iterdir() if p.name.endswith(".log")) == \
        ["away-0.log", "here-0.log", "near-0.log"]
    assert labelled(second_engine["client"], m["run_id"]) == [] and labelled(CLIENT, m["run_id"]) == []
    known = json.loads((second_engine["state"] / "engines.json").read_text())
    assert url in known, "the engine is remembered for `testbed clean`"


def test_clean_sweeps_every_engine_a_run_used(second_engine, host_caps, tmp_path):
    """A run that crashed leaves containers on another engine: `testbed clean --run` finds them."""
    b = make_backend(second_engine, host_caps, tmp_path, name="e2")
    gw = b.bind_address("127.0.0.1")
    b.start(Launcher(b.run_id, f"tcp://{gw}:9", 1.0).launch("n0", PROFILE))
    e2 = second_engine["client"]
    assert len(labelled(e2, b.run_id)) == 2  # the container and the network
    r = run_testbed("clean", "--run", b.run_id, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"on engine {second_engine['url']}" in r.stdout, r.stdout
    assert labelled(e2, b.run_id) == []
