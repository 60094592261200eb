"""Strategy parameters see the scenario: its own profiles (e.g. written by `testbed calibrate`)
may be given ranks, blocks and budgets, and what can be checked before a run is checked by
`testbed validate` (the broken cases are in tests/scenarios/broken/strategy-params-need-the-scenario.yaml)."""
from __future__ import annotations

import pytest

from testbed.scenario import ScenarioError, expand_nodes, parse, strategy_context
from testbed.strategies import STRATEGIES, NodeInfo

DOC = {
    "name": "own", "model": {"name": "all-minilm-l6-v2", "num_layers": 2},
    "profiles": {"my-pi": {"cpu_share": 0.2, "memory_mb": 2000, "source": "calibrated"}},
    "nodes": [{"group": "a", "profile": "my-pi"}, {"group": "b", "profile": "rpi4"}],
    "strategies": {"baseline": "hetlora", "run": [
        {"name": "hetlora", "params": {"ranks": {"my-pi": 4}, "rank_max": 8}},
        {"name": "fedra", "params": {"capacity_from": "fixed", "fixed_blocks": {"my-pi": 1, "rpi4": 2}}},
        {"name": "caff", "params": {"budgets": {"my-pi": 0.5, "rpi4": 1.0}}},
        {"name": "legend", "params": {"rank_distribution": [4, 8]}},
    ]},
}


def strategies(doc):
    sc = parse(doc)
    ctx = strategy_context(sc)
    nodes = {n.name: NodeInfo(n.name, n.profile, 10) for n in expand_nodes(sc)}
    return {e.name: STRATEGIES[e.type](e.params, ctx) for e in sc.strategies.run}, nodes, ctx


def test_a_profile_of_the_scenario_takes_per_profile_parameters():
    s, nodes, ctx = strategies(DOC)
    assert ctx.num_blocks == 2 and ctx.model_config["num_hidden_layers"] == 2  # from config.json, no weights
    assert s["hetlora"].rank_of(nodes["a-0"]) == 4
    assert s["fedra"].capacities(list(nodes.values())) == {"a-0": 1, "b-0": 2}
    assert s["caff"].budgets.fraction(nodes["a-0"].profile) == 0.5
    assert [len(t.plan.blocks) for t in s["legend"].configure(1, [nodes["a-0"]], {}).values()] == [2]


def test_a_profile_a_fault_switches_to_needs_its_entry_too():
    doc = {**DOC, "faults": {"events": [{"round": 1, "action": "profile", "nodes": ["a-0"], "profile": "rpi5"}]},
           "training": {"rounds": 2}}
    with pytest.raises(ScenarioError) as err:
        parse(doc)
    text = str(err.value)
    assert "strategies.run[1].params.fixed_blocks: no entry for profile(s) ['rpi5']" in text
    assert "strategies.run[2].params.budgets: no entry for profile(s) ['rpi5']" in text


def test_every_strategy_error_is_said_at_once():
    doc = {**DOC, "strategies": {"baseline": "hetlora", "run": [
        {"name": "hetlora", "params": {"ranks": {"their-pi": 4}}},
        {"name": "legend", "params": {"calibration_depth": 5}}]}}
    with pytest.raises(ScenarioError) as err:
        parse(doc, "own.yaml")
    lines = str(err.value).splitlines()
    assert lines[0] == "own.yaml: 2 error(s) in scenario"
    assert lines[1].startswith("  own.yaml: strategies.run[0].params.ranks: unknown profile(s) ['their-pi']; allowed:")
    assert "my-pi" in lines[1]
    assert lines[2] == "  own.yaml: strategies.run[1].params.calibration_depth: 5 exceeds the model's 2 blocks"


def test_the_block_layout_is_read_for_a_strategy_that_needs_it_whatever_its_label():
    """fedadapter and fedia3 read a block's projections, the others do not (so a scenario of
    them is checked without building the model); a renamed entry counts by its type."""
    doc = {**DOC, "strategies": {"baseline": "fedlora", "run": [{"name": "fedlora"}]}}
    assert strategy_context(parse(doc)).block_projections == ()
    doc["strategies"]["run"].append({"name": "small-adapters", "type": "fedadapter", "params": {"size": 8}})
    projections = strategy_context(parse(doc)).block_projections
    assert "attention.self.query" in projections and "output.dense" in projections
