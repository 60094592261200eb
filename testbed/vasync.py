"""The asynchronous loop on the virtual clock (`clock: virtual` with FedBuff or FedAsync).

The devices train for real at host speed, several at once; their results land in real time in
any order. The strategy must receive them in the order of their virtual arrival (dispatch +
download + CPU seconds / cores + upload), and every fault, deadline and new dispatch must
happen at its virtual time. So the loop is a discrete-event simulation whose events wait for
real work:

- the next event is the earliest of: a landed result's arrival, a task's deadline, a due
  fault, trace step or availability edge, the time budget;
- it is processed only when no task still training could arrive before it. A training task's
  earliest arrival is its dispatch + its download + its upload's latency + `LOOKAHEAD` x the
  compute time of its device's previous task (0 for a first task). Until then the loop collects
  results.
- A task whose compute came in under that bound lands in the past. It is taken at the current
  time, and the row's `vclock_late` counts it. The bound is a guess about compute time, which
  changes little from one task of a device to the next; the count shows when it did not hold.

Pausing a node (a fault event) is not timed here yet: `testbed validate` refuses it with an
asynchronous strategy on the virtual clock.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from node import protocol as P

from .asyncloop import AsyncRun
from .vclock import link_of, real_timeout_s

LOOKAHEAD = 0.5  # of a device's previous compute time: the least its next task is assumed to take


@dataclass
class Landed:
    """A result in from the node (real time), waiting for its virtual arrival."""
    msg: P.Message
    nbytes: int
    ok: bool
    arrival: float


class VirtualAsyncRun(AsyncRun):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.vnow = self.pos.elapsed
        self.landed: dict[str, Landed] = {}
        self.earliest: dict[str, float] = {}      # node -> the least arrival of its training task
        self.compute: dict[str, float] = {}       # node -> its previous task's compute seconds
        self.late = 0                             # results that landed before the clock's now

    def now(self) -> float:
        return self.vnow

    def run(self) -> None:
        sc = self.loop.sc
        self.begin()
        self.vnow = self.pos.elapsed
        stop = None
        while stop is None:
            self._dispatch(self.vnow)
            self._collect(0.0)
            t, kind, n = self._next_event()
            if not self._safe(t):
                self._collect(0.25)
                self._give_up_on_silent()
                continue
            stop = self._process(t, kind, n)
            if stop is None and self.version >= sc.training.rounds:
                stop = f"all {sc.training.rounds} aggregation steps done"
        self._abandon(stop)
        self._evaluate_and_write()

    # -- events ----------------------------------------------------------------------------
    def _next_event(self) -> tuple[float, str, str]:
        """(time, kind, node) of the earliest thing that may happen next."""
        deadline, budget = self.loop.sc.training.round_deadline_s, self.loop.sc.training.time_budget_s
        events = [(math.inf, "idle", "")]
        if not self.flights:  # nothing training: the strategy stops after a deadline's time idle
            events.append((self.vnow + deadline, "idle", ""))
        for n, fl in self.flights.items():
            land = self.landed.get(n)
            if land is not None and land.arrival <= fl.sent_s + deadline:
                events.append((land.arrival, "arrival", n))
            else:
                events.append((fl.sent_s + deadline, "deadline", n))
        due = self.loop.inj.next_due()
        if due is not None:
            events.append((due, "due", ""))
        if budget is not None:
            events.append((max(budget, self.vnow), "budget", ""))
        return min(events)

    def _safe(self, t: float) -> bool:
        """No task still training could arrive before t."""
        return all(self.earliest[n] >= t for n in self.flights if n not in self.landed)

    def _process(self, t: float, kind: str, n: str) -> str | None:
        """Move the clock to t, apply what fell due, then the event itself; a reason to stop, or None."""
        inj = self.loop.inj
        if kind == "idle" and not self.flights:
            return f"no device could train for {self.loop.sc.training.round_deadline_s:g} s (step {self.version})"
        inj.vbusy = set(self.flights)
        self.vnow = max(self.vnow, t)
        inj.advance(self.vnow)
        self._lose_to_faults()
        self._await_restarted()
        if kind == "budget":
            budget = self.loop.sc.training.time_budget_s
            return f"time budget {budget:g} s of emulated time used after step {self.version} ({self.vnow:.1f} s)"
        if kind == "arrival" and n in self.flights:
            fl, land = self.flights.pop(n), self.landed.pop(n)
            self.compute[n] = fl.record.compute_s
            self._accept(n, fl, land.msg, land.nbytes, land.ok)
        elif kind == "deadline" and n in self.flights:
            fl = self.flights.pop(n)
            self.landed.pop(n, None)
            fl.record.status, fl.record.reason = "dropped", "missed the round deadline"
            self._finish(n, fl)
        return None

    def _lose_to_faults(self) -> None:
        """Tasks whose node was killed, restarted or went offline by now are lost, landed or not."""
        inj = self.loop.inj
        for n in [n for n in self.flights if n in inj.lost]:
            fl = self.flights.pop(n)
            self.landed.pop(n, None)
            fl.record.status = "dropped" if n in inj.gone else "failed"
            fl.record.reason = inj.why_failed(n)
            self._finish(n, fl)

    # -- real time -------------------------------------------------------------------------
    def _dispatch(self, now: float) -> None:
        before = set(self.flights)
        super()._dispatch(now)
        for n in set(self.flights) - before:  # each new task's earliest arrival
            fl, latency_s = self.flights[n], self.loop.inj.profile_now(n).latency_ms / 1e3
            fl.download_s = link_of(self.loop.inj, n, fl.record.bytes_down, fl.sent_s, self._horizon(), "down")
            self.earliest[n] = fl.sent_s + fl.download_s + latency_s + LOOKAHEAD * self.compute.get(n, 0.0)

    def _horizon(self) -> float:
        return self.loop.sc.training.round_deadline_s + 1.0

    def _collect(self, wait_s: float) -> None:
        """Results that came in: each gets its virtual arrival time."""
        for n, msg, nbytes in self.loop.agg.poll(wait_s):
            fl = self.flights.get(n)
            if fl is None or msg.meta.get("task_id") != fl.task_id or n in self.landed:
                continue  # stale: a task given up on (deadline, fault) or of an earlier strategy
            ok = self._take(n, fl, msg, nbytes)
            up_at = fl.sent_s + fl.download_s + fl.record.compute_s
            fl.record.download_s = fl.download_s
            fl.record.upload_s = link_of(self.loop.inj, n, nbytes, up_at, self._horizon(), "up")
            arrival = up_at + fl.record.upload_s
            if arrival < self.vnow:  # under the lookahead's bound: taken now, and counted
                self.late += 1
                arrival = self.vnow
            self.landed[n] = Landed(msg, nbytes, ok, arrival)

    def _await_restarted(self) -> None:
        """A node restarted by a fault registers before the clock moves on (as it would have in
        the real time that passed); results that come in meanwhile land as usual."""
        limit = time.monotonic() + self.loop.sc.aggregator.register_timeout_s
        while self.loop.registering() and time.monotonic() < limit:
            self._collect(0.2)

    def _give_up_on_silent(self) -> None:
        """A task that has not answered in the real time its deadline allows, or whose node
        died, lands as lost (it could not have come back in time)."""
        shares = [self.loop.inj.profile_now(n).cpu_share for n in self.flights]
        limit = real_timeout_s(self.loop.sc.training.round_deadline_s, shares, self.loop.setup.caps.get("cores") or 1)
        for n, fl in list(self.flights.items()):
            if n in self.landed:
                continue
            if time.monotonic() - fl.sent_at > limit:
                self.earliest[n] = math.inf   # its deadline event decides
            elif not self.loop.alive(n):
                self.flights.pop(n)
                fl.record.status = "failed"
                fl.record.reason = self.loop.backend.exit_reason(n) or "node process exited"
                self._finish(n, fl)

    def row_extra(self) -> dict:
        late, self.late = self.late, 0
        return {"vclock_late": late}

