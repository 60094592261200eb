"""Repeated trials: the spread over seeds, computed by hand here."""
from __future__ import annotations

import math

import pytest

from testbed.seeds import spread, summarize_seeds, write_seeds_report


def test_spread_is_the_mean_and_a_students_t_interval():
    s = spread([10.0, 12.0, 14.0])
    sd = math.sqrt(((10 - 12) ** 2 + 0 + (14 - 12) ** 2) / 2)       # 2.0
    half = 4.303 * sd / math.sqrt(3)                                 # t(0.975, 2 d.o.f.) = 4.303
    assert s["mean"] == 12.0 and (s["min"], s["max"]) == (10.0, 14.0) and (s["n"], s["of"]) == (3, 3)
    assert s["ci95"] == pytest.approx([12 - half, 12 + half])


def test_missing_values_are_counted_not_averaged():
    s = spread([None, 5.0, None])
    assert (s["n"], s["of"], s["mean"], s["ci95"]) == (1, 3, 5.0, None)
    assert spread([None, None])["mean"] is None


def test_a_campaign_summary_and_report(tmp_path):
    per = {1: {"baseline": "a", "target_accuracy": 0.7,
               "strategies": {"a": {"time_to_target_s": 10.0, "final_accuracy": 0.71, "speedup": 1.0},
                              "b": {"time_to_target_s": 5.0, "final_accuracy": 0.72, "speedup": 2.0}}},
           2: {"baseline": "a", "target_accuracy": 0.7,
               "strategies": {"a": {"time_to_target_s": 12.0, "final_accuracy": 0.73, "speedup": 1.0},
                              "b": {"time_to_target_s": None, "final_accuracy": 0.69, "speedup": None}}}}
    s = summarize_seeds(per)
    assert s["seeds"] == [1, 2] and s["baseline"] == "a"
    assert s["strategies"]["a"]["time_to_target_s"]["mean"] == 11.0
    assert s["strategies"]["b"]["speedup"] == {"n": 1, "of": 2, "mean": 2.0, "min": 2.0, "max": 2.0, "ci95": None}
    paths = write_seeds_report(tmp_path, s)
    text = paths[0].read_text()
    assert "| b | 5.0 (1/2) |" in text and "[seed 2](seed-2/report.md)" in text
    assert paths[1].stat().st_size > 1000
