"""`python -m testbed calibrate` measures a node that joins and writes a profile a scenario can use."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emulation.backends.process import node_env
from testbed.scenario import expand_nodes, parse

# serial: it measures a link's rate and a device's speed
pytestmark = [pytest.mark.integration, pytest.mark.serial]
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_calibrate_a_local_node_with_a_known_link_and_speed(tmp_path):
    port, out = _free_port(), tmp_path / "dev.profile.yaml"
    cal = subprocess.Popen([sys.executable, "-m", "testbed", "calibrate", "--name", "dev", "--port", str(port),
                            "--num-layers", "2", "--steps", "3", "--timeout", "300", "--out", str(out),
                            "--idle-w", "2.7", "--load-w", "6.4"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the device: the ordinary node program, emulating half a host core and 40 / 80 Mbit/s in its transport
    node = subprocess.Popen([sys.executable, "-m", "node", "--connect", f"tcp://127.0.0.1:{port}", "--name", "dev",
                             "--threads", "1", "--cpu-share", "0.5", "--uplink-mbit", "40", "--downlink-mbit", "80"],
                            cwd=ROOT, env=node_env("calibrate-test", 1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        text, _ = cal.communicate(timeout=600)
        assert cal.returncode == 0, text[-3000:]
        assert node.wait(60) == 0, "the node leaves when the calibrator says BYE"
    finally:
        for p in (cal, node):
            if p.poll() is None:
                p.kill()
                p.wait()
    doc = yaml.safe_load(out.read_text())
    prof = doc["profiles"]["dev"]
    assert f"start the device: python -m node --connect=tcp://127.0.0.1:{port} --name=dev" in text
    assert 0.25 <= prof["cpu_share"] <= 0.8, prof     # 0.5 of one host core; timing noise on a busy 2-core host allowed
    assert prof["threads"] == 1 and prof["memory_mb"] > 100
    assert prof["downlink_mbit"] == pytest.approx(80, rel=0.25), prof
    assert prof["uplink_mbit"] == pytest.approx(40, rel=0.25), prof
    assert prof["latency_ms"] >= 0 and "calibrated" in prof["source"]
    # the file drops into a scenario as it is
    scenario = {"name": "cal", **doc, "nodes": [{"group": "pis", "count": 2, "profile": "dev"}],
                "strategies": {"baseline": "fedlora", "run": [{"name": "fedlora"}]}}
    nodes = expand_nodes(parse(scenario))
    assert nodes[0].profile.cpu_share == prof["cpu_share"] and nodes[1].profile.name == "dev"
    # the power meter's readings: idle and training; the radio, not measured, counts at idle
    power = nodes[0].profile.power
    assert (power.idle_w, power.compute_w, power.tx_w, power.rx_w) == (2.7, 6.4, 2.7, 2.7)


def test_calibrate_refuses_half_a_power_reading_before_waiting_for_a_device(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "testbed", "calibrate", "--name", "ghost", "--idle-w", "2.7",
                           "--out", str(tmp_path / "x.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "give both --idle-w and --load-w" in proc.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_calibrate_says_when_no_device_joins(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "testbed", "calibrate", "--name", "ghost", "--num-layers", "2",
                           "--steps", "1", "--timeout", "2", "--out", str(tmp_path / "x.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "no device joined as 'ghost' within 2 s" in proc.stderr
    assert not (tmp_path / "x.yaml").exists()
