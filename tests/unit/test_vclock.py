"""The virtual clock's arithmetic (testbed/vclock.py) against times worked out by hand: link
times from rate, latency and bytes; a round's arrivals, deadline and mid-round faults."""
from __future__ import annotations

from dataclasses import replace

import pytest

from emulation.launch import Emulate, Launcher
from emulation.profiles import get_profile
from node.device import Emulated
from testbed.aggregator import NodeRecord, RoundOutcome
from testbed.faults import Injector
from testbed.scenario import ScenarioError, expand_nodes, parse
from testbed.vclock import VirtualRound, link_s, real_timeout_s
from tests.unit.test_fault_injector import BASE, Agg, Recorder

LINK = {"uplink_mbit": 8, "downlink_mbit": 16, "latency_ms": 10}


def test_a_link_takes_latency_plus_bytes_at_its_rate():
    assert link_s(1_000_000, 8, 10, 0.0) == pytest.approx(1.01)         # 8e6 bits at 8e6 bit/s, + 10 ms
    assert link_s(1_000_000, 0, 10, 0.0) == pytest.approx(0.01)         # unshaped: latency only
    # 8 Mbit/s until t = 0.5 (4e6 bits), then 4 Mbit/s for the other 4e6 bits (1 s)
    assert link_s(1_000_000, 8, 0, 0.0, [(0.0, 8), (0.5, 4)]) == pytest.approx(1.5)
    # from 0.25: 2e6 bits by 0.5, the other 6e6 at 4 Mbit/s
    assert link_s(1_000_000, 8, 0, 0.25, [(0.0, 8), (0.5, 4)]) == pytest.approx(0.25 + 1.5)


def make(faults=None):
    sc = parse({**BASE, "clock": "virtual", "faults": faults or {},
                "nodes": [{"group": "a", "count": 2, "profile": "host", "overrides": LINK}]})
    backend = Recorder()
    inj = Injector(sc, expand_nodes(sc), backend, 1.0, virtual=True)
    inj.begin_strategy("fedlora", Agg(), Launcher("run", "tcp://x", 1.0, virtual=True))
    return inj, backend


def outcome(compute: dict[str, float]) -> RoundOutcome:
    """Both nodes answered: 2 MB down (1 s at 16 Mbit/s), 1 MB up (1 s at 8 Mbit/s), 10 ms each way."""
    recs = {n: NodeRecord(n, "host", "ok", compute_s=c, bytes_down=2_000_000, bytes_up=1_000_000)
            for n, c in compute.items()}
    return RoundOutcome({n: object() for n in compute}, recs, 0.0, set(compute))


def settle(inj, deadline=100.0, start=50.0, compute=None):
    inj.begin_round(1, start)
    out = outcome(compute or {"a-0": 2.0, "a-1": 5.0})
    return VirtualRound(inj, start, deadline).settle(out), out


def test_a_round_lasts_until_its_last_arrival():
    inj, _ = make()
    wall, out = settle(inj)
    assert wall == pytest.approx(1.01 + 5.0 + 1.01)
    assert out.records["a-0"].download_s == pytest.approx(1.01) and out.records["a-0"].upload_s == pytest.approx(1.01)
    assert set(out.results) == {"a-0", "a-1"}
    assert inj.now_s() == pytest.approx(50 + 7.02), "the injector's clock ends at the round's end"


def test_a_result_after_the_deadline_is_dropped_and_the_round_lasts_the_deadline():
    inj, _ = make()
    wall, out = settle(inj, deadline=6.0)
    assert wall == 6.0 and set(out.results) == {"a-0"}
    assert (out.records["a-1"].status, out.records["a-1"].reason) == ("dropped", "missed the round deadline")


def test_a_kill_before_the_arrival_loses_the_result_and_does_not_lengthen_the_round():
    inj, backend = make({"events": [{"round": 1, "after_s": 5, "action": "kill", "nodes": ["a-1"]}]})
    wall, out = settle(inj)
    assert set(out.results) == {"a-0"} and out.records["a-1"].status == "failed"
    assert wall == pytest.approx(4.02), "the round ends with a-0's arrival, as the real round stops waiting"
    assert ("kill", "a-1") in backend.calls and inj.why_failed("a-1") == "killed by a fault event"


