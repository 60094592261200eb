"""The virtual clock against the real emulation: legend-ci run in both clocks with real processes.

The real run is on the machine's default backend (netns as root, with `cpu_limit: weight`; the
process backend elsewhere); the virtual run is on the process backend. Both train the same nodes
on the same data with the same seeds, so each round's accuracy must be the same, and each
device's time in each round (download + compute + upload) must agree within 10%. Full FedAvg is
left out here to keep the test short (its 60 MB models cross 1-30 Mbit/s links for minutes of
real time); `bench/bench_clocks.py` runs the whole scenario.
"""
from __future__ import annotations

import pytest

from testbed.vclock import agreement
from tests.runs import kill_run_processes, run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SETS = ["training.rounds=2", "data.test_size=40",
        "strategies.run=[{name: fedlora, params: {rank: 8}}, {name: hetlora, params: {rank_min: 2, rank_max: 8}}, "
        "{name: fedra, params: {rank: 8}}, {name: legend}]"]


@pytest.fixture(scope="module")
def both_clocks(tmp_path_factory):
    base = tmp_path_factory.mktemp("clocks")
    sets = [a for s in SETS for a in ("--set", s)]
    try:
        real = run_scenario("scenarios/legend-ci.yaml", base / "real", *sets, timeout=900)
        virtual = run_scenario("scenarios/legend-ci.yaml", base / "virtual", *sets, "--set", "clock=virtual",
                               timeout=900)
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
    assert len(agree.accuracy_pairs) == 8, agree.accuracy_pairs   # 4 strategies x 2 rounds
    assert agree.accuracy_identical, agree.accuracy_pairs


def test_each_devices_time_in_each_round_agrees_within_ten_percent(both_clocks):
    real, virtual = both_clocks
    agree = agreement(real.rounds, virtual.rounds)
    assert len(agree.device_ratios) >= 40, agree.device_ratios    # 6 devices x 8 rounds, all answered
    off = [r for r in agree.device_ratios if abs(r[-1] - 1) > 0.10]
    assert not off, off


def test_the_virtual_rounds_took_less_real_time_than_they_emulate(both_clocks):
    """The point of the clock: no device waits, so the real time of a round is its work's."""
    _, virtual = both_clocks
    rows = [r for r in virtual.rounds if r["round"]]
    assert sum(r["real_s"] for r in rows) < sum(r["wall_s"] for r in rows)
