"""A run folder written before the checkpoint became plain data (version 1, which pickled the
strategy object) still resumes, and goes on as the uninterrupted run did.

tests/fixtures/v1-run was written by that version: the v1-resume scenario (fedlora, then legend,
2 rounds each; a fast and a 5x slower device), killed right after legend's round 1. The same
version, uninterrupted, gave legend round 2 the depths {fast-0: 2, slow-0: 1} (LEGEND's greedy
on the speeds it measured in round 1; without them both devices would calibrate at depth 2)
and a held-out loss of 0.6606727838516235."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from emulation.cleanup import tagged_processes
from tests.runs import read_run, run_scenario

pytestmark = pytest.mark.integration
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_a_version_1_folder_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "v1-run"
    shutil.copytree(FIXTURES / "v1-run", out)
    before = read_run(out)
    old_id = before.manifest["run_id"]
    assert [(r["strategy"], r["round"]) for r in before.rounds][-1] == ("legend", 1)
    r = run_scenario(FIXTURES / "v1-resume.yaml", out, timeout=600, resume=True)
    assert r.manifest["status"] == "finished"
    assert r.manifest["resumed"][-1]["checkpoint_version"] == 1
    assert r.manifest["resumed"][-1]["from_run_id"] == old_id
    assert [(x["strategy"], x["round"]) for x in r.rounds] == [("fedlora", 0), ("fedlora", 1), ("fedlora", 2),
                                                               ("legend", 0), ("legend", 1), ("legend", 2)]
    assert r.rounds[:5] == before.rounds  # the finished rounds are kept as they were
    last = r.row("legend", 2)
    assert {n["node"]: n["plan"]["legend_depth"] for n in last["nodes"]} == {"fast-0": 2, "slow-0": 1}
    assert last["loss"] == pytest.approx(0.6606727838516235, rel=1e-5)
    assert not (out / "checkpoint.pkl").exists() and r.summary["status"] == "finished"
    assert tagged_processes(r.run_id) == []