def test_a_kill_after_the_arrival_keeps_the_result():
    inj, _ = make({"events": [{"round": 1, "after_s": 4.5, "action": "kill", "nodes": ["a-0"]}]})
    wall, out = settle(inj)
    assert set(out.results) == {"a-0", "a-1"} and wall == pytest.approx(7.02)


def test_a_paused_task_stands_still_for_the_pause():
    inj, backend = make({"events": [{"round": 1, "after_s": 1, "action": "pause", "nodes": ["a-0"], "duration_s": 3}]})
    wall, out = settle(inj, compute={"a-0": 4.0, "a-1": 1.0})
    assert wall == pytest.approx(6.02 + 3), "a-0 arrives 3 s late: 1.01 + 4 + 1.01 + the pause"
    assert set(out.results) == {"a-0", "a-1"}
    assert backend.calls == [], "the virtual clock pauses the task, not the process"


def test_a_node_going_offline_with_work_out_loses_it():
    sc = parse({**BASE, "clock": "virtual", "nodes": [{"group": "a", "count": 2, "profile": "host", "overrides": LINK}],
                "faults": {"availability": {"markov": {"mean_on_s": 1e9, "mean_off_s": 1.0}}}})
    inj = Injector(sc, expand_nodes(sc), Recorder(), 1.0, virtual=True)
    inj.begin_strategy("fedlora", Agg(), Launcher("run", "tcp://x", 1.0, virtual=True))
    inj.intervals = {"a-1": _Spans(online_until=3.0)}
    inj.queue.clear()
    inj._start_clocks(0.0)
    wall, out = settle(inj, start=0.0)
    assert set(out.results) == {"a-0"} and out.records["a-1"].status == "failed"
    assert "went offline at 3.0 s" in inj.why_failed("a-1") and wall == pytest.approx(4.02)


class _Spans:
    """Online from 0 until `online_until`, then offline for good."""

    def __init__(self, online_until):
        self.until = online_until

    def online_at(self, t):
        return t < self.until

    def next_change(self, t):
        return self.until if t < self.until else None


def test_a_virtual_node_reports_cpu_seconds_at_its_share_and_never_waits():
    dev = Emulated(0.25, "virtual")
    assert dev.stretched(wall_s=9.0, cpu_s=0.5) == pytest.approx(2.0) and not dev.waits
    assert Emulated(0.25, "cpu").waits and Emulated(0.5).waits and not Emulated().waits
    launch = Launcher("run", "tcp://x", 1.0, virtual=True).launch("a-0", expand_nodes(make()[0].sc)[0].profile)
    assert launch.emulated(None) == Emulated(launch.limits.cpus, "virtual"), "no transport shaping: links are timed"


def test_the_real_wait_covers_the_deadline_at_the_tasks_cpu():
    assert real_timeout_s(100.0, [0.5, 0.5, 1.0], cores=2) == pytest.approx(200.0)
    assert real_timeout_s(1.0, [0.5], cores=2) == 60.0


@pytest.mark.parametrize("change, field", [
    ({"backend": "netns"}, "backend: "),
    ({"dilation": 3}, "dilation: "),
    ({"nodes": [{"group": "pi", "count": 1, "profile": "rpi5", "backend": "remote"}]}, "nodes[0]: "),
])
def test_what_the_virtual_clock_cannot_time_is_refused_naming_the_field(change, field):
    with pytest.raises(ScenarioError) as err:
        parse({**BASE, "clock": "virtual", **change})
    assert field in str(err.value) and "clock: virtual" in str(err.value)


def test_virtual_parallel_goes_with_the_virtual_clock():
    assert parse({**BASE, "clock": "virtual", "virtual_parallel": 3}).virtual_parallel == 3
    with pytest.raises(ScenarioError) as err:
        parse({**BASE, "virtual_parallel": 3})
    assert "virtual_parallel: goes with clock: virtual" in str(err.value)


def test_a_pause_with_an_asynchronous_strategy_is_refused_on_the_virtual_clock():
    doc = {**BASE, "clock": "virtual", "strategies": {"baseline": "fedlora",
                                                      "run": [{"name": "fedlora"}, {"name": "fedbuff"}]}}
    parse(doc)
    with pytest.raises(ScenarioError) as err:
        parse({**doc, "faults": {"events": [{"round": 2, "action": "pause", "nodes": ["pi-0"]}]}})
    assert "faults.events[0].action" in str(err.value) and "fedbuff" in str(err.value)


