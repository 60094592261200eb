"""Keys that start with '-' on every backend: the node registers with the run's CURVE keys.

z85 uses '-', so about one run in 85 drew a server key starting with it, and every node exited
with `argument --server-key: expected one argument`. Here every key (the server's and the
node's) starts with '-', and a node must register through each way the testbed starts one:
an exec'd process, a node forked from the zygote, a network namespace, a container, and the
join line a real device pastes into its shell."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import zmq

from emulation.backends import docker_missing
from emulation.backends.docker import DockerBackend
from emulation.backends.netns import NetnsBackend
from emulation.backends.process import ProcessBackend, process_env
from emulation.launch import Launcher
from emulation.profiles import get_profile
from node.data import announce
from testbed.aggregator import Aggregator
from testbed.auth import RunKeys

pytestmark = pytest.mark.emulation
ROOT = Path(__file__).resolve().parents[2]
SPEC = {"name": "all-minilm-l6-v2", "num_labels": 2, "num_layers": 1, "seed": 0}
NAME = "dash-0"


def dash_keypair() -> tuple[str, str]:
    while True:
        pub, sec = zmq.curve_keypair()
        if pub.startswith(b"-") and sec.startswith(b"-"):
            return pub.decode(), sec.decode()


@pytest.fixture(scope="module")
def keys():
    server, node = dash_keypair(), dash_keypair()
    return RunKeys(*server, {NAME: node})


def welcome(_):
    import numpy as np
    return {"model": SPEC, "data": announce("rotten_tomatoes", 16)}, {"shard": np.arange(8, dtype=np.int32)}


def registers(backend, keys, bind: str) -> None:
    agg = Aggregator(backend.run_id, {NAME: "host"}, welcome, bind=bind, keys=keys)
    try:
        endpoint = f"tcp://{backend.connect_address(agg.bind)}:{agg.port}"
        launcher = Launcher(backend.run_id, endpoint, 1.0, keys.server_public, {NAME: keys.nodes[NAME][1]})
        backend.start(launcher.launch(NAME, get_profile("host")))
        got = agg.wait_ready({NAME}, 180, backend.alive)
        assert got == {NAME}, f"{backend.exit_reason(NAME)}: {_log(backend)}"
        assert agg.refused_total == 0
    finally:
        agg.close(say_bye=True)
        backend.teardown()


def _log(backend) -> str:
    f = Path(backend.workdir) / "logs" / f"{NAME}.log"
    return f.read_text()[-1500:] if f.exists() else "(no log)"


@pytest.mark.parametrize("zygote", [False, True], ids=["exec", "zygote"])
def test_process_backend(keys, tmp_path, zygote):
    b = ProcessBackend(f"dash-{uuid.uuid4().hex[:6]}", tmp_path)
    b.prepare(SPEC, "rotten_tomatoes", zygote=zygote)
    registers(b, keys, "127.0.0.1")


@pytest.mark.parametrize("zygote", [False, True], ids=["exec", "zygote"])
def test_netns_backend(keys, netns_caps, tmp_path, zygote):
    b = NetnsBackend(f"dash-{uuid.uuid4().hex[:6]}", tmp_path, netns_caps)
    b.prepare(SPEC, "rotten_tomatoes", zygote=zygote)
    registers(b, keys, b.bind_address("127.0.0.1"))


@pytest.mark.serial  # docker runs side by side were never tried
def test_docker_backend(keys, caps, tmp_path):
    lacking = docker_missing(caps)
    if lacking:
        pytest.skip(f"docker backend unavailable here: {'; '.join(lacking)}")
    b = DockerBackend(f"dash-{uuid.uuid4().hex[:6]}", tmp_path, caps)
    registers(b, keys, b.bind_address("127.0.0.1"))


def test_the_join_line_of_a_real_device(keys, tmp_path):
    """The line the run prints for a remote device, pasted into a shell as it is."""
    run_id = f"dash-{uuid.uuid4().hex[:6]}"
    agg = Aggregator(run_id, {NAME: "host"}, welcome, keys=keys)
    proc = None
    try:
        launcher = Launcher(run_id, agg.endpoint, 1.0, keys.server_public, {NAME: keys.nodes[NAME][1]})
        line = launcher.launch(NAME, get_profile("host")).join_command()
        assert keys.server_public in line
        env = process_env({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
        with open(tmp_path / "device.log", "wb") as log:
            proc = subprocess.Popen(["bash", "-c", line], cwd=tmp_path, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        got = agg.wait_ready({NAME}, 180, lambda _: proc.poll() is None)
        assert got == {NAME}, (tmp_path / "device.log").read_text()[-1500:]
    finally:
        agg.close(say_bye=True)
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
