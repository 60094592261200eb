"""Scenario files: a good one parses with its defaults; field errors name file, field, value and
what is allowed (the broken files, each with its exact errors, are test_broken_scenarios.py's);
--set overrides; expansion of node groups into nodes."""
import copy
from pathlib import Path

import pytest

from emulation.profiles import PROFILES
from testbed.scenario import Scenario, ScenarioError, expand_nodes, load, parse

ROOT = Path(__file__).resolve().parents[2]
MINIMAL_FILE = ROOT / "tests" / "scenarios" / "minimal.yaml"
BROKEN = ROOT / "tests" / "scenarios" / "broken"

MINIMAL = {
    "name": "t",
    "nodes": [{"group": "pi5", "count": 2, "profile": "rpi5"}],
    "strategies": {"baseline": "fedlora", "run": [{"name": "fedlora"}]},
}


# -- valid files --------------------------------------------------------------------------

def test_minimal_file_parses_with_defaults():
    sc = load(MINIMAL_FILE)
    assert isinstance(sc, Scenario)
    assert sc.name == "minimal"
    assert sc.nodes[0].profile == "rpi5" and sc.nodes[0].count == 2
    assert sc.strategies.baseline == "fedlora"
    assert sc.strategies.run[0].type == "fedlora"  # type defaults to the name
    assert sc.training.rounds == 10 and sc.training.clients_per_round is None
    assert sc.aggregator.bind == "127.0.0.1"


def test_minimal_dict_parses():
    sc = parse(copy.deepcopy(MINIMAL))
    assert [n.name for n in expand_nodes(sc)] == ["pi5-0", "pi5-1"]


PROJECT_SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))


def test_project_has_scenarios():
    assert PROJECT_SCENARIOS, "scenarios/*.yaml should hold at least one scenario"


@pytest.mark.parametrize("path", PROJECT_SCENARIOS, ids=lambda p: p.name)
def test_every_project_scenario_validates(path):
    sc = load(path)
    nodes = expand_nodes(sc)
    assert len(nodes) == sum(g.count for g in sc.nodes)
    assert sc.strategies.baseline in {s.name for s in sc.strategies.run}


# -- broken files (each one's exact errors: test_broken_scenarios.py) -----------------------

def test_unknown_profile_lists_every_built_in_profile():
    path = BROKEN / "unknown-profile.yaml"
    with pytest.raises(ScenarioError) as err:
        load(path)
    text = str(err.value)
    assert "nodes[0].profile" in text and "allowed:" in text
    for name in PROFILES:
        assert name in text


def test_missing_file(tmp_path):
    path = tmp_path / "does_not_exist.yaml"
    with pytest.raises(ScenarioError, match="cannot read scenario") as err:
        load(path)
    assert str(path) in str(err.value)


def test_every_problem_is_listed(tmp_path):
    doc = copy.deepcopy(MINIMAL)
    doc["nodes"] = [{"group": "a", "count": 0, "profile": "rpi4"}, {"group": "b", "profile": "nope"}]
    doc["training"] = {"rounds": 0}
    with pytest.raises(ScenarioError) as err:
        parse(doc, "mem.yaml")
    text = str(err.value)
    assert "3 error(s)" in text
    for where in ("nodes[0].count", "nodes[1].profile", "training.rounds"):
        assert f"mem.yaml: {where}:" in text


@pytest.mark.parametrize("mutate, where, allowed", [
    (lambda d: d["nodes"][0].update(overrides={"cpu_shar": 1.0}), "nodes[0].overrides", "cpu_share"),
    (lambda d: d["nodes"][0].update(ranges={"uplink_mbit": [20, 5]}), "nodes[0].ranges", "lo <= hi"),
    (lambda d: d.update(backend="kvm"), "backend", "'docker'"),
    (lambda d: d.update(data={"partition": {"kind": "dirichlet", "alpha": 0}}), "data.partition.alpha",
     "greater than 0"),
    (lambda d: d.update(data={"dataset": "imagenet"}), "data.dataset", "rotten_tomatoes"),
    (lambda d: d.update(model={"name": "gpt9"}), "model.name", "all-minilm-l6-v2"),
    (lambda d: d["nodes"].append({"group": "pi5", "profile": "rpi4"}), "nodes", "repeated: ['pi5']"),
    (lambda d: d["strategies"]["run"].append({"name": "fedlora"}), "strategies", "repeated: ['fedlora']"),
    (lambda d: d.update(training={"min_results": 5}), "training.min_results", "5 exceeds clients per round"),
])
def test_other_field_errors(mutate, where, allowed):
    doc = copy.deepcopy(MINIMAL)
    mutate(doc)
    with pytest.raises(ScenarioError) as err:
        parse(doc, "mem.yaml")
    text = str(err.value)
    assert f"mem.yaml: {where}" in text
    assert allowed in text


