"""The host's own memory during a run: will this round's trainers fit, and who did the kernel's
OOM killer take. Each device's limit is its own; together they can still exceed the host."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from emulation import hostmem
from node.plan import Plan

from . import costmeasure, costmodel


class HostWatch:
    def __init__(self, here: frozenset[str], arch: costmodel.Arch | None, sampler: hostmem.PeakSampler,
                 say: Callable[..., None], notes: list[str], base=None):
        """here: the nodes whose memory this host holds; notes: the run's fidelity notes (appended to).
        `arch`: a BERT encoder's sizes for the analytic cost model; None for another family, whose
        plans are measured on one step of `base` instead (testbed/costmeasure.py)."""
        self.here, self.arch, self.sampler, self.say, self.notes = here, arch, sampler, say, notes
        self.base = base
        self._warned: set[str] = set()
        self._plan_mb: dict[Plan, float] = {}

    def training_mb(self, plan: Plan) -> float:
        """Memory a node needs above its idle self to train `plan` (the cost model; plans differ
        per strategy and device, most repeat within a round)."""
        key = replace(plan, rank_penalty=None, train=replace(plan.train, seed=0, lr=1.0, weight_decay=0.0))
        if key not in self._plan_mb:
            try:
                if self.arch is not None:
                    self._plan_mb[key] = costmodel.estimate(self.arch, plan, runtime_mb=0.0).peak_memory_mb
                else:  # weights are the base's, shared: the round's own tensors, measured
                    self._plan_mb[key] = costmeasure.measure(self.base, plan).memory_mb()
            except (ValueError, KeyError, TypeError):  # a plan the cost model does not know: no estimate
                self._plan_mb[key] = 0.0
        return self._plan_mb[key]

    def before(self, strategy: str, rnd: int, plans: dict[str, Plan], at_once: int | None = None) -> tuple[dict, int | None]:
        """Before a round: will this host's nodes fit while they all train (or, with `at_once`,
        the most demanding that many of them: the virtual clock's waves)? Said once per
        strategy. Returns the round's host record and the kernel's OOM kill count so far."""
        trainers = sorted((n for n in plans if n in self.here), key=lambda n: self.training_mb(plans[n]))
        trainers = trainers[-at_once:] if at_once else trainers
        need = sum(self.training_mb(plans[n]) for n in trainers)
        avail = hostmem.available_mb()
        note = hostmem.training_note(need, avail, len(trainers))
        if note and strategy not in self._warned:
            self._warned.add(strategy)
            self.notes.append(f"{strategy} round {rnd}: {note}")
            self.say(f"{strategy} round {rnd}: {note}", style="yellow")
        self.sampler.reset()
        return {"training_estimate_mb": round(need, 1), "available_before_mb": round(avail, 1)}, hostmem.oom_kills()

    def after(self, rnd: int, host: dict, before: int | None, records: dict, events: list[dict],
              alive: Callable[[str], bool]) -> None:
        """After a round: its peak, and the kills by the host's OOM killer (all the kernel's kills
        less those by a node's own limit) as an event and as the reason of the nodes they may have taken."""
        host["peak_used_mb"] = round(self.sampler.peak, 1)
        now = hostmem.oom_kills()
        own = [e["node"] for e in events if e.get("type") == "oom"]
        host["oom_kills"] = None if before is None or now is None else max(0, now - before - len(own))
        if not host["oom_kills"]:
            return
        events.append({"type": "host_oom", "round": rnd, "kills": host["oom_kills"],
                       "peak_used_mb": host["peak_used_mb"]})
        for n, rec in records.items():
            if rec.status != "ok" and n in self.here and n not in own and not alive(n):
                rec.reason = f"{rec.reason}; the host ran out of memory in this round" if rec.reason else \
                    "the host ran out of memory in this round"
        self.say(f"round {rnd}: the kernel killed {host['oom_kills']} process(es) for lack of host memory "
                 f"(peak {host['peak_used_mb']:.0f} MB in use)", style="red")
