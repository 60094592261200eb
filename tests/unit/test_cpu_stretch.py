"""How a node stretches its compute phase to a slower CPU, and what the report reads back."""
from __future__ import annotations

import pytest

from node.agent import Agent, stretched
from node.device import Emulated
from testbed.report import cpu_disparity, effective_share


def test_wall_clock_stretches_the_measured_time():
    # the process backend: 2 s measured at share 0.25 stands for 8 s, whatever the CPU seconds
    assert stretched(2.0, 0.5, 0.25, "wall") == pytest.approx(8.0)


def test_cpu_clock_stretches_the_cpu_seconds_and_never_shortens():
    # cores shared by weight: 0.3 CPU seconds at a dilated share of 0.0667 (a TX2 at D = 3.75)
    # must take 0.3 / (0.25 / 3.75) = 4.5 s of wall time, however fast they ran
    assert stretched(0.9, 0.3, 0.25 / 3.75, "cpu") == pytest.approx(4.5)
    # an oversubscribed host made the phase longer than that already: it stays as long
    assert stretched(6.0, 0.3, 0.25 / 3.75, "cpu") == pytest.approx(6.0)


def test_the_time_the_host_added_is_the_wall_time_beyond_the_share():
    # 0.3 CPU s at a dilated share of 0.0667 are 4.5 s; a phase of 5.4 s wall had 0.9 s from the host
    tx2 = Emulated(cpu_share=0.25 / 3.75, cpu_clock="cpu")
    assert tx2.host_short(5.4, 0.3) == pytest.approx(0.9)
    assert tx2.host_short(0.9, 0.3) == 0.0                       # the host kept up (finished early)
    # the other clocks have no share to fall short of: their time is the wall's or the CPU's alone
    assert Emulated(cpu_share=0.25, cpu_clock="wall").host_short(5.4, 0.3) == 0.0
    assert Emulated(cpu_share=0.25, cpu_clock="virtual").host_short(5.4, 0.3) == 0.0


def test_node_rounds_the_host_stretched_are_counted_in_the_warnings():
    from testbed.report import short_node_rounds
    node = {"status": "ok", "compute_s": 2.0}
    rows = {"legend": [{"round": 1, "nodes": [{**node, "node": "agx-0", "host_short_s": 0.5},   # 25%
                                              {**node, "node": "nx-0", "host_short_s": 0.1},    # 5%: within
                                              {**node, "node": "tx2-0", "host_short_s": 0.0}]},
                       {"round": 2, "nodes": [{**node, "node": "agx-0", "host_short_s": 0.3},   # 15%
                                              {**node, "node": "nx-0", "status": "dropped", "host_short_s": 2.0}]}]}
    (line,) = short_node_rounds(rows)
    assert line.startswith("in 2 of 4 node-rounds the host gave the device less CPU than its share")
    assert "worst: 25%, agx-0 in legend round 1" in line
    # runs without the field (the process backend's records before it, other clocks) warn of nothing
    assert short_node_rounds({"fedlora": [{"round": 1, "nodes": [node]}]}) == []


def test_an_unknown_clock_or_an_impossible_share_is_refused():
    with pytest.raises(ValueError, match="cpu_clock must be one of wall, cpu"):
        Emulated(cpu_clock="cycles")
    with pytest.raises(ValueError, match=r"cpu_share must be in \(0, 1\] with the wall clock"):
        Emulated(1.5)  # stretching wall time cannot make a node faster than it ran
    assert Emulated(1.5, "cpu").stretched(1.0, 3.0) == pytest.approx(2.0)  # two threads' CPU seconds at 1.5 cores


@pytest.mark.parametrize("bad, match", [({"cpu_share": "fast"}, "device.cpu_share must be a number"),
                                        ({"cpu_share": 0.5, "gpu": 1}, "expected a mapping of"),
                                        ({"uplink_mbit": -1}, "uplink_mbit must be >= 0"),
                                        ([0.5], "expected a mapping of")])
