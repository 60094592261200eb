"""Summary numbers and report files for a small synthetic two-strategy run."""
import json

import pytest

from testbed.report import load_run, summarize, write_report

TARGET = 0.8


def _node(name, profile, status="ok", compute=2.0, mem=100.0):
    return {"node": name, "profile": profile, "status": status, "compute_s": compute,
            "upload_s": 1.0, "download_s": 0.5, "wait_s": 0.5, "peak_mem_mb": mem,
            "bytes_up": 10, "bytes_down": 20}


def _rows(strategy, accs, round_s, bytes_up, bytes_down, with_elapsed=True):
    """Round 0 (initial model) plus one row per accuracy in ``accs``."""
    rows = [{"strategy": strategy, "round": 0, "wall_s": 0, "elapsed_s": 0, "accuracy": 0.1,
             "loss": 2.3, "bytes_up": 0, "bytes_down": 0, "participants": 0, "dropped": 0,
             "eval_s": 0.1, "nodes": []}]
    for i, acc in enumerate(accs, 1):
        row = {"strategy": strategy, "round": i, "wall_s": round_s, "accuracy": acc, "loss": 1 - acc,
               "bytes_up": bytes_up, "bytes_down": bytes_down, "participants": 2, "dropped": 1,
               "eval_s": 0.1,
               "nodes": [_node("n0", "rpi4", compute=3.0, mem=300), _node("n1", "jetson", mem=500),
                         _node("n2", "rpi4", status="dropped", compute=0.0, mem=50)]}
        if with_elapsed:
            row["elapsed_s"] = i * round_s
        rows.append(row)
    return rows


def _run_rows(full_accs=(0.5, 0.85, 0.9)):
    # baseline: 10 s rounds, reaches 0.8 at round 3 (t=30 s), runs 40 s in total
    base = _rows("fedlora", [0.4, 0.7, 0.82, 0.88], 10.0, 100, 200)
    # full: 20 s rounds, elapsed derived from wall_s (no elapsed_s logged)
    full = _rows("full", list(full_accs), 20.0, 1000, 2000, with_elapsed=False)
    rows = base + full
    rows.reverse()  # order in the log must not matter
    return rows


def test_summary_numbers():
    s = summarize(_run_rows(), "fedlora", TARGET)
    assert s["baseline"] == "fedlora" and s["target_accuracy"] == TARGET
    b, f = s["strategies"]["fedlora"], s["strategies"]["full"]
    assert b["rounds"] == 4 and b["final_accuracy"] == 0.88 and b["best_accuracy"] == 0.88
    assert b["time_to_target_s"] == 30.0 and b["bytes_to_target"] == 3 * 300
    assert b["speedup"] == 1.0 and b["accuracy_at_baseline_time"] == 0.88
    assert f["rounds"] == 3 and f["time_to_target_s"] == 40.0 and f["bytes_to_target"] == 2 * 3000
    assert f["speedup"] == pytest.approx(30.0 / 40.0)
    assert f["accuracy_at_baseline_time"] == 0.85  # rounds at t=20, 40 fit in baseline's 40 s
    assert f["total_wall_s"] == 60.0 and f["total_bytes_up"] == 3000 and f["total_bytes_down"] == 6000


def test_speedup_null_when_target_never_reached():
    s = summarize(_run_rows(full_accs=(0.5, 0.6, 0.7)), "fedlora", TARGET)
    f = s["strategies"]["full"]
    assert f["time_to_target_s"] is None and f["bytes_to_target"] is None and f["speedup"] is None
    assert f["accuracy_at_baseline_time"] == 0.6
    assert s["strategies"]["fedlora"]["speedup"] == 1.0


def test_strategy_with_only_round_zero():
    rows = _run_rows() + [{"strategy": "idle", "round": 0, "wall_s": 0, "elapsed_s": 0,
                           "accuracy": 0.1, "nodes": []}]
    idle = summarize(rows, "fedlora", TARGET)["strategies"]["idle"]
    assert idle["rounds"] == 0 and idle["speedup"] is None and idle["accuracy_at_baseline_time"] == 0.1


def test_missing_baseline_raises():
    with pytest.raises(ValueError, match="nosuch"):
        summarize(_run_rows(), "nosuch", TARGET)


def _write_run(d, rows, summary=None, tail=""):
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({
        "scenario": {"name": "toy-scenario", "strategies": {"baseline": "fedlora"},
                     "training": {"target_accuracy": TARGET}},
        "backend": "process", "dilation": 2.0,
        "host": {"cores": 4, "memory_mb": 8000}, "fidelity": ["cannot cap bandwidth below 1 Mbit/s"]}))
    (d / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))


def test_load_run_skips_truncated_last_line(tmp_path):
    rows = _run_rows()
    _write_run(tmp_path, rows, tail='{"strategy": "full", "round": 9, "accu')
    manifest, loaded, summary = load_run(tmp_path)
    assert loaded == rows and summary is None and manifest["backend"] == "process"