def test_agreement_takes_the_real_runs_devices_by_their_cpu_model():
    from testbed.vclock import agreement

    def node(name, compute, up=0.5, down=0.5, short=0.0, status="ok"):
        return {"node": name, "status": status, "compute_s": compute, "upload_s": up, "download_s": down,
                "host_short_s": short}
    # the real run: agx-0 took 5 s, of which the host added 1 s (it got 4/5 of its share); nx-0 kept up
    real = [{"strategy": "legend", "round": 0, "wall_s": 0.0, "accuracy": 0.5, "nodes": []},
            {"strategy": "legend", "round": 1, "wall_s": 10.0, "accuracy": 0.7,
             "nodes": [node("agx-0", 5.0, short=1.0), node("nx-0", 8.0), node("tx2-0", 9.0, status="dropped")]}]
    virtual = [{"strategy": "legend", "round": 0, "wall_s": 0.0, "accuracy": 0.5, "nodes": []},
               {"strategy": "legend", "round": 1, "wall_s": 9.0, "accuracy": 0.7,
                "nodes": [node("agx-0", 4.2), node("nx-0", 8.8), node("tx2-0", 9.5)]}]
    a = agreement(real, virtual)
    assert a.accuracy_pairs == [("legend", 1, 0.7, 0.7)] and a.accuracy_identical
    # the round: 10 s, set by nx-0 (0.5 + 8 + 0.5 = 9 s) or agx-0 (6 s, 5 without the host's second):
    # the slowest device's time is the same by either measure, so nothing comes off
    assert a.round_ratios == [("legend", 1, pytest.approx(0.9))]
    # compute: 4.2 / (5 - 1) and 8.8 / 8; the dropped real node is not compared
    assert a.compute_ratios == [("legend", 1, "agx-0", pytest.approx(1.05)), ("legend", 1, "nx-0", pytest.approx(1.1))]
    # a device's time, download + compute + upload: 5.2 / (6 - 1) by the CPU model, 5.2 / 6 as recorded
    assert a.device_ratios[0] == ("legend", 1, "agx-0", pytest.approx(1.04))
    assert a.recorded_ratios[0] == ("legend", 1, "agx-0", pytest.approx(5.2 / 6))
    assert a.host_short == [("legend", 1, "agx-0", pytest.approx(0.2))]
    assert a.worst == pytest.approx(9.8 / 9 - 1)                  # nx-0: 0.5 + 8.8 + 0.5 against 9
    # were the host's stretch on nx-0 (2 s of its 8), the round would have ended 2 s earlier:
    # without it nx-0 takes 7 s, agx-0 5 (6 recorded): the slowest is 7 s, not 9
    real[1]["nodes"][1]["host_short_s"] = 2.0
    assert agreement(real, virtual).round_ratios == [("legend", 1, pytest.approx(9.0 / (10.0 - 2.0)))]


def test_virtual_nodes_get_the_cpu_weight_of_their_share_as_niceness():
    from node.device import weight_nice
    # the kernel's weight falls by 1.25 a step of niceness (nice 0: 1024, 3: 526, 6: 272 in its
    # table): a TX2 (1/4 of the AGX's share) at nice 6 weighs 1024 / 272 = 3.8 times less
    assert [weight_nice(s, 4.0) for s in (4.0, 2.0, 1.0)] == [0, 3, 6]
    assert weight_nice(0.001, 4.0) == 19 and weight_nice(5.0, 4.0) == 0   # the kernel's range
    launcher = Launcher("run", "tcp://x", 1.0, virtual=True, largest_share=1.0)
    tx2 = replace(get_profile("jetson-tx2"), cpu_share=0.25)
    dev = launcher.launch("tx2-0", tx2).emulated(Emulate())
    assert (dev.cpu_clock, dev.nice) == ("virtual", 6)
    # the real clock's nodes keep the weights of their sandbox (netns) or stretch wall time: no niceness
    assert Launcher("run", "tcp://x", 1.0, largest_share=1.0).launch("tx2-0", tx2).emulated(Emulate()).nice == 0
    with pytest.raises(ValueError, match=r"nice must be in \[0, 19\]"):
        Emulated(1.0, "virtual", nice=20)


