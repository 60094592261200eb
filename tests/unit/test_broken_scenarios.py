"""The broken-scenario set: every file in tests/scenarios/broken is rejected with exactly the
errors its `# expect:` lines give (file, field, what is allowed), and nothing else."""
from __future__ import annotations

from pathlib import Path

import pytest

from testbed.scenario import ScenarioError, load
from tests.runs import run_scenario, run_testbed

ROOT = Path(__file__).resolve().parents[2]
BROKEN = ROOT / "tests" / "scenarios" / "broken"
FILES = sorted(BROKEN.glob("*.yaml"))


def expected(path: Path) -> list[str]:
    lines = [l.removeprefix("# expect: ") for l in path.read_text().splitlines() if l.startswith("# expect: ")]
    return [l.replace("{dir}", str(BROKEN)) for l in lines]


def test_the_set_is_there():
    assert len(FILES) >= 30
    for f in FILES:
        assert expected(f), f"{f.name} says no # expect: line"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_broken_scenario_gives_exactly_its_errors(path):
    with pytest.raises(ScenarioError) as err:
        load(path)
    lines = [l.strip() for l in str(err.value).splitlines()]
    got = [l.removeprefix(f"{path}: ") for l in lines if l.startswith(f"{path}: ") and "error(s) in scenario" not in l]
    assert got == expected(path)


def test_validate_rejects_the_whole_set_and_run_starts_nothing(tmp_path):
    proc = run_testbed("validate", *FILES, timeout=120)
    assert proc.returncode == 1
    for f in FILES:
        assert all(e in proc.stderr for e in expected(f)), f.name
    out = tmp_path / "never"
    run = run_scenario(BROKEN / "fault-unknown-node.yaml", out, timeout=120, expect_rc=2)
    assert "faults.events[0].nodes" in run.proc.stderr
    assert not out.exists(), "a broken scenario never starts half a run"
