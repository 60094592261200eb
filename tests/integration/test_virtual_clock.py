"""The virtual clock against the real emulation: legend-ci run in both clocks with real processes.

The real run is on the machine's default backend (netns as root, with `cpu_limit: weight`; the
process backend elsewhere); the virtual run is on the process backend. Both train the same nodes
on the same data with the same seeds, so each round's accuracy must be the same, and each
device's time (download + compute + upload) must agree within 10% over its rounds. Two strategies
are left out to keep the test short: HetLoRA (LoRA as FedLoRA, with other ranks) and full FedAvg
(its 60 MB models cross 1-30 Mbit/s links for minutes of real time). `bench/bench_clocks.py`
runs the whole scenario.
"""
from __future__ import annotations

import pytest

from testbed.vclock import agreement
from tests.runs import kill_run_processes, run_scenario

# serial: the real run's devices must get their CPU shares for the clocks to agree
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.serial]

SETS = ["training.rounds=2", "training.local_steps=16", "data.test_size=40",
        "strategies.run=[{name: fedlora, params: {rank: 8}}, {name: fedra, params: {rank: 8}}, {name: legend}]"]


@pytest.fixture(scope="module")
def both_clocks(tmp_path_factory):
    base = tmp_path_factory.mktemp("clocks")
    sets = [a for s in SETS for a in ("--set", s)]
    try:
        real = run_scenario("scenarios/legend-ci.yaml", base / "real", *sets, timeout=900)
        # every sampled node trains at once, as in the real run: the same contention in the CPU
        # seconds both measure (docs/virtual-clock.md: with fewer at once they measure less)
        virtual = run_scenario("scenarios/legend-ci.yaml", base / "virtual", *sets, "--set", "clock=virtual",
                               "--set", "virtual_parallel=6", timeout=900)
        yield real, virtual
    finally:
        kill_run_processes(base / "real", base / "virtual")


def test_both_clocks_finish_and_say_which_they_ran(both_clocks):
    real, virtual = both_clocks
    assert real.proc.returncode == 0, real.tail()
    assert virtual.proc.returncode == 0, virtual.tail()
    assert real.manifest["clock"] == "real" and virtual.manifest["clock"] == "virtual"
    assert virtual.manifest["backend"] == "process" and virtual.manifest["dilation"] == 1.0
    assert any(note.startswith("clock: virtual") for note in virtual.manifest["fidelity"])


def test_every_round_has_the_same_accuracy_in_both_clocks(both_clocks):
    real, virtual = both_clocks
    agree = agreement(real.rounds, virtual.rounds)
    assert len(agree.accuracy_pairs) == 6, agree.accuracy_pairs   # 3 strategies x 2 rounds
    assert agree.accuracy_identical, agree.accuracy_pairs


def test_each_devices_times_agree_within_ten_percent_over_its_rounds(both_clocks):
    """Both clocks time compute by one CPU model (CPU seconds at the profile's share): each
    device's emulated seconds per CPU second must be the same in both, to the float. So a
    device's compute time agrees as far as the same work costs the same CPU seconds in the two
    runs; a round is as long as its slowest device, so each round's time does; and so does each
    device's whole time in the round (download + compute + upload). 16 local steps make compute
    the larger part of it: on netns a link's time is measured from the node's heartbeats, which
    adds the node's wake-up and the heartbeat's own trip (0.1-0.7 s on a 0.3 MB task).

    The host does not do the same work in the same CPU seconds twice. Per round, the comparison
    takes the host's speed (the median over the round's devices of virtual / real CPU seconds)
    and the real compute at that speed: between runs a minute apart, a round's speed moved by up
    to 24% here. Within a round, one device's CPU seconds still move by more than 10% now and
    then: two real runs of this same test measured 1-3 of 30 device-rounds beyond 10% apart
    (worst 19.9%), and each device's total over its rounds within 4.1%; in a later real run one
    AGX spent 3.08 CPU s on a round where the other five devices spent 2.03-2.21 on the same
    work (29% against the virtual run). So each device's time is compared over its rounds,
    within 10%, and so are all rounds' time; one device-round or one round must agree within
    40% (a CPU model wrong by a device class's factor, 2x, would not), and the messages count
    those beyond 10%.

    The real devices are taken by their CPU model: where the host gave a device less CPU than
    its share (six nodes' shares add up to exactly the host's cores), the real run records the
    time that added (`host_short_s`) and says so in its warnings. That time is the real
    emulation's error, not the virtual clock's. A real round's time loses what the stretch added
    to its slowest device.

    The run's first round is left out. A node process's first task cost it more CPU seconds
    than its later ones, in both clocks (measured: 0.86-1.06 CPU s where every later round of
    the same plan takes 0.70-0.78), by an amount that differed from run to run. Nodes now import
    peft before they say ready, freeze their loaded objects out of the garbage collector, and
    begin their first task with an untimed step (`trainer.warm_up`): 0.72-0.79 since. What is
    left still varies, so the comparison does not rely on it."""
    real, virtual = both_clocks
    if real.manifest["backend"] != "netns":
        pytest.skip("the real clock ran on the process backend (no root), which stretches wall time under the "
                    "host's contention; the comparison needs the netns backend's CPU seconds")
    agree = agreement(*(_after_first_round(run.rounds) for run in (real, virtual)))
    beyond = [r for r in (*agree.compute_ratios, *agree.round_ratios) if abs(r[-1] - 1) > 0.10]
    why = ("host speed per round:", agree.host_speed, "host-stretched in the real run:", agree.host_short,
           "beyond 10%:", beyond)
    assert len(agree.model_ratios) >= 30, agree.model_ratios    # 6 devices x 5 rounds, all answered
    assert all(r[-1] == pytest.approx(1.0, rel=1e-6) for r in agree.model_ratios), agree.model_ratios
    assert len(agree.compute_totals) == len(agree.device_totals) == 6 and len(agree.round_ratios) == 5
    off = [r for r in (*agree.compute_totals, *agree.device_totals) if abs(r[-1] - 1) > 0.10]
    assert not off, ("a device's time over its rounds", off, *why)
    assert abs(agree.rounds_total - 1) <= 0.10, ("all rounds' time", agree.rounds_total, *why)
    off = [r for r in (*agree.compute_ratios, *agree.device_ratios, *agree.round_ratios) if abs(r[-1] - 1) > 0.40]
    assert not off, ("one device-round or round", off, *why)
    if any(share > 0.10 for *_, share in agree.host_short):
        assert any("less CPU than its share" in w for w in real.summary["emulation_warnings"])


def _after_first_round(rows: list[dict]) -> list[dict]:
    """The rows without the run's first round (its first strategy's round 1)."""
    first = rows[0]["strategy"]
    return [r for r in rows if (r["strategy"], r["round"]) != (first, 1)]
