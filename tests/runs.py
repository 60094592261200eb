"""Run a scenario in a test the way a user does (`python -m testbed run SCENARIO --out DIR`) and
read what the run wrote (manifest.json, rounds.jsonl, summary.json).

    from tests.runs import write_scenario, run_scenario

    scenario = write_scenario(tmp_path, TEXT_OR_DICT, "tiny.yaml")
    run = run_scenario(scenario, tmp_path / "run", "--backend", "process", timeout=600)
    run.manifest["status"], run.rounds, run.rows("fedlora"), run.summary

`start_run` starts the run and returns its Popen (for a test that interrupts it or talks to it);
`read_run(out)` then reads its folder. Every run starts from the repository root, so a scenario
path may be relative to it ("scenarios/smoke.yaml").
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_scenario(directory: Path, scenario: str | dict, name: str = "scenario.yaml") -> Path:
    """Write a scenario (YAML text, dedented, or a dict) to directory/name and return its path."""
    path = Path(directory) / name
    path.write_text(textwrap.dedent(scenario) if isinstance(scenario, str) else yaml.safe_dump(scenario))
    return path


def run_testbed(*args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m testbed ARGS...` from the repository root, output captured as text."""
    return subprocess.run([sys.executable, "-m", "testbed", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def kill_run_processes(*outs: Path) -> None:
    """Kill what is left of the runs written to the folders `outs`, and only that: another run on
    the machine (a campaign in the background, a user's run) is none of a test's business."""
    from emulation.cleanup import tagged_processes
    ids = set()
    for out in outs:
        for manifest in Path(out).glob("**/manifest.json"):
            try:
                ids.add(json.loads(manifest.read_text())["run_id"])
            except (OSError, ValueError, KeyError):
                continue
    for run_id in ids:
        for p in tagged_processes(run_id):
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - gone already
                pass


def _run_args(scenario: Path | str, out: Path, args: tuple, resume: bool) -> list[str]:
    return ["run", str(scenario), "--resume" if resume else "--out", str(out), *map(str, args)]


def start_run(scenario: Path | str, out: Path, *args: str, resume: bool = False, **popen) -> subprocess.Popen:
    """Start `testbed run SCENARIO --out OUT ARGS...` (`--resume OUT` with resume=True) and return at
    once. stdout and stderr come together as text on proc.stdout unless popen says otherwise."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **popen}
    return subprocess.Popen([sys.executable, "-m", "testbed", *_run_args(scenario, out, args, resume)], cwd=ROOT,
                            **popen)


def run_scenario(scenario: Path | str, out: Path, *args: str, timeout: float, expect_rc: int | None = 0,
                 resume: bool = False, env: dict | None = None) -> RunResult:
    """Run `testbed run SCENARIO --out OUT ARGS...` (`--resume OUT` with resume=True) to its end and
    return what it wrote. Asserts the exit code is expect_rc (None: no check, the test looks at
    result.proc.returncode itself)."""
    proc = run_testbed(*_run_args(scenario, out, args, resume), timeout=timeout, env=env)
    result = RunResult(Path(out), proc)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, result.tail()
    return result


def read_run(out: Path, proc: subprocess.CompletedProcess | subprocess.Popen | None = None) -> RunResult:
    """The results in a run folder, for a run started with start_run (or any run folder)."""
    return RunResult(Path(out), proc)


def rounds_so_far(out: Path) -> list[dict]:
    """The rows of rounds.jsonl of a run that may still be writing it (or was killed while it did):
    no file yet gives [], a last line not written to its end is left out."""
    try:
        lines = (Path(out) / "rounds.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(x) for x in lines if x.endswith("}")]


@dataclass
class RunResult:
    """A run's folder and the process that wrote it. The files are read on first use (and then
    kept): a missing manifest.json or rounds.jsonl, or a line of it that is not JSON, raises."""
    out: Path
    proc: subprocess.CompletedProcess | subprocess.Popen | None = None

    @cached_property
    def manifest(self) -> dict:
        return json.loads((self.out / "manifest.json").read_text())

    @cached_property
    def rounds(self) -> list[dict]:
        """Every row of rounds.jsonl, in order."""
        return [json.loads(line) for line in (self.out / "rounds.jsonl").read_text().splitlines()]

    @cached_property
    def summary(self) -> dict | None:
        """summary.json, None if the run wrote none."""
        path = self.out / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    def rows(self, strategy: str | None = None) -> list[dict]:
        """The rows of one strategy (every row with None), in order."""
        return [r for r in self.rounds if strategy is None or r["strategy"] == strategy]

    def row(self, strategy: str, rnd: int) -> dict:
        """The row of one strategy's round; LookupError if the run has none."""
        for r in self.rounds:
            if r["strategy"] == strategy and r["round"] == rnd:
                return r
        raise LookupError(f"{self.out}: no row for {strategy} round {rnd}")

    def tail(self, n: int = 4000) -> str:
        """The last n characters of what a captured run printed (stdout, then stderr), for messages."""
        text = "".join(x for x in (getattr(self.proc, "stdout", None), getattr(self.proc, "stderr", None))
                       if isinstance(x, str))
        return text[-n:]
