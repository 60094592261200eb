"""The run folder's checkpoint: plain data only, and the first format still read."""
from __future__ import annotations

import pickle
import sys
import types
from dataclasses import asdict, dataclass

import numpy as np
import pytest

from testbed.store import CHECKPOINT_VERSION, Checkpoint, RunError, RunStore, read_checkpoint, write_checkpoint

STATE = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.float32)}


def checkpoint(**kw) -> Checkpoint:
    base = dict(scenario={"name": "s"}, run_id="r1", strategy_index=1, strategy="legend", round=3, elapsed=12.5,
                done=False, state=STATE, strategy_state={"speed": {"a": 1e9}}, row={"round": 3},
                stopped={}, restarts=[{"before": "legend"}], faults={"queue": [], "current": {}})
    return Checkpoint(**{**base, **kw})


def test_a_checkpoint_is_the_same_when_read_back(tmp_path):
    path = tmp_path / "checkpoint.pkl"
    write_checkpoint(path, checkpoint())
    got = read_checkpoint(path)
    assert got.version == CHECKPOINT_VERSION == 2
    np.testing.assert_array_equal(got.state["w"], STATE["w"])
    assert got.state["w"].dtype == np.float32 and got.state["b"].shape == (0,)
    assert asdict(got) | {"state": None} == asdict(checkpoint()) | {"state": None}


class Evil:
    def __reduce__(self):
        return (print, ("imported and ran",))


@pytest.mark.parametrize("thing", [Evil(), types.SimpleNamespace(a=1)])
def test_reading_a_checkpoint_never_runs_or_imports_a_class(tmp_path, thing, capsys):
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(pickle.dumps({**asdict(checkpoint()), "row": thing}))
    with pytest.raises(RunError, match="damaged version-2 checkpoint.*plain data only"):
        read_checkpoint(path)
    assert "imported and ran" not in capsys.readouterr().out


@pytest.mark.parametrize("data, match", [(b"not a pickle", "not a checkpoint"),
                                         (pickle.dumps({"version": 9}), "version 9; this testbed reads versions 1, 2"),
                                         (pickle.dumps([1, 2]), "version None")])
def test_what_is_not_a_checkpoint_is_said(tmp_path, data, match):
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(data)
    with pytest.raises(RunError, match=match):
        read_checkpoint(path)


# -- the first format: the strategy object itself was pickled --------------------------------------
@dataclass(frozen=True)
class OldProfile:
    name: str
    cpu_share: float


class OldLegend:
    def __init__(self):
        self.p = OldProfile("params-stand-in", 1.0)  # anything else the object held: ignored
        self.speed, self.bw_up, self.bw_down = {"a": 2e9}, {"a": 8e6}, {"a": 9e6}
        self.depths = {1: {"a": 6}}


@dataclass(order=True)
class OldDue:
    at_s: float
    seq: int
    index: int
    node: str
    undo: bool = False
    round_event: bool = False
    prev: OldProfile | None = None


def _as_if_from(module: str, *classes):
    """Pickle these classes under `module` (where the old testbed had them)."""
    mod = sys.modules.setdefault(module, types.ModuleType(module))
    for c in classes:
        c.__module__, c.__qualname__ = module, c.__name__
        setattr(mod, c.__name__, c)


def test_a_version_1_checkpoint_is_read_and_converted(tmp_path):
    _as_if_from("oldtestbed_legend", OldLegend)
    _as_if_from("oldtestbed_faults", OldDue, OldProfile)
    old = {"version": 1, "scenario": {"name": "s"}, "run_id": "r0", "strategy_index": 1, "strategy": "legend",
           "round": 1, "elapsed": 3.0, "done": False, "state": STATE, "strategy_object": OldLegend(),
           "row": {"round": 1}, "stopped": {}, "restarts": [],
           "faults": {"queue": [OldDue(5.0, 1, 0, "a", undo=True, prev=OldProfile("rpi4", 0.18))], "seq": 1,
                      "current": {"a": OldProfile("rpi5", 0.5)}, "paused": [], "cut": [], "killed": [],
                      "injected": 1, "not_applied": 0}}
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(pickle.dumps(old, protocol=pickle.HIGHEST_PROTOCOL))
    for m in ("oldtestbed_legend", "oldtestbed_faults"):
        del sys.modules[m]  # the classes are gone, as after a refactor
    ck = read_checkpoint(path)
    assert ck.version == 1 and ck.strategy == "legend" and ck.round == 1
    assert ck.strategy_state == {"speed": {"a": 2e9}, "bw_up": {"a": 8e6}, "bw_down": {"a": 9e6}}
    assert ck.faults["current"] == {"a": {"name": "rpi5", "cpu_share": 0.5}}
    assert ck.faults["queue"] == [{"at_s": 5.0, "seq": 1, "index": 0, "node": "a", "undo": True,
                                   "round_event": False, "prev": {"name": "rpi4", "cpu_share": 0.18}}]
    np.testing.assert_array_equal(ck.state["w"], STATE["w"])