# -- --set overrides ----------------------------------------------------------------------

def test_set_overrides_apply():
    sc = load(MINIMAL_FILE, ["training.rounds=5", "seed=42", "nodes.0.count=3",
                                      "data.partition.alpha=0.1", "training.lr = 0.01"])
    assert sc.training.rounds == 5
    assert sc.seed == 42
    assert sc.nodes[0].count == 3
    assert sc.data.partition.alpha == pytest.approx(0.1)
    assert sc.training.lr == pytest.approx(0.01)


def test_set_value_parsed_as_yaml_list():
    sc = load(MINIMAL_FILE, ["nodes.0.ranges.uplink_mbit=[1, 2]"])
    assert sc.nodes[0].ranges["uplink_mbit"] == (1.0, 2.0)


def test_set_override_is_validated():
    with pytest.raises(ScenarioError) as err:
        load(MINIMAL_FILE, ["training.rounds=0"])
    assert "training.rounds" in str(err.value) and "(got 0)" in str(err.value)


def test_bad_set_without_equals():
    with pytest.raises(ScenarioError, match="expected key=value") as err:
        load(MINIMAL_FILE, ["training.rounds"])
    assert "'training.rounds'" in str(err.value)


def test_set_into_a_scalar_is_refused():
    with pytest.raises(ScenarioError, match="--set name.x"):
        load(MINIMAL_FILE, ["name.x=1"])


def test_set_does_not_touch_the_file():
    before = MINIMAL_FILE.read_text()
    load(MINIMAL_FILE, ["training.rounds=5"])
    assert MINIMAL_FILE.read_text() == before
    assert load(MINIMAL_FILE).training.rounds == 10


# -- expand_nodes -------------------------------------------------------------------------

def _scenario(seed=0, **group_extra):
    doc = copy.deepcopy(MINIMAL)
    doc["seed"] = seed
    doc["nodes"] = [
        {"group": "pi5", "count": 3, "profile": "rpi5", **group_extra},
        {"group": "agx", "count": 2, "profile": "agx-xavier"},
    ]
    return parse(doc)


def test_expand_counts_and_names():
    nodes = expand_nodes(_scenario())
    assert [n.name for n in nodes] == ["pi5-0", "pi5-1", "pi5-2", "agx-0", "agx-1"]
    assert [n.group for n in nodes] == ["pi5"] * 3 + ["agx"] * 2
    assert all(n.profile == PROFILES["rpi5"] for n in nodes[:3])
    assert all(n.profile == PROFILES["agx-xavier"] for n in nodes[3:])
    assert not any(n.remote for n in nodes)


def test_expand_ranges_within_bounds_and_reproducible():
    ranges = {"uplink_mbit": [5.0, 20.0], "latency_ms": [1.0, 50.0], "cpu_share": [0.1, 0.2]}
    a = expand_nodes(_scenario(seed=7, count=50, ranges=ranges))
    b = expand_nodes(_scenario(seed=7, count=50, ranges=ranges))
    c = expand_nodes(_scenario(seed=8, count=50, ranges=ranges))
    drawn = [n for n in a if n.group == "pi5"]
    assert len(drawn) == 50
    for n in drawn:
        assert 5.0 <= n.profile.uplink_mbit <= 20.0
        assert 1.0 <= n.profile.latency_ms <= 50.0
        assert 0.1 <= n.profile.cpu_share <= 0.2
        # fields without a range keep the profile's value
        assert n.profile.downlink_mbit == PROFILES["rpi5"].downlink_mbit
    ups = [n.profile.uplink_mbit for n in drawn]
    assert len(set(ups)) > 40, "each node draws its own value"
    assert [n.profile for n in a] == [n.profile for n in b]  # same seed, same draws
    assert [n.profile for n in a] != [n.profile for n in c]  # another seed, other draws
    # groups without ranges are untouched
    assert all(n.profile == PROFILES["agx-xavier"] for n in a if n.group == "agx")


