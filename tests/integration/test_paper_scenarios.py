"""The CI-sized variants of the paper scenarios run end to end with every strategy they name."""
from __future__ import annotations

import pytest
import yaml

from emulation.profiles import PROFILES
from tests.runs import ROOT, run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# Made quick without changing what is checked: one round, forked nodes, no dilation, and links
# fast enough that full FedAvg's model (tens of MB) is not what the test waits for.
FAST = ["training.local_steps=1", "data.max_len=16", "data.test_size=40", "zygote=on", "dilation=1"]
FAST_LINKS = {"legend-ci": [f"nodes.{i}.ranges={{uplink_mbit: [20, 30], downlink_mbit: [20, 30]}}" for i in range(3)],
              "caff-ci": [f"nodes.{i}.overrides={{uplink_mbit: 200, downlink_mbit: 200}}" for i in range(3)]}


# caff-ci also asks for 3 rounds within a tiny time budget: every strategy stops after round 1
@pytest.mark.parametrize("scenario,extra_key,rounds", [("legend-ci", "legend_depth", ["training.rounds=1"]),
                                                       ("caff-ci", "caff_blocks", ["training.rounds=3",
                                                                                   "training.time_budget_s=0.001"])])
def test_paper_ci_scenario_runs(scenario, extra_key, rounds, tmp_path):
    out = tmp_path / scenario
    sets = [a for r in [*rounds, *FAST, *FAST_LINKS[scenario]] for a in ("--set", r)]
    run = run_scenario(f"scenarios/{scenario}.yaml", out, *sets, timeout=900)
    rows = run.rounds
    summary = run.summary
    names = [s["name"] for s in yaml.safe_load((ROOT / f"scenarios/{scenario}.yaml").read_text())["strategies"]["run"]]
    assert set(summary["strategies"]) == set(names)
    assert max(r["round"] for r in rows) == 1
    if scenario == "caff-ci":
        assert set(summary["stopped_early"]) == set(names)
        assert all("after round 1 of 3" in why for why in summary["stopped_early"].values())
        assert "## Stopped early" in (out / "report.md").read_text()
    for r in (r for r in rows if r["round"] == 1):
        assert r["participants"] >= 1, r
        assert all(n["plan"]["method"] in ("lora", "full", "adapter") for n in r["nodes"])
    ours = [n for r in rows if r["round"] == 1 and r["strategy"] == extra_key.split("_")[0] for n in r["nodes"]]
    assert ours and all(extra_key in n["plan"] for n in ours)
    # cpu_limit: weight (the paper scenarios' setting): on netns each device's compute phase lasts
    # at least its training's CPU seconds at its share (dilation 1 here)
    if run.manifest["backend"] == "netns":
        assert any("cpu_limit weight" in note for note in run.manifest["fidelity"])
        ok = [n for r in rows if r["round"] == 1 for n in r["nodes"] if n["status"] == "ok"]
        assert ok and all(n["cpu_s"] > 0 for n in ok)
        for n in ok:
            assert n["compute_s"] >= n["cpu_s"] / PROFILES[n["profile"]].cpu_share * (1 - 1e-6), n
    # heterogeneity shows: not every device got the same plan
    if scenario == "caff-ci":
        assert len({n["plan"]["caff_blocks"] for n in ours}) > 1
