"""Released rounds with real processes (testbed/release.py): legend-ci on the machine's default
backend with `release_waits: true`. Every round is released once its last node has done its
CPU work; the recorded round still covers every device's whole time (the release shortens
only real time), the release happens inside the round, and the run leaves no release file.
How much real time it saves is `bench/bench_clocks.py --second released`'s to print."""
from __future__ import annotations

import pytest

from tests.runs import kill_run_processes, run_scenario

# serial: the release saves real time only where the host has cores to spare (side by side with
# another test's run it saved none)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.serial]

SETS = ["training.rounds=2", "training.local_steps=8", "data.test_size=40", "release_waits=true",
        "strategies.run=[{name: fedlora, params: {rank: 8}}]"]  # FedLoRA: its fast devices wait the most


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "run"
    try:
        yield run_scenario("scenarios/legend-ci.yaml", out, *[a for s in SETS for a in ("--set", s)], timeout=900)
    finally:
        kill_run_processes(out)


def _rounds(run) -> list[dict]:
    if run.manifest["dilation"] <= 1:
        pytest.skip(f"dilation {run.manifest['dilation']} on this host ({run.manifest['host']['cores']} cores): "
                    "no slowed wait to release")
    return [r for r in run.rounds if r["round"] > 0]


def test_every_round_is_released_inside_it(released):
    rounds = _rounds(released)
    assert len(rounds) == 2
    for r in rounds:
        assert r["participants"] == 6 and not r["failed"], r
        assert 0 < r["released_at_s"] <= r["wall_s"], r
    assert not (released.out / "release").exists()


def test_the_recorded_round_covers_each_devices_whole_time(released):
    """A round lasts at least as long as its slowest device's download + compute + upload, in
    emulated seconds, as an unreleased round does; each device's recorded wait fills the rest."""
    for r in _rounds(released):
        slowest = max(n["download_s"] + n["compute_s"] + n["upload_s"] for n in r["nodes"])
        assert r["wall_s"] >= slowest * 0.999, (r["strategy"], r["round"], r["wall_s"], slowest)
        for n in r["nodes"]:
            assert n["wait_s"] == pytest.approx(max(0.0, r["wall_s"] - n["download_s"] - n["compute_s"]
                                                    - n["upload_s"]), abs=1e-6)


def test_the_release_saved_real_time_and_the_run_says_so(released):
    """The nodes that finished their CPU work early waited less in real time than the round's
    emulated length asks (on 2 cores: the TX2s, which compute ahead of their share once the
    faster devices are done)."""
    rounds = _rounds(released)
    assert all(r["release_saved_real_s"] is not None and r["release_saved_real_s"] >= 0 for r in rounds)
    assert sum(r["release_saved_real_s"] for r in rounds) > 0, [r["release_saved_real_s"] for r in rounds]
    assert released.manifest["scenario"]["release_waits"] is True
