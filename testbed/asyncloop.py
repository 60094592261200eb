"""The asynchronous loop (FedBuff, FedAsync): no round barrier.

Up to `max_concurrency` online devices train at once. Each gets a task built from the global model
of the moment, and the next one as soon as its result is in. Each result goes to the strategy with
its staleness: how many times the global model changed since the task was built. A change of the
global model is an aggregation step, and each step is one row of rounds.jsonl (its `round` is the
model's version).

The global model of each step is evaluated when the strategy's time is up, never while devices
train. On this host, evaluating would take cores from the training devices while the emulated
clock runs on. Stopping them for it would give them time for free, because a device's own clock
(its stretched compute) keeps running while it is frozen. The rows are written then.

Faults, deadlines and availability behave as in the round loop:
- a task's deadline is `training.round_deadline_s` from its dispatch;
- fault events of `round: r` happen at aggregation step r (`at_s` events at their time);
- a node that dies, is cut off or goes offline loses its task.
Each step is saved as it happens (testbed/store.py: its row before evaluation, the model, the
strategy's state, the faults in force). An interrupted run goes on from the last saved step, as a
synchronous one goes on from its last round; the tasks that were out are lost, as a round in
progress is.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from node import protocol as P

from .aggregator import PAYLOAD_PARTS, NodeRecord, add_payload, check_result
from .strategies import NodeInfo, Task, Update
from .strategies.base import update_counts


@dataclass
class Flight:
    """A task out: what it started from, when, and its record."""
    task: Task
    version: int
    step: int              # the message's round: the step being built when it was sent
    task_id: str
    sent_at: float         # host monotonic
    sent_s: float          # emulated seconds since the strategy started
    record: NodeRecord
    link: tuple[float, float] | None = None  # its link trace's rates when it went out
    download_s: float = 0.0  # the virtual clock's: its download, timed at dispatch


class AsyncRun:
    """One asynchronous strategy on the fleet of a RoundLoop (`loop`), from its round 0 on."""

    def __init__(self, loop, index: int, entry, strat, gplan, pos, go_on=None):
        self.loop, self.index, self.entry, self.strat, self.gplan, self.pos = loop, index, entry, strat, gplan, pos
        self.go_on = go_on
        self.f = loop.setup.dilation
        self.version = 0
        self.flights: dict[str, Flight] = {}
        self.returned: dict[str, float] = {}        # node -> emulated time its last task ended
        self.done: list[dict] = []                  # node entries since the last step
        self.updates: list[tuple[Update, int]] = []  # (update, staleness) of this step
        self.pending: list[tuple[dict, dict]] = []  # (row without evaluation, global state)
        self.bytes = {"up": 0, "down": 0}
        self.payload = dict.fromkeys(PAYLOAD_PARTS, 0)
        self.serial = self.batches = 0
        self.idle_since: float | None = None
        self.carried: list[dict] = []               # fault records applied again on a resume

    # -- the clock -------------------------------------------------------------------------
    def now(self) -> float:
        return self.pos.elapsed + (time.monotonic() - self.t0) / self.f

    def begin(self) -> None:
        """Where the strategy starts (or goes on): its clocks, the first step's faults, and this
        host's memory while every device trains (said once; its peak is taken per step)."""
        if self.go_on is not None:
            self._resume()
        self.t0, self.cpu0 = time.monotonic(), time.process_time()
        self.last_step_s, self.last_step_real = self.pos.elapsed, self.t0
        self.loop.inj.begin_round(self.version + 1, self.pos.elapsed)
        self.host = self.loop.host.before(self.entry.name, self.version + 1,
                                          dict.fromkeys(self.loop.agg.expected, self.gplan))

    def run(self) -> None:
        sc, inj = self.loop.sc, self.loop.inj
        budget, steps = sc.training.time_budget_s, sc.training.rounds
        self.begin()
        stop = None
        while stop is None:
            now = self.now()
            if budget is not None and now >= budget:
                stop = f"time budget {budget:g} s of emulated time used after step {self.version} ({now:.1f} s)"
                break
            self._dispatch(now)
            due = inj.tick()
            wait = min([0.25, *([due] if due is not None else []), *self._deadlines()])
            for n, msg, nbytes in self.loop.agg.poll(max(0.0, wait)):
                self._arrive(n, msg, nbytes)
                if self.version >= steps:
                    stop = f"all {steps} aggregation steps done"
                    break
            self._expire()
            stop = stop or self._stalled()
        self._abandon(stop)
        self._evaluate_and_write()

    def _resume(self) -> None:
        """Go on from the last saved step (or from round 0): its model, version, clock, the
        strategy's state and the faults in force; the saved steps wait for their evaluation."""
        loop, name = self.loop, self.entry.name
        steps = loop.store.async_steps(self.index, name)
        faults = self.go_on.faults
        if steps:
            last = steps[-1]
            self.pending = [(s["row"], s["state"]) for s in steps]
            self.version, self.pos.state = last["version"], last["state"]
            self.pos.elapsed = last["row"]["elapsed_s"]
            self.strat.load_state_dict(last["strategy_state"])
            faults = last["faults"]
        self.carried = loop.inj.restore(faults, name, loop.agg, loop.launcher)  # into the next step's events
        self.returned = dict.fromkeys(loop.agg.expected, self.pos.elapsed)
        loop.progress.message(f"{name}: resuming after step {self.version} ({self.pos.elapsed:.1f} s)")

    # -- dispatching -------------------------------------------------------------------------
    def _dispatch(self, now: float) -> None:
        """Idle online devices get work, up to max_concurrency in flight (a seeded pick)."""
        loop, inj = self.loop, self.loop.inj
        cap = self.strat.p.max_concurrency or len(loop.nodes)
        if len(self.flights) >= cap:
            return
        online = inj.online(self.version + 1, now)
        idle = sorted(n for n in loop.agg.ready() if n in online and loop.alive(n) and n not in loop.agg.busy
                      and n not in self.flights and n not in inj.lost)
        if not idle:
            return
        rng = np.random.default_rng([loop.sc.seed, self.version, self.serial])
        picked = rng.choice(idle, size=min(cap - len(self.flights), len(idle)), replace=False).tolist()
        nodes = [NodeInfo(n, inj.current[n], len(loop.work.shards[n])) for n in sorted(picked)]
        step = self.version + 1
        self.batches += 1  # the tasks' batch seeds: a device given work twice in one step draws new batches
        tasks = self.strat.configure(self.batches, nodes, self.state)
        devices = loop._devices(tasks)
        for n, task in tasks.items():
            self.serial += 1
            rec = NodeRecord(n, loop.agg.expected[n])
            tid = f"{self.entry.name}/a{self.serial}/{n}"
            sent_at = loop.agg.send_task(n, step, tid, task.plan.to_dict(), task.tensors, devices.get(n), rec)
            self.bytes["down"] += rec.bytes_down
            add_payload(self.payload, task.tensors, "down")
            flight = Flight(task, self.version, step, tid, sent_at, self.now(), rec, inj.link_now.get(n))
            if not sent_at:
                self._finish(n, flight)
                continue
            self.flights[n] = flight

    def _stalled(self) -> str | None:
        """Nothing in flight and no device to give work to for a whole round deadline: stop."""
        if self.flights or any(n not in self.loop.agg.busy for n in self.loop.agg.ready()):
            self.idle_since = None
            return None
        self.idle_since = self.idle_since or time.monotonic()
        if time.monotonic() - self.idle_since > self.loop.sc.training.round_deadline_s * self.f:
            return f"no device could train for {self.loop.sc.training.round_deadline_s:g} s (step {self.version})"
        return None

    # -- results ---------------------------------------------------------------------------
    def _arrive(self, n: str, msg: P.Message, nbytes: int) -> None:
        fl = self.flights.get(n)
        if fl is None or msg.meta.get("task_id") != fl.task_id:
            return  # a task given up on (deadline, fault) or of an earlier strategy: stale
        del self.flights[n]
        self._accept(n, fl, msg, nbytes, self._take(n, fl, msg, nbytes))

    def _take(self, n: str, fl: Flight, msg: P.Message, nbytes: int) -> bool:
        """Fill the flight's record from its RESULT or ERROR; True if the result is accepted."""
        return self.loop.agg.take_result(n, fl.step, msg, nbytes, fl.record, fl.sent_at,
                                         lambda m: check_result(fl.task.tensors, m))

    def _accept(self, n: str, fl: Flight, msg: P.Message, nbytes: int, ok: bool) -> None:
        """A task ended with its node's answer: the strategy receives an accepted update."""
        self.bytes["up"] += nbytes
        staleness = self.version - fl.version
        entry = self._finish(n, fl, staleness, msg.meta)
        if not ok:
            return
        if self.strat.too_stale(staleness):
            entry.update(status="dropped", reason=f"staleness {staleness} above max_staleness")
            return
        add_payload(self.payload, msg.tensors, "up")
        update = Update(n, fl.task.plan, dict(msg.tensors), int(msg.meta["samples"]), {**msg.meta, **entry})
        new, metrics = self.strat.receive(update, staleness, fl.task.tensors, self.state)
        self.updates.append((update, staleness))
        if new is not None:
            self._step(new, metrics)

    def _finish(self, n: str, fl: Flight, staleness: int | None = None, meta: dict | None = None) -> dict:
        """The node entry of a task that ended (any status), in emulated seconds."""
        d = self.loop.node_entry(n, fl.record, fl.task, meta or {}, fl.link)
        del d["wait_s"]  # no barrier to wait for: idle_s is the wait for work
        end = self.now()
        d.update(sent_s=round(fl.sent_s, 3), returned_s=round(end, 3),
                 idle_s=round(fl.sent_s - self.returned.get(n, self.pos.elapsed), 3))
        if staleness is not None:
            d["staleness"] = staleness
        self.returned[n] = end
        self.done.append(d)
        return d

    def _deadlines(self) -> list[float]:
        limit = self.loop.sc.training.round_deadline_s * self.f
        return [max(0.0, fl.sent_at + limit - time.monotonic()) for fl in self.flights.values()]

    def _expire(self) -> None:
        """Tasks past their deadline, or whose node died, went offline or was cut off."""
        loop, limit = self.loop, self.loop.sc.training.round_deadline_s * self.f
        for n, fl in list(self.flights.items()):
            fault = loop.inj.why_failed(n)
            if time.monotonic() - fl.sent_at >= limit:  # as the round loop: dropped at the deadline
                status, why = "dropped", f"{fault} (missed the round deadline)" if fault else "missed the round deadline"
            elif n in loop.inj.gone:                     # went offline: its work went with it
                status, why = "dropped", fault
            elif n in loop.inj.lost or not loop.alive(n):
                status, why = "failed", fault or loop.backend.exit_reason(n) or "node process exited"
            else:
                continue
            del self.flights[n]
            fl.record.status, fl.record.reason = status, why
            self._finish(n, fl)

    def _abandon(self, stop: str) -> None:
        """The strategy's time is up: tasks still out are given up (their results come back stale)."""
        for n, fl in list(self.flights.items()):
            fl.record.reason = "the strategy ended while it trained"
            self._finish(n, fl)
        self.flights = {}
        self.loop.stopped[self.entry.name] = stop
        left = f"; {len(self.done)} task(s) after the last step are in no row" if self.done else ""
        self.loop.progress.message(f"{self.entry.name}: {stop}{left}")
        self.loop.inj.end_round()

    # -- steps -----------------------------------------------------------------------------
    def _step(self, new: dict, metrics: dict) -> None:
        """The global model changed: one row (evaluated later), the next step's faults."""
        self.version += 1
        now, inj = self.now(), self.loop.inj
        ups = [u for u, _ in self.updates]
        events = [*self.carried, *inj.end_round()]
        row = {"strategy": self.entry.name, "round": self.version, "wall_s": now - self.last_step_s,
               "real_s": time.monotonic() - self.last_step_real, "elapsed_s": now, "bytes_up": self.bytes["up"], "bytes_down": self.bytes["down"],
               "payload": self.payload, "aggregator_cpu_s": time.process_time() - self.cpu0,
               "participants": len(ups), "dropped": sum(d["status"] != "ok" for d in self.done), "failed": False,
               "update_counts": update_counts(ups), "metrics": metrics,
               "events": events,
               "staleness": [s for _, s in self.updates], "in_flight": len(self.flights), "offline": [],
               "nodes": self.done, **self.row_extra()}
        self.loop.host.after(self.version, self.host[0], self.host[1], {}, events, self.loop.backend.alive)
        row["host"] = self.host[0]
        self.host = self.loop.host.before(self.entry.name, self.version + 1,
                                          {n: fl.task.plan for n, fl in self.flights.items()})
        self.pending.append((row, new))
        self.state = new
        self.loop.store.save_async_step(self.index, self.entry.name, self.version, {
            "row": row, "state": new, "version": self.version, "strategy_state": self.strat.state_dict(),
            "faults": inj.snapshot()})
        self.done, self.updates, self.bytes, self.carried = [], [], {"up": 0, "down": 0}, []
        self.payload = dict.fromkeys(self.payload, 0)
        self.last_step_s, self.last_step_real, self.cpu0 = now, time.monotonic(), time.process_time()
        inj.begin_round(self.version + 1, now)
        self.loop.progress.message(f"{self.entry.name} step {self.version}: {len(ups)} update(s), staleness "
                                   f"{row['staleness']}, elapsed {now:.1f} s")

    def row_extra(self) -> dict:
        """More fields for the step's row (the virtual clock's)."""
        return {}

    @property
    def state(self) -> dict:
        return self.pos.state

    @state.setter
    def state(self, value: dict) -> None:
        self.pos.state = value

    def _evaluate_and_write(self) -> None:
        """Each step's global model evaluated in order, its row written; then one checkpoint."""
        loop = self.loop
        for row, state in self.pending:
            ev, eval_s = loop.work.evaluate(self.gplan, state)
            row.update(ev, eval_s=eval_s)
            loop.store.append_row(row)
            loop.progress.round_done(row)
        self.pos.elapsed = self.pending[-1][0]["elapsed_s"] if self.pending else self.pos.elapsed
        self.pending = []