def test_write_report_files_and_content(tmp_path):
    rows = _run_rows(full_accs=(0.5, 0.6, 0.7))
    summary = summarize(rows, "fedlora", TARGET, majority_rate=0.3)
    _write_run(tmp_path, rows, summary)
    paths = write_report(tmp_path)
    names = {p.name for p in paths}
    assert names == {"report.md", "accuracy_vs_time.png", "bytes_vs_time.png", "timeline.png"}
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    md = (tmp_path / "report.md").read_text()
    assert "toy-scenario" in md and "fedlora" in md and "| full |" in md
    assert "n/a" in md and "cannot cap bandwidth" in md and "rpi4" in md
    assert "](timeline.png)" in md


def test_write_report_recomputes_missing_summary(tmp_path):
    _write_run(tmp_path, _run_rows())  # no summary.json: baseline and target from the manifest's scenario
    paths = write_report(tmp_path)
    assert all(p.exists() for p in paths)
    assert "fedlora" in (tmp_path / "report.md").read_text()


def test_write_report_without_baseline_in_manifest_says_so(tmp_path):
    _write_run(tmp_path, _run_rows())
    (tmp_path / "manifest.json").write_text(json.dumps({"scenario": {"name": "x"}}))
    with pytest.raises(ValueError, match="no baseline or target"):
        write_report(tmp_path)


def test_summary_peak_memory_per_profile():
    s = summarize(_run_rows(), "fedlora", TARGET)
    # the largest peak any node of each profile reported, dropped nodes included
    assert s["strategies"]["fedlora"]["peak_memory_mb"] == {"jetson": 500.0, "rpi4": 300.0}


def test_report_lists_strategies_stopped_early(tmp_path):
    manifest = {"scenario": {"name": "t", "strategies": {"baseline": "fedlora"}, "training": {"target_accuracy": TARGET}},
                "stopped_early": {"full": "time budget 100 s of emulated time used after round 2 of 10 (110.0 s)"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "rounds.jsonl").write_text("\n".join(json.dumps(r) for r in _run_rows()) + "\n")
    write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "## Stopped early" in text and "- full: time budget 100 s" in text


def test_report_counts_faults_and_what_they_cost(tmp_path):
    rows = _run_rows()
    r = next(x for x in rows if x["strategy"] == "full" and x["round"] == 1)
    r["events"] = [{"type": "fault", "action": "kill", "node": "a", "applied": True},
                   {"type": "fault", "action": "cut_link", "node": "b", "applied": False},
                   {"type": "oom", "node": "c"}]
    r["nodes"] = [_node("a", "rpi4", "failed"), _node("c", "rpi4", "failed"), _node("d", "rpi4", "dropped")]
    r["nodes"][0]["reason"] = "killed by a fault event (node process exited)"
    r["nodes"][1]["reason"] = "out of memory: killed by its 729 MB limit"
    r["nodes"][2]["reason"] = "missed the round deadline"
    r["failed"], r["offline"] = True, ["e", "f"]
    manifest = {"scenario": {"name": "t", "strategies": {"baseline": "fedlora"}, "training": {"target_accuracy": TARGET}},
                "resumed": [{"strategy": "full", "round": 1, "from_run_id": "t-1"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "rounds.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "## Faults and failures" in text
    assert "| full | 1 | 1 | 1 | 1 | 3 | 1 | 2 |" in text  # (rounds 2 and 3 each drop n2 as well)
    assert "| fedlora | 0 | 0 | 0 | 0 | 4 | 0 | 0 |" in text
    assert "Resumed: full after round 1 (from t-1)" in text


def test_host_efficiency_is_this_hosts_training_cpu_over_its_cores_times_the_real_round_time():
    from testbed.report import host_efficiency
    manifest = {"host": {"cores": 2}, "dilation": 2.0,
                "nodes": [{"name": "a"}, {"name": "b", "remote": True}, {"name": "c", "engine": "lab"}]}
    rows = [{"wall_s": 1.0, "nodes": [{"node": "a", "cpu_s": 2.0}, {"node": "b", "cpu_s": 9.0}]},
            {"wall_s": 3.0, "nodes": [{"node": "a", "cpu_s": 4.0}, {"node": "c", "cpu_s": 5.0}]}]
    # a's 6 CPU seconds over 2 cores x (1 + 3) emulated s x dilation 2 = 16 core-seconds
    assert host_efficiency(manifest, rows) == pytest.approx(6 / 16)
    assert host_efficiency({**manifest, "dilation": "auto"}, rows) is None


def test_the_aggregators_share_is_its_cpu_over_the_rounds_real_time():
    from testbed.report import aggregator_share
    rows = [{"wall_s": 2.0, "aggregator_cpu_s": 0.1}, {"wall_s": 1.0, "aggregator_cpu_s": 0.3}, {"wall_s": 0.0}]
    assert aggregator_share({"dilation": 3.0}, rows) == pytest.approx(0.3 / 3.0)
    assert aggregator_share({"dilation": 3.0}, [{"wall_s": 1.0}]) is None