def test_agreement_takes_the_real_compute_at_the_hosts_speed_of_the_virtual_run():
    from testbed.vclock import agreement

    def node(name, compute, cpu, up=1.0, down=1.0):
        return {"node": name, "status": "ok", "compute_s": compute, "cpu_s": cpu, "upload_s": up, "download_s": down}
    # both clocks: compute = CPU seconds / share (0.5 here). The virtual run's host did the same
    # work in 0.9 of the CPU seconds on agx-0 and nx-0; nx-1 took 0.63 of them: it moved alone
    real = [{"strategy": "fedlora", "round": 1, "wall_s": 10.0, "accuracy": 0.6,
             "nodes": [node("agx-0", 4.0, 2.0), node("nx-0", 8.0, 4.0), node("nx-1", 6.0, 3.0)]}]
    virtual = [{"strategy": "fedlora", "round": 1, "wall_s": 9.2, "accuracy": 0.6,
                "nodes": [node("agx-0", 3.6, 1.8), node("nx-0", 7.2, 3.6), node("nx-1", 3.78, 1.89)]}]
    a = agreement(real, virtual)
    assert a.host_speed == [("fedlora", 1, pytest.approx(0.9))]          # median of 0.9, 0.9, 0.63
    assert [r for *_, r in a.model_ratios] == [pytest.approx(1.0)] * 3   # 2 s a CPU second in both
    assert [r for *_, r in a.compute_ratios] == [pytest.approx(1.0), pytest.approx(1.0), pytest.approx(0.7)]
    # agx-0's whole time: 1 + 3.6 + 1 against 1 + 4 x 0.9 + 1; as recorded, against 6
    assert a.device_ratios[0][-1] == pytest.approx(1.0) and a.recorded_ratios[0][-1] == pytest.approx(5.6 / 6)
    # the round: its slowest device, nx-0 (10 s), would take 1 + 7.2 + 1 = 9.2 at that speed
    assert a.round_ratios == [("fedlora", 1, pytest.approx(1.0))]


def test_agreement_shows_a_cpu_model_that_differs_between_the_clocks():
    from testbed.vclock import agreement
    real = [{"strategy": "legend", "round": 1, "wall_s": 5.0, "accuracy": 0.6, "nodes": [
        {"node": "tx2-0", "status": "ok", "compute_s": 4.0, "cpu_s": 1.0, "upload_s": 0.5, "download_s": 0.5}]}]
    virtual = [{"strategy": "legend", "round": 1, "wall_s": 3.0, "accuracy": 0.6, "nodes": [   # share 0.5, not 0.25
        {"node": "tx2-0", "status": "ok", "compute_s": 2.0, "cpu_s": 1.0, "upload_s": 0.5, "download_s": 0.5}]}]
    a = agreement(real, virtual)
    assert a.host_speed == [("legend", 1, 1.0)] and a.model_ratios == [("legend", 1, "tx2-0", 0.5)]
    assert a.compute_ratios == [("legend", 1, "tx2-0", 0.5)]


def test_agreement_adds_each_devices_seconds_over_its_rounds_before_dividing():
    from testbed.vclock import agreement

    def row(rnd, wall, computes):
        return {"strategy": "fedra", "round": rnd, "wall_s": wall, "accuracy": 0.6, "nodes": [
            {"node": n, "status": "ok", "compute_s": c, "upload_s": 0.0, "download_s": 0.0} for n, c in computes]}
    real = [row(1, 4.0, [("nx-0", 2.0), ("tx2-0", 4.0)]), row(2, 6.0, [("nx-0", 3.0), ("tx2-0", 6.0)])]
    virtual = [row(1, 4.4, [("nx-0", 2.6), ("tx2-0", 4.4)]), row(2, 5.4, [("nx-0", 2.4), ("tx2-0", 5.4)])]
    a = agreement(real, virtual)
    assert [r for *_, r in a.compute_ratios] == [pytest.approx(x) for x in (1.3, 1.1, 0.8, 0.9)]
    # nx-0: (2.6 + 2.4) / (2 + 3) = 1.0, though its rounds were 30% and 20% apart; tx2-0: 9.8 / 10
    assert a.compute_totals == [("nx-0", pytest.approx(1.0)), ("tx2-0", pytest.approx(0.98))]
    assert a.device_totals == a.compute_totals                      # no link time here
    assert a.rounds_total == pytest.approx((4.4 + 5.4) / (4.0 + 6.0))