def test_a_bad_device_from_the_wire_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        Emulated.from_dict(bad)


def test_a_task_that_carries_another_device_switches_the_node_to_it():
    """A profile changed mid-run reaches the node in its next TASK: new share, new transport links."""
    agent = Agent("tcp://127.0.0.1:1", "n", device=Emulated(0.25, "cpu", 10.0, 20.0, 5.0))
    first_uplink = agent.uplink
    faster = Emulated(0.5, "cpu", 40.0, 20.0, 5.0)
    assert Emulated.from_dict(faster.to_dict()) == faster
    agent.become(faster)
    assert agent.device.cpu_share == 0.5 and agent.uplink is not first_uplink
    assert agent.uplink.delay_for(5_000_000) == pytest.approx(1.0 + 0.005)  # 40 Mbit/s + 5 ms
    agent.sock.close(linger=0)


def test_effective_share_is_cpu_seconds_over_emulated_compute():
    nodes = [{"status": "ok", "compute_s": 8.0, "cpu_s": 2.0},       # a faithful 0.25 device
             {"status": "ok", "compute_s": 24.0, "cpu_s": 2.0},      # one three times slower
             {"status": "dropped", "compute_s": 0.0, "cpu_s": 0.0},  # lost: not counted
             {"status": "ok", "compute_s": 3.0}]                     # an older node without cpu_s
    assert effective_share(nodes) == pytest.approx(4.0 / 32.0)
    assert effective_share([{"status": "ok", "compute_s": 3.0}]) is None


def _node(profile, cpu_s, plan=None, status="ok"):
    return {"profile": profile, "cpu_s": cpu_s, "compute_s": 1.0, "status": status,
            "plan": plan or {"method": "lora", "blocks": [0, 1]}}


def test_a_class_that_needs_more_cpu_for_the_same_plan_is_a_fidelity_warning():
    # a TX2 that took 3.25x an AGX's CPU seconds for the same plan (a throttled quota)
    slow = {"fedlora": [{"nodes": [_node("agx", 2.0), _node("tx2", 6.5), _node("tx2", 6.5)]},
                        {"nodes": [_node("agx", 2.0), _node("tx2", 6.0)]},
                        {"nodes": [_node("agx", 2.0), _node("tx2", 7.0)]}]}
    (line,) = cpu_disparity(slow)
    assert line.startswith("tx2 needed 3.2x the host CPU seconds of agx for the same plan (median of 3 rounds)")
    # faithful classes, lost nodes and different plans give no warning
    fine = {"legend": [{"nodes": [_node("agx", 2.0), _node("tx2", 2.2), _node("tx2", 9.0, status="dropped"),
                                  _node("nx", 8.0, plan={"method": "lora", "blocks": [0]})]}]}
    assert cpu_disparity(fine) == []


def test_a_class_below_its_profiles_share_is_a_fidelity_warning():
    from testbed.report import share_shortfall
    manifest = {"backend": "netns", "nodes": [{"profile": {"name": "agx", "cpu_share": 1.0}},
                                              {"profile": {"name": "tx2", "cpu_share": 0.25}}]}
    # an AGX that used 1.6 CPU-s in 2.4 emulated seconds had 0.67 of a core, not 1.0; the TX2 is faithful
    rows = {"fedlora": [{"nodes": [{"profile": "agx", "status": "ok", "cpu_s": 1.6, "compute_s": 2.4},
                                   {"profile": "tx2", "status": "ok", "cpu_s": 1.6, "compute_s": 6.4}]}]}
    (line,) = share_shortfall(rows, manifest)
    assert line.startswith("agx had an effective share of 0.67 of a host core where its profile says 1 (67% of its")
    assert share_shortfall(rows, {**manifest, "backend": "process"}) == []
    faithful = {"fedlora": [{"nodes": [{"profile": "agx", "status": "ok", "cpu_s": 1.9, "compute_s": 2.0}]}]}
    assert share_shortfall(faithful, manifest) == []
