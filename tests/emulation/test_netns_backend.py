"""Real namespaces, veths, qdiscs and cgroups: limits are in force, and nothing is left after."""
from __future__ import annotations

import os
import time
import uuid

import pytest

from emulation import cgroups, netns
from emulation.backends.netns import NetnsBackend
from emulation.cleanup import clean, tagged_processes
from emulation.launch import Launcher
from emulation.profiles import get_profile

pytestmark = pytest.mark.emulation


SPEC = {"name": "all-minilm-l6-v2", "num_labels": 2, "num_layers": 2, "seed": 0}


# every test runs twice: nodes as their own interpreters (`ip netns exec`), and forked from the
# node zygote (they enter their cgroup and namespace themselves, right after fork)
@pytest.fixture(params=[False, True], ids=["exec", "zygote"])
def backend(request, netns_caps, tmp_path):
    run_id = f"test-{uuid.uuid4().hex[:6]}"
    b = NetnsBackend(run_id, tmp_path, netns_caps)
    try:
        b.prepare(SPEC, "rotten_tomatoes", zygote=request.param)
        yield b
    finally:
        b.teardown()


def test_limits_are_in_force_and_removed(backend, netns_caps):
    backend.cpu_limit = "quota"  # a CFS quota (the default, weight, is the test below)
    ip = backend.bind_address("127.0.0.1")
    assert ip.startswith(netns.NET_BASE + ".")
    profile = get_profile("rpi4").with_overrides(uplink_mbit=5.0, downlink_mbit=20.0, memory_mb=1500)
    backend.start(Launcher(backend.run_id, f"tcp://{ip}:1", 2.0).launch("n0", profile))  # nobody listens: it retries
    assert backend.alive("n0")
    lim = backend.limits("n0")
    assert lim["cpu_share"] == pytest.approx(0.18 / 2.0, rel=0.02)
    shared = backend.zygote.shared_mb if backend.zygote else 0  # charged to the zygote, not the node
    assert lim["memory_bytes"] == int(1500 - shared) * 2**20
    assert "htb" in lim["uplink"] and "htb" in lim["downlink"]
    ns, link, cg, _ = backend.sandboxes["n0"]
    up = netns.sh("ip", "netns", "exec", ns.name, "tc", "class", "show", "dev", link.node_if).stdout
    down = netns.sh("tc", "class", "show", "dev", link.host_if).stdout
    assert "rate 2500Kbit" in up, up      # 5 Mbit/s at dilation 2
    assert "rate 10Mbit" in down, down    # 20 Mbit/s at dilation 2
    pid = backend.procs["n0"].pid
    assert pid in cg.pids(), "the node must run inside its cgroup"
    # exec'd nodes get there through `ip netns exec`, which enters the namespace after Popen returns
    deadline = time.monotonic() + 10
    while os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat(ns.path).st_ino and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(ns.path).st_ino, "and inside its namespace"
    assert ns.name in netns.sh("ip", "netns", "list").stdout
    backend.teardown()
    assert not backend.alive("n0")
    left = netns.leftovers(backend.tag)
    assert left == {"namespaces": [], "interfaces": []}
    info = netns_caps["cgroup"]
    assert cgroups.leftovers(info["version"], info.get("v2_path"), run_id=backend.run_id) == []
    for parent in cgroups.parents(info.get("v2_path")):  # gone, unless another run is live there
        assert not parent.exists() or any(d.is_dir() for d in parent.iterdir()), parent
    assert tagged_processes(backend.run_id) == []


def test_cpu_limit_weight_lifts_the_quota_and_tells_the_node(netns_caps, tmp_path):
    """cpu_limit: weight: no quota, a weight of 10,000 per core of the dilated share, and the node
    is told to stretch its CPU seconds to that share itself."""
    b = NetnsBackend(f"test-{uuid.uuid4().hex[:6]}", tmp_path, netns_caps)
    b.cpu_limit = "weight"
    try:
        b.prepare(SPEC, "rotten_tomatoes", zygote=False)
        ip = b.bind_address("127.0.0.1")
        b.start(Launcher(b.run_id, f"tcp://{ip}:1", 2.0).launch("n0", get_profile("rpi4")))
        lim = b.limits("n0")
        assert lim["cpu_share"] is None and lim["cpu_weight"] == 900   # 0.18 / 2 x 10,000
        argv = open(f"/proc/{b.procs['n0'].pid}/cmdline").read().split("\0")
        assert "--cpu-clock=cpu" in argv and "--cpu-share=0.09" in argv, argv
        assert any("cpu_limit weight" in note for note in b.fidelity([get_profile("rpi4")], 2.0))
    finally:
        b.teardown()
    assert cgroups.leftovers(netns_caps["cgroup"]["version"], netns_caps["cgroup"].get("v2_path"), run_id=b.run_id) == []


def test_node_reaches_aggregator_through_the_bridge(backend):
    import zmq

    from node import protocol as P
    ip = backend.bind_address("127.0.0.1")
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port(f"tcp://{ip}")
    try:
        backend.start(Launcher(backend.run_id, f"tcp://{ip}:{port}", 1.0).launch("n1", get_profile("host")))
        assert router.poll(120_000), "no HELLO from the node inside its namespace"
        frames = router.recv_multipart()
        msg = P.decode(frames[1:])
        assert msg.type == P.HELLO and msg.meta["name"] == "n1"
    finally:
        router.close()


@pytest.mark.parametrize("zygote", [False, True], ids=["exec", "zygote"])
def test_clean_removes_leftovers_of_a_crashed_run(netns_caps, tmp_path, zygote):
    b = NetnsBackend(f"crash-{uuid.uuid4().hex[:6]}", tmp_path, netns_caps)
    b.prepare(SPEC, "rotten_tomatoes", zygote=zygote)
    ip = b.bind_address("127.0.0.1")
    b.start(Launcher(b.run_id, f"tcp://{ip}:1", 1.0).launch("n0", get_profile("host")))
    time.sleep(0.5)
    # the runner "crashes": no teardown; the safety net must find everything by run id
    removed = clean(run_id=b.run_id)
    assert any(r.startswith("process") for r in removed)
    assert any(r.startswith("namespace") for r in removed)
    assert any(r.startswith("cgroup") for r in removed)
    assert netns.leftovers(b.tag)["namespaces"] == []
    b.bridge = None  # removed below by clean's interface sweep
    assert netns.leftovers(b.tag)["interfaces"] == []
