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
    assert s["emulation_warnings"] == {} and "not faithful" not in text
    per[2]["emulation_warnings"] = ["agx had an effective share of 0.65 of a host core where its profile says 1"]
    s = summarize_seeds(per)
    assert s["emulation_warnings"] == {"2": per[2]["emulation_warnings"]}
    text = write_seeds_report(tmp_path, s)[0].read_text()
    assert "## Seeds whose emulation was not faithful" in text
    assert "- seed 2: agx had an effective share of 0.65" in text


def _node(profile, status, peak, **plan):
    return {"node": f"{profile}-x", "profile": profile, "status": status, "peak_mem_mb": peak,
            "plan": {"method": "full", **plan}}


def test_device_classes_over_rounds_and_seeds(tmp_path):
    """What each class got and how it fared: counted by hand from two seeds of two rounds."""
    from testbed.report import summarize
    seed1 = [{"strategy": "caff", "round": 1, "elapsed_s": 1.0, "accuracy": 0.6, "nodes": [
                 _node("weak", "ok", 500.0, blocks=[4, 5], caff_blocks=2, caff_upload_factor=0.6),
                 _node("strong", "ok", 900.0, blocks=[0, 1, 2, 3, 4, 5], caff_blocks=6, caff_upload_factor=0.9)]},
             {"strategy": "caff", "round": 2, "elapsed_s": 2.0, "accuracy": 0.7, "nodes": [
                 _node("weak", "failed", None, blocks=[4, 5], caff_blocks=2, caff_upload_factor=0.8)]}]
    seed2 = [{"strategy": "caff", "round": 1, "elapsed_s": 1.0, "accuracy": 0.65, "nodes": [
                 _node("weak", "ok", 520.0, blocks=[5], caff_blocks=1, caff_upload_factor=0.5),
                 _node("strong", "dropped", 950.0, blocks=[0, 1, 2, 3, 4, 5], caff_blocks=6, caff_upload_factor=1.0)]}]
    one = summarize(seed1, "caff", 0.7)["strategies"]["caff"]
    assert one["by_class"]["weak"] == {"status": {"ok": 1, "failed": 1},
                                       "given": {"method": {"full": 2}, "trained blocks": {"2": 2},
                                                 "caff_blocks": {"2": 2}, "caff_upload_factor": {"range": [0.6, 0.8]}}}
    two = summarize(seed2, "caff", 0.7)["strategies"]["caff"]
    s = summarize_seeds({1: {"baseline": "caff", "target_accuracy": 0.7, "strategies": {"caff": one}},
                         2: {"baseline": "caff", "target_accuracy": 0.7, "strategies": {"caff": two}}})
    weak = s["strategies"]["caff"]["by_class"]["weak"]
    assert weak["status"] == {"ok": 2, "failed": 1}
    assert weak["given"]["caff_blocks"] == {"2": 2, "1": 1}
    assert weak["given"]["caff_upload_factor"] == {"range": [0.5, 0.8]}
    assert weak["peak_memory_mb"]["mean"] == 510.0 and weak["peak_memory_mb"]["n"] == 2
    strong = s["strategies"]["caff"]["by_class"]["strong"]
    assert strong["status"] == {"ok": 1, "dropped": 1} and strong["peak_memory_mb"]["mean"] == 925.0
    text = write_seeds_report(tmp_path, s)[0].read_text()
    assert "| caff | weak | 510 [" in text and "| 2 / 0 / 1 |" in text
    assert "caff_blocks 2 (2), 1 (1)" in text and "caff_upload_factor 0.5-0.8" in text


def test_report_rewrites_a_campaign_from_its_seed_folders(tmp_path):
    """`testbed report --recompute DIR` on a --seeds folder that an older version summarized:
    each finished seed's summary gains the fields it lacked, keeping what only the run knew;
    an unfinished seed is left out of the campaign's summary."""
    import json
    from testbed.cli import main
    for seed, acc, status in ((1, 0.8, "finished"), (2, 0.6, "finished"), (3, 0.9, "interrupted")):
        d = tmp_path / f"seed-{seed}"
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"status": status, "scenario": {
            "strategies": {"baseline": "a"}, "training": {"target_accuracy": 0.7}}}))
        rows = [{"strategy": "a", "round": 1, "elapsed_s": 3.0, "accuracy": acc, "bytes_up": 10, "bytes_down": 10,
                 "nodes": [_node("pi", "ok", 400.0 + seed, blocks=[1])]}]
        (d / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "summary.json").write_text(json.dumps({"baseline": "a", "target_accuracy": 0.7, "status": status,
                                                    "strategies": {"a": {"final_accuracy": acc}}}))
    assert main(["report", "--recompute", str(tmp_path)]) == 0
    seed1 = json.loads((tmp_path / "seed-1" / "summary.json").read_text())
    assert seed1["status"] == "finished" and seed1["strategies"]["a"]["by_class"]["pi"]["status"] == {"ok": 1}
    campaign = json.loads((tmp_path / "summary.json").read_text())
    assert campaign["seeds"] == [1, 2]
    a = campaign["strategies"]["a"]
    assert a["final_accuracy"]["mean"] == pytest.approx(0.7) and a["time_to_target_s"]["n"] == 1
    assert a["by_class"]["pi"]["peak_memory_mb"]["mean"] == 401.5
    assert (tmp_path / "report.md").is_file() and (tmp_path / "seed-2" / "report.md").is_file()
    assert not (tmp_path / "seed-3" / "report.md").exists()
