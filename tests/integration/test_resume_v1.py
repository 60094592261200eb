"""A run folder written by the first checkpoint format (version 1, which pickled the strategy
object) is read, and refused with a clear message when this version would continue it with
other strategy rules.

tests/fixtures/v1-run was written by that version: the v1-resume scenario (fedlora, then legend,
2 rounds each; a fast and a 5x slower device), killed right after legend's round 1. Its
checkpoint is read (tests/unit/test_store.py converts such files), but LEGEND's parameters
resolve differently today (the straggler deadline, per-device ranks, the classifier as the
head): continuing would mix two strategies in one run, so the resume is refused before anything
starts and the folder is left as it was. (Before those rule changes, the same folder resumed
and its round 2 matched the uninterrupted run of that version: depths {fast-0: 2, slow-0: 1},
loss 0.66067.)"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from testbed.store import read_checkpoint
from tests.runs import run_scenario

pytestmark = pytest.mark.integration
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_a_version_1_folder_is_read_and_refused_when_the_rules_changed(tmp_path):
    out = tmp_path / "v1-run"
    shutil.copytree(FIXTURES / "v1-run", out)
    ck = read_checkpoint(out / "checkpoint.pkl")
    assert (ck.version, ck.strategy, ck.round) == (1, "legend", 1)
    assert set(ck.strategy_state) == {"speed", "bw_up", "bw_down"} and ck.strategy_params["legend"]["deadline"] == "fastest_full"
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    r = run_scenario(FIXTURES / "v1-resume.yaml", out, timeout=300, resume=True, expect_rc=1)
    err = r.proc.stderr
    assert "resolves the strategies' parameters differently from the one that began the run" in err, err[-2000:]
    assert "legend: deadline: fastest_full -> straggler" in err and "legend: pooler: (none) -> False" in err
    assert "finish the run with the version that began it, or start it again" in err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing changed, nothing started
