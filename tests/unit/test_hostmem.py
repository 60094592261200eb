"""Host memory: OOM kill counts, the note before an oversized round, and how a run reports host OOM."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from emulation import hostmem
from node.plan import LoraSpec, Plan, TrainSpec
from testbed import costmodel
from testbed.hostwatch import HostWatch


def test_oom_kills_read_from_vmstat(tmp_path):
    f = tmp_path / "vmstat"
    f.write_text("nr_free_pages 12\noom_kill 7\npgfault 3\n")
    assert hostmem.oom_kills(f) == 7
    f.write_text("nr_free_pages 12\n")
    assert hostmem.oom_kills(f) is None  # an older kernel that does not count them
    assert hostmem.oom_kills(tmp_path / "missing") is None


def test_kill_me_first_writes_the_highest_score(tmp_path):
    f = tmp_path / "oom_score_adj"
    hostmem.kill_me_first(str(f))
    assert f.read_text() == "1000"
    hostmem.kill_me_first(str(tmp_path / "no" / "such"))  # no /proc: no error


def test_training_note_only_when_the_host_is_short():
    assert hostmem.training_note(1000, 2000, 10) is None
    assert hostmem.training_note(5000, 0, 0) is None  # nobody trains here (all remote)
    note = hostmem.training_note(16000, 12000, 80)
    assert "80 nodes training at once need about 16000 MB" in note and "12000 MB available" in note
    assert "training.clients_per_round" in note


def test_peak_sampler_keeps_the_maximum():
    with hostmem.PeakSampler(interval=0.01) as s:
        start = s.reset()
        assert s.peak >= start > 0
    assert not s.is_alive()


PLAN = Plan("lora", (0, 1, 2, 3, 4, 5), lora=LoraSpec(r=8, alpha=16),
            train=TrainSpec(local_steps=10, batch_size=16, max_len=32, lr=0.005, seed=0))
CONFIG = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 12,
          "vocab_size": 30522, "max_position_embeddings": 512, "num_labels": 2}


class Say:
    def __init__(self):
        self.lines = []

    def __call__(self, text, style=None):
        self.lines.append((text, style))


@pytest.fixture
def watch():
    # a-2 lives elsewhere (remote or another engine's host)
    return HostWatch(frozenset({"a-0", "a-1"}), costmodel.Arch.from_config(CONFIG), hostmem.PeakSampler(), Say(), [])


def test_a_round_too_big_for_the_host_is_said_once_per_strategy(watch, monkeypatch):
    say = watch.say
    plans = {n: replace(PLAN, train=replace(PLAN.train, seed=i)) for i, n in enumerate(["a-0", "a-1", "a-2"])}
    monkeypatch.setattr(hostmem, "available_mb", lambda: 100.0)
    host, _ = watch.before("fedlora", 1, plans)
    one = watch.training_mb(PLAN)
    assert 150 < one < 250  # the cost model: a LoRA round of the whole model above an idle node
    assert host["training_estimate_mb"] == pytest.approx(2 * one, abs=0.1)  # only this host's nodes
    assert host["available_before_mb"] == 100.0
    assert len(say.lines) == 1 and "2 nodes training at once" in say.lines[0][0] and watch.notes
    watch.before("fedlora", 2, plans)
    assert len(say.lines) == 1, "once per strategy"
    monkeypatch.setattr(hostmem, "available_mb", lambda: 1e6)
    watch.before("full", 1, plans)
    assert len(say.lines) == 1, "nothing to say when it fits"
    host, _ = watch.before("waves", 1, plans, at_once=1)
    assert host["training_estimate_mb"] == pytest.approx(one, abs=0.1), "the virtual clock's waves: one at a time"


def test_host_oom_kills_become_an_event_and_the_reason_of_lost_nodes(watch, monkeypatch):
    say = watch.say
    rec = lambda status, reason=None: SimpleNamespace(status=status, reason=reason)  # noqa: E731
    records = {"a-0": rec("error", "node process exited with code -9"), "a-1": rec("ok"), "a-2": rec("error", "x")}
    events = [{"type": "oom", "round": 3, "node": "a-9"}]  # one kill was a node's own limit
    monkeypatch.setattr(hostmem, "oom_kills", lambda: 12)
    watch.sampler.peak = 23000.0
    host = {}
    watch.after(3, host, 10, records, events, lambda n: False)
    assert host["oom_kills"] == 1 and host["peak_used_mb"] == 23000.0
    assert events[-1] == {"type": "host_oom", "round": 3, "kills": 1, "peak_used_mb": 23000.0}
    assert records["a-0"].reason == "node process exited with code -9; the host ran out of memory in this round"
    assert records["a-1"].reason is None and records["a-2"].reason == "x"  # ok, or not on this host
    assert "killed 1 process(es) for lack of host memory" in say.lines[0][0]
    host, events = {}, []
    watch.after(4, host, 12, records, events, lambda n: False)
    assert host["oom_kills"] == 0 and events == [] and len(say.lines) == 1
    watch.after(5, host, None, records, events, None)  # a kernel that does not count
    assert host["oom_kills"] is None