def test_expand_degenerate_range_gives_exact_value():
    nodes = expand_nodes(_scenario(ranges={"uplink_mbit": [7.5, 7.5]}))
    assert all(n.profile.uplink_mbit == 7.5 for n in nodes if n.group == "pi5")


def test_expand_overrides_applied_and_integer_fields_rounded():
    nodes = expand_nodes(_scenario(overrides={"memory_mb": 1000.7, "uplink_mbit": 3.0, "threads": 2.6},
                                   ranges={"latency_ms": [10, 20]}))
    for n in nodes[:3]:
        assert n.profile.memory_mb == 1000 and isinstance(n.profile.memory_mb, int)
        assert n.profile.threads == 3 and isinstance(n.profile.threads, int)
        assert n.profile.uplink_mbit == 3.0
        assert 10 <= n.profile.latency_ms <= 20
        assert n.profile.cpu_share == PROFILES["rpi5"].cpu_share
        assert n.profile.name == "rpi5"
    assert PROFILES["rpi5"].memory_mb != 1000  # the shared profile is not modified


def test_expand_threads_at_least_one():
    nodes = expand_nodes(_scenario(ranges={"threads": [0.0, 0.4]}))
    assert all(n.profile.threads == 1 for n in nodes if n.group == "pi5")


def test_expand_remote_backend():
    nodes = expand_nodes(_scenario(backend="remote"))
    assert [n.remote for n in nodes] == [True] * 3 + [False] * 2


def test_dilation_off_auto_and_numbers():
    from testbed.scenario import parse
    base = {"name": "d", "nodes": [{"group": "g", "profile": "host"}],
            "strategies": {"baseline": "fedlora", "run": [{"name": "fedlora"}]}}
    assert parse({**base, "dilation": False}).dilation == "off"   # YAML `dilation: off`
    assert parse({**base, "dilation": "auto"}).dilation == "auto"
    assert parse({**base, "dilation": 2.5}).dilation == 2.5
    with pytest.raises(ScenarioError, match="dilation"):
        parse({**base, "dilation": 0.5})


def test_scenario_defines_its_own_profiles():
    doc = copy.deepcopy(MINIMAL)
    doc["profiles"] = {"my-pi": {"cpu_share": 0.21, "threads": 4, "memory_mb": 3500, "uplink_mbit": 18.5,
                                 "downlink_mbit": 41.0, "latency_ms": 3.2, "source": "calibrated"}}
    doc["nodes"] = [{"group": "pi", "count": 2, "profile": "my-pi", "overrides": {"memory_mb": 3000}}]
    nodes = expand_nodes(parse(doc))
    p = nodes[0].profile
    assert (p.name, p.cpu_share, p.threads, p.memory_mb, p.uplink_mbit, p.source) == \
        ("my-pi", 0.21, 4, 3000, 18.5, "calibrated")


@pytest.mark.parametrize("profiles,needle", [
    ({"rpi5": {"cpu_share": 1, "memory_mb": 100}}, "profiles.rpi5: profile 'rpi5' is built in"),
    ({"x": {"cpu_share": 0, "memory_mb": 100}}, "profiles.x.cpu_share: Input should be greater than 0"),
    ({"x": {"cpu_share": 1}}, "profiles.x.memory_mb: Field required"),
    ({"x": {"cpu_share": 1, "memory_mb": 9, "speed": 2}}, "profiles.x.speed: Extra inputs are not permitted"),
])
def test_bad_scenario_profiles_are_named(profiles, needle):
    doc = copy.deepcopy(MINIMAL)
    doc["profiles"] = profiles
    with pytest.raises(ScenarioError) as err:
        parse(doc, "s.yaml")
    assert needle in str(err.value), str(err.value)


def test_unknown_profile_lists_the_scenario_ones_too():
    doc = copy.deepcopy(MINIMAL)
    doc["profiles"] = {"my-pi": {"cpu_share": 0.2, "memory_mb": 900}}
    doc["nodes"][0]["profile"] = "my-pj"
    with pytest.raises(ScenarioError) as err:
        parse(doc, "s.yaml")
    assert "nodes[0].profile: unknown profile 'my-pj'" in str(err.value) and "my-pi" in str(err.value)
