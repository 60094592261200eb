"""Energy per device and round: hand-worked joules for both radio models, the run's totals and
energy to target, and the power model's checks."""
from __future__ import annotations

import json

import pytest

from emulation.profiles import Power, Profile
from testbed.energy import node_round
from testbed.report import summarize, write_report

BY_POWER = Power(idle_w=2.0, compute_w=6.0, tx_w=3.5, rx_w=3.0)
BY_BYTE = Power(idle_w=2.0, compute_w=6.0, tx_nj_per_byte=100.0, rx_nj_per_byte=50.0)


def test_one_node_round_by_radio_power():
    # on 10 s at 2 W = 20 J; training 4 s at 4 W above idle = 16 J; sending 2 s at 1.5 W above
    # idle = 3 J and receiving 1 s at 1 W above idle = 1 J
    e = node_round(BY_POWER, 10.0, {"compute_s": 4.0, "upload_s": 2.0, "download_s": 1.0, "wait_s": 3.0})
    assert (e.idle_j, e.compute_j, e.radio_j, e.total_j) == pytest.approx((20.0, 16.0, 4.0, 40.0))


def test_one_node_round_by_radio_energy_per_byte():
    # 1 MB up at 100 nJ/B = 0.1 J, 2 MB down at 50 nJ/B = 0.1 J
    e = node_round(BY_BYTE, 10.0, {"compute_s": 4.0, "upload_s": 2.0, "download_s": 1.0,
                                   "bytes_up": 1_000_000, "bytes_down": 2_000_000})
    assert (e.idle_j, e.compute_j, e.radio_j) == pytest.approx((20.0, 16.0, 0.2))


def test_a_straggler_past_the_round_is_on_for_its_own_phases():
    e = node_round(BY_POWER, 3.0, {"compute_s": 4.0, "upload_s": 1.0, "download_s": 0.0})
    assert e.idle_j == pytest.approx(2.0 * 5.0) and e.compute_j == pytest.approx(16.0)


def _row(strategy, rnd, acc, wall, nodes):
    return {"strategy": strategy, "round": rnd, "accuracy": acc, "wall_s": wall, "elapsed_s": None, "nodes": nodes}


def _node(profile, compute, up=0.0, down=0.0):
    return {"node": f"{profile}-0", "profile": profile, "status": "ok", "compute_s": compute, "upload_s": up,
            "download_s": down}


ROWS = [_row("fedlora", 0, 0.5, 0.0, []),
        _row("fedlora", 1, 0.6, 10.0, [_node("a", 4.0, 2.0, 1.0), _node("b", 8.0)]),
        _row("fedlora", 2, 0.8, 10.0, [_node("a", 4.0, 2.0, 1.0)]),
        _row("fedlora", 3, 0.9, 10.0, [_node("b", 8.0)])]


def test_a_strategys_energy_in_all_until_the_target_and_per_class():
    # a (BY_POWER) per round: 40 J; b (idle 1 W, compute 3 W, radio free): 10 s x 1 + 8 s x 2 = 26 J
    powers = {"a": BY_POWER, "b": Power(idle_w=1.0, compute_w=3.0, tx_w=1.0, rx_w=1.0)}
    e = summarize(ROWS, "fedlora", 0.75, powers=powers)["strategies"]["fedlora"]["energy"]
    assert e["total_j"] == pytest.approx(40 + 26 + 40 + 26)
    assert e["to_target_j"] == pytest.approx(40 + 26 + 40)  # 0.8 >= 0.75 in round 2
    assert e["by_class"]["a"]["total_j"] == pytest.approx(80) and e["by_class"]["b"]["compute_j"] == pytest.approx(32)
    assert e["cumulative_j"] == pytest.approx([0, 66, 106, 132])
    missing = summarize(ROWS, "fedlora", 0.75, powers={"a": BY_POWER})["strategies"]["fedlora"]["energy"]
    assert missing == {"missing_power": ["b"]}


def test_the_report_shows_energy_and_plots_it(tmp_path):
    prof = Profile("a", 1.0, 1, 1000, 10.0, 10.0, 1.0, "test", BY_POWER).as_dict()
    manifest = {"scenario": {"name": "e", "strategies": {"baseline": "fedlora"}, "training": {"target_accuracy": 0.75},
                             "profiles": {"b": {"power": {"idle_w": 1.0, "compute_w": 3.0, "tx_w": 1.0, "rx_w": 1.0}}}},
                "nodes": [{"name": "a-0", "profile": prof}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths = write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## Energy" in report and "| fedlora | 0.13 | 0.11 |" in report
    assert (tmp_path / "accuracy_vs_energy.png") in paths and (tmp_path / "accuracy_vs_energy.png").stat().st_size > 0


@pytest.mark.parametrize("kw, match", [
    (dict(idle_w=3.0, compute_w=2.0, tx_w=3.0, rx_w=3.0), r"compute_w \(2.0\) must be at least idle_w"),
    (dict(idle_w=1.0, compute_w=2.0, tx_w=3.0), "either as tx_w and rx_w .* not both and not half"),
    (dict(idle_w=1.0, compute_w=2.0, tx_w=3.0, rx_w=3.0, tx_nj_per_byte=1.0, rx_nj_per_byte=1.0), "not both"),
    (dict(idle_w=-1.0, compute_w=2.0, tx_w=3.0, rx_w=3.0), "idle_w must be numbers >= 0"),
    (dict(idle_w=2.0, compute_w=3.0, tx_w=1.0, rx_w=3.0), "must be at least idle_w"),
])
def test_a_power_model_that_cannot_be_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Power(**kw)