# -- the folder ---------------------------------------------------------------------------------
def test_a_new_run_never_overwrites_results(tmp_path):
    RunStore(tmp_path / "a").create()
    (tmp_path / "a" / "rounds.jsonl").write_text("{}\n")
    with pytest.raises(RunError, match="already holds results"):
        RunStore(tmp_path / "a").create()


def test_resume_cuts_rounds_back_to_the_checkpoint(tmp_path):
    import json
    store = RunStore(tmp_path)
    scenario = {"name": "s"}
    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": "old", "status": "running"}))
    rows = [{"strategy": "fedlora", "round": r} for r in range(3)] + [{"strategy": "legend", "round": 0},
                                                                        {"strategy": "legend", "round": 1}]
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut sho')
    write_checkpoint(tmp_path / "checkpoint.pkl", checkpoint(strategy_index=1, strategy="legend", round=0,
                                                             row={"strategy": "legend", "round": 0}))
    ck, old = store.resume(scenario, ["fedlora", "legend"], "new")
    assert old == "old" and ck.round == 0
    assert [(r["strategy"], r["round"]) for r in store.rows] == [("fedlora", 0), ("fedlora", 1), ("fedlora", 2),
                                                                  ("legend", 0)]
    assert store.resumed[-1]["from_run_id"] == "old" and store.resumed[-1]["checkpoint_version"] == 2
    with pytest.raises(RunError, match=r"the scenario differs .*\(name: s -> other\)"):
        RunStore(tmp_path).resume({"name": "other"}, ["fedlora", "legend"], "new")


def test_a_resume_names_every_parameter_this_version_resolves_otherwise():
    from testbed.store import params_changed
    then = {"legend": {"deadline": "fastest_full", "ema": 0.5}, "fedlora": {"rank": 8}}
    now = {"legend": {"deadline": "straggler", "ema": 0.5, "pooler": False}, "fedlora": {"rank": 8},
           "hetlora": {"rank_max": 16}}  # not begun then: nothing to compare with
    assert params_changed(then, now) == ["legend: deadline: fastest_full -> straggler",
                                         "legend: pooler: (none) -> False"]
    assert params_changed(now, now) == []


def test_a_run_that_began_before_the_fill_order_resumes_only_in_that_order(tmp_path):
    """Dirichlet shards were drawn in the nodes' order before data.partition.fill existed; such a
    run's checkpoint reads as fill in_order, so resuming it under the new default is refused
    naming the field, and with fill: in_order it goes on."""
    import json
    from testbed.scenario import as_it_began, parse
    base = {"name": "s", "data": {"dataset": "rotten_tomatoes", "partition": {"kind": "dirichlet", "alpha": 1.0}},
            "nodes": [{"group": "n", "count": 2, "profile": "host"}],
            "strategies": {"baseline": "fedlora", "run": [{"name": "fedlora"}]}}
    old = parse(base).model_dump(mode="json")
    del old["data"]["partition"]["fill"]  # as a version before the field wrote it
    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": "old", "status": "running"}))
    (tmp_path / "rounds.jsonl").write_text(json.dumps({"strategy": "fedlora", "round": 0}) + "\n")
    write_checkpoint(tmp_path / "checkpoint.pkl", checkpoint(scenario=old, strategy_index=0, strategy="fedlora", round=0,
                                                             row={"strategy": "fedlora", "round": 0}))
    normalize = lambda d: parse(as_it_began(d)).model_dump(mode="json")  # noqa: E731  (the runner's)
    now = parse(base).model_dump(mode="json")
    with pytest.raises(RunError, match=r"data.partition.fill: in_order -> balanced"):
        RunStore(tmp_path).resume(now, ["fedlora"], "new", normalize=normalize)
    pinned = {**base, "data": {**base["data"], "partition": {"kind": "dirichlet", "alpha": 1.0, "fill": "in_order"}}}
    ck, _ = RunStore(tmp_path).resume(parse(pinned).model_dump(mode="json"), ["fedlora"], "new", normalize=normalize)
    assert ck.round == 0
    iid = {**base, "data": {**base["data"], "partition": {"kind": "iid"}}}
    assert as_it_began(iid) == iid, "iid shards do not depend on the order"
