"""The launch description: limits dilated in one place, and a command line no value can break.

z85 keys use '-' (one random key in 85 starts with it): given as two words, `--server-key -=O...`,
the node's parser read the key as an option and every node of the run exited. Every option is
one `--option=value` word now, for every backend and in the join line of a real device."""
from __future__ import annotations

import shlex

import pytest
import zmq

from emulation.launch import EVERYTHING, Emulate, Launcher, Limits, NODE_KEY_ENV, RUN_ENV
from emulation.profiles import PROFILES, Profile
from node.agent import parser


def dash_keypair() -> tuple[str, str]:
    """A real CURVE key pair whose public key starts with '-' (about one in 85 does)."""
    for _ in range(100_000):
        pub, sec = zmq.curve_keypair()
        if pub.startswith(b"-"):
            return pub.decode(), sec.decode()
    raise AssertionError("no key starting with '-' in 100000 draws")


def test_the_two_word_form_was_the_bug():
    key, _ = dash_keypair()
    with pytest.raises(SystemExit):
        parser().parse_args(["--connect", "tcp://127.0.0.1:1", "--name", "a-0", "--server-key", key])


@pytest.mark.parametrize("emulate", [EVERYTHING, Emulate(), Emulate(latency=True), Emulate(uplink=True, downlink=True),
                                     Emulate(cpu_time=True, latency=True)])
def test_every_value_that_starts_with_a_dash_is_read_as_a_value(emulate):
    server, _ = dash_keypair()
    profile = Profile("-odd", 0.25, 2, 1024, 10.0, 20.0, 5.0, "test")
    launch = Launcher("run-1", "tcp://10.0.0.1:5000", 4.0, server).launch("-node", profile)
    argv = launch.argv(emulate)
    assert all(a.startswith("--") and "=" in a for a in argv), argv
    a = parser().parse_args(argv)
    assert (a.server_key, a.name, a.profile, a.connect) == (server, "-node", "-odd", "tcp://10.0.0.1:5000")
    assert a.threads == 2
    # what the sandbox leaves to the node, dilated here and nowhere else
    # stretching wall time: the profile's share (contention already slowed it by about the
    # dilation); stretching CPU seconds (cores shared by weight): the dilated share 0.25 / 4
    assert a.cpu_share == (0.0625 if emulate.cpu_time else 0.25 if emulate.cpu else 1.0)
    assert a.cpu_clock == ("cpu" if emulate.cpu_time else "wall")
    assert a.uplink_mbit == (2.5 if emulate.uplink else 0.0)
    assert a.downlink_mbit == (5.0 if emulate.downlink else 0.0)
    assert a.latency_ms == (20.0 if emulate.latency else 0.0)


def test_limits_are_dilated_once():
    lim = Limits.of(PROFILES["rpi5"], 4.0)
    assert (lim.cpus, lim.cpu_share, lim.memory_mb) == (0.125, 0.5, 7168)
    assert (lim.uplink_mbit, lim.downlink_mbit, lim.latency_ms) == (10.0, 20.0, 20.0)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        Limits.of(PROFILES["rpi5"], 0.5)


def test_the_join_line_of_a_real_device_pastes_into_a_shell():
    server, _ = dash_keypair()
    _, secret = dash_keypair()
    launch = Launcher("run-1", "tcp://192.168.1.10:5555", 1.0, server, {"pi-0": secret}).launch("pi-0", PROFILES["rpi4"])
    line = launch.join_command()
    words = shlex.split(line)
    assert words[0] == f"{NODE_KEY_ENV}={secret}" and words[1:4] == ["python", "-m", "node"]
    a = parser().parse_args(words[4:])
    assert (a.server_key, a.name, a.profile, a.connect) == (server, "pi-0", "rpi4", "tcp://192.168.1.10:5555")
    assert "--threads" not in line and "--cpu-share" not in line  # a real device is itself


def test_the_environment_carries_the_run_and_only_its_own_key():
    launcher = Launcher("run-1", "tcp://x:1", 1.0, "S", {"a-0": "SECRET-A", "a-1": "SECRET-B"})
    env = launcher.launch("a-0", PROFILES["host"]).env
    assert env[RUN_ENV] == "run-1" and env[NODE_KEY_ENV] == "SECRET-A" and env["OMP_NUM_THREADS"] == "1"
    assert NODE_KEY_ENV not in Launcher("run-1", "tcp://x:1", 1.0).launch("a-0", PROFILES["host"]).env
