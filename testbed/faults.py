"""Scenario faults: scheduled events and node availability, injected into a running strategy.

Events run on a strategy's own clock (its rounds, or emulated seconds since it started), so every
strategy meets the same faults at the same point; before the next strategy the fleet is put back
(paused nodes resumed, links and profiles restored; the runner restarts dead nodes).
The runner calls `tick()` from the aggregator's receive loop: every fault is injected on the
runner's own thread between two polls (at most about 0.25 s late), never beside the aggregator.
A fault the backend cannot inject (a link cut on the process backend) is recorded as not
applied, with the reason, and the run goes on.
"""
from __future__ import annotations

import heapq
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from emulation.backends import FaultUnsupported
from emulation.profiles import PROFILES, Profile

from .linktrace import TraceError, availability_of, rate_traces_of  # noqa: F401 (TraceError: re-exported)

log = logging.getLogger("testbed.faults")


@dataclass(order=True)
class Due:
    """A fault (or the undoing of one) due at `at_s` emulated seconds into the strategy."""
    at_s: float
    seq: int
    index: int = field(compare=False)      # which scenario event
    node: str = field(compare=False)
    undo: bool = field(compare=False, default=False)
    round_event: bool = field(compare=False, default=False)
    prev: Profile | None = field(compare=False, default=None)  # link/profile: what to go back to
    kind: str = field(compare=False, default="event")  # event, rate (a trace step) or online (an interval edge)


class Injector:
    """The faults of one run: which nodes are online, and the events, applied through the backend."""

    def __init__(self, sc, nodes, backend, dilation: float, say=lambda _: None, virtual: bool = False):
        """`virtual` (`clock: virtual`, testbed/vclock.py): the clock moves only when the round
        loop advances it, and pausing a node (a fault, going offline) is kept here, not done to
        its process: a paused task stands still on the virtual clock instead."""
        self.sc, self.backend, self.dilation, self.say = sc, backend, dilation, say
        self.virtual, self.vnow = virtual, 0.0
        self.vbusy: set[str] = set()                 # virtual clock: nodes whose task has not arrived yet
        self.events = sc.faults.events
        self.probability = sc.faults.availability.probability
        self.intervals = availability_of(sc, nodes)  # node -> when it is online (trace or markov)
        self.rates = rate_traces_of(sc, nodes)        # node -> its link's rates over time
        self.link_now: dict[str, tuple[float, float]] = {}
        self.offline: set[str] = set()               # nodes that went offline with work out: paused
        self.gone: set[str] = set()                  # nodes whose work of this round went with them
        self._said: set[tuple[str, str]] = set()
        self.rate_steps = 0                          # trace steps applied (every strategy)
        self.dropped_offline = 0                     # tasks lost to a node going offline mid-round
        self.names = sorted(n.name for n in nodes)
        self.members = {g.group: [f"{g.group}-{i}" for i in range(g.count)] for g in sc.nodes}
        self.base = {n.name: n.profile for n in nodes}
        self.current = dict(self.base)            # the profile each node runs with now
        self.paused: set[str] = set()
        self.cut: set[str] = set()
        self.killed: set[str] = set()
        self.lost: dict[str, str] = {}            # node -> why its task of this round is gone
        self.queue: list[Due] = []
        self.records: list[dict] = []             # what happened in the current round
        self.injected = 0
        self.not_applied = 0
        self._seq = 0
        self.strategy = None
        self.agg = None
        self.launcher = None  # emulation.launch.Launcher: how a restarted or switched node starts
        self.round, self.round_elapsed, self._t0 = 0, 0.0, time.monotonic()

    def describe(self) -> list[str]:
        """What changes over time in this run, said once at its start."""
        out = []
        for g in self.sc.nodes:
            tr = g.link_trace
            if tr is not None:
                what = (f"{tr.file} ({'looped' if tr.end == 'loop' else 'held at its end'})" if tr.file else
                        "the Gilbert-Elliott generator (synthetic)")
                out.append(f"link trace: group {g.group} follows {what}")
        av = self.sc.faults.availability
        if av.trace or av.markov:
            what = av.trace or (f"Markov on/off (synthetic): mean online {av.markov.mean_on_s:g} s, "
                                f"offline {av.markov.mean_off_s:g} s")
            out.append(f"availability: {len(self.intervals)} node(s) follow {what}; offline mid-round loses "
                       "the round's work")
        return out

    @property
    def active(self) -> bool:
        return bool(self.events) or self.probability < 1 or bool(self.intervals) or bool(self.rates)

    # -- who takes part ----------------------------------------------------------------------
    def targets(self, index: int) -> list[str]:
        ev = self.events[index]
        pool = sorted({n for x in ev.nodes for n in self.members.get(x, [x])})
        if ev.count is not None:  # the same pick under every strategy
            pool = sorted(random.Random(f"{self.sc.seed}/fault/{index}").sample(pool, ev.count))
        return pool

    def online(self, rnd: int, elapsed: float) -> set[str]:
        """Nodes available in this round: each with probability p (seeded by round, the same for
        every strategy), and inside one of its trace intervals if the trace lists it."""
        ok = set(self.names)
        if self.probability < 1:
            draws = np.random.default_rng([self.sc.seed, rnd, 7]).random(len(self.names))
            ok = {n for n, u in zip(self.names, draws) if u < self.probability}
        return {n for n in ok if n not in self.intervals or self.intervals[n].online_at(elapsed)}

    # -- the clock ---------------------------------------------------------------------------
    def begin_strategy(self, strategy: str, agg, launcher) -> None:
        self.strategy, self.agg, self.launcher = strategy, agg, launcher
        self.queue = []
        for i, ev in enumerate(self.events):
            if ev.at_s is not None and self._applies(ev):
                for n in self.targets(i):
                    self._push(Due(ev.at_s, 0, i, n))
        self.vnow = 0.0
        self._start_clocks(0.0)

    def _start_clocks(self, t: float) -> None:
        """Put every traced link at its rates of time t, and queue each trace's next step and
        each node's next online or offline edge."""
        self.link_now = {}
        for n in self.rates:
            self._step_rate(n, t)
        for n, spans in self.intervals.items():
            nxt = spans.next_change(t)
            if nxt is not None:
                self._push(Due(nxt, 0, -1, n, kind="online"))

    def _applies(self, ev) -> bool:
        return ev.strategies is None or self.strategy in ev.strategies

    def _push(self, due: Due) -> None:
        self._seq += 1
        due.seq = self._seq
        heapq.heappush(self.queue, due)

    def now_s(self) -> float:
        """Emulated seconds since the strategy started (rounds only: evaluation is not device time)."""
        if self.virtual:
            return self.vnow
        return self.round_elapsed + (time.monotonic() - self._t0) / self.dilation

    def next_due(self) -> float | None:
        """When the next queued fault, trace step or availability edge is due (emulated seconds)."""
        return self.queue[0].at_s if self.queue else None

    def advance(self, t: float) -> None:
        """The virtual clock moves to t (never back), applying what falls due on the way."""
        self.vnow = max(self.vnow, t)
        self.tick()

    @property
    def busy(self) -> set[str]:
        """Nodes with work out now: on the virtual clock, those whose task has not arrived yet."""
        return self.vbusy if self.virtual else self.agg.busy

    def begin_round(self, rnd: int, elapsed: float) -> None:
        """Queue this round's events and apply what is due before its tasks go out."""
        self.round, self.round_elapsed, self._t0 = rnd, elapsed, time.monotonic()
        self.vnow = elapsed
        self.lost, self.gone = {}, set()
        for i, ev in enumerate(self.events):
            if ev.round == rnd and self._applies(ev):
                for n in self.targets(i):
                    self._push(Due(elapsed + ev.after_s, 0, i, n, round_event=True))
        self.tick()

    def tick(self) -> float | None:
        """Apply what is due; return the wall seconds until the next event (None: nothing queued),
        so the caller's poll wakes in time for it."""
        now = self.now_s()
        while self.queue and self.queue[0].at_s <= now + 1e-9:
            self._fire(heapq.heappop(self.queue), now)
        if not self.queue or self.virtual:  # virtual: nothing is due in wall time
            return None
        return max(0.0, (self.queue[0].at_s - self.now_s()) * self.dilation)

    def end_round(self) -> list[dict]:
        """Round events whose time fell after the round's end happen now, late (and say so)."""
        self.tick()
        late = [d for d in self.queue if d.round_event and not d.undo]
        self.queue = [d for d in self.queue if not (d.round_event and not d.undo)]
        heapq.heapify(self.queue)
        now = self.now_s()
        for d in sorted(late):
            self._fire(d, now, note=f"the round ended {d.at_s - now:.1f} s before its time: applied at the end")
        out, self.records = self.records, []
        return out

    def end_strategy(self) -> list[dict]:
        """Put the fleet back for the next strategy: resume, reconnect, restore profiles. Dead nodes
        are left to the runner, which restarts them."""
        self.queue = []
        for n in sorted(self.offline):
            self._resume_process(n)
        self.offline = set()
        for n in sorted(self.paused):
            self._do("resume", n, None, None)
        for n in sorted(self.cut):
            self._do("restore_link", n, None, None)
        for n in self.names:
            if self.current[n] != self.base[n] and n not in self.killed:
                self._do("profile", n, None, self.base[n])
        self.killed.clear()
        self.current = dict(self.base)
        out, self.records = self.records, []
        return out

    # -- applying ----------------------------------------------------------------------------
    def _fire(self, d: Due, now: float, note: str | None = None) -> None:
        if d.kind == "rate":
            return self._step_rate(d.node, d.at_s)
        if d.kind == "online":
            return self._edge(d.node, d.at_s)
        ev = self.events[d.index]
        action = ev.action
        prev = None
        if d.undo:
            action = {"pause": "resume", "cut_link": "restore_link"}.get(action, action)
        elif action in ("link", "profile"):
            prev = self.current[d.node]
        rec = self._do(action, d.node, ev, d.prev if d.undo else None, note=note, undo=d.undo, at_s=now)
        if rec["applied"] and ev.duration_s is not None and not d.undo:
            self._push(Due(now + ev.duration_s, 0, d.index, d.node, undo=True, prev=prev))

    def _do(self, action: str, node: str, ev, back: Profile | None, note: str | None = None,
            undo: bool = False, at_s: float | None = None) -> dict:
        rec = {"type": "fault", "action": action, "node": node, "round": self.round,
               "at_s": round(self.now_s() if at_s is None else at_s, 3), "applied": True}
        if ev is None:
            rec["why"] = "restored before the next strategy"
        elif undo:
            rec["why"] = f"end of duration_s {ev.duration_s:g}"
        try:
            rec["how"] = self._apply(action, node, ev, back)
        except FaultUnsupported as exc:
            rec["applied"], rec["how"] = False, str(exc)
        except Exception as exc:  # a fault that fails must not end the run; it is recorded
            log.exception("fault %s on %s failed", action, node)
            rec["applied"], rec["how"] = False, f"{type(exc).__name__}: {exc}"
        if note:
            rec["note"] = note
        if ev is not None:
            self.injected += rec["applied"]
            self.not_applied += not rec["applied"]
        self._record(rec)
        return rec

    def _apply(self, action: str, node: str, ev, back: Profile | None) -> str | None:
        b = self.backend
        if node in self.killed and action not in ("restart",):
            raise FaultUnsupported("the node is dead (killed earlier); restart it first")
        if action == "kill":
            b.kill(node)
            self.killed.add(node)
            self.paused.discard(node)
            self.lost[node] = "killed by a fault event"
        elif action == "restart":
            self.agg.forget(node)
            b.restart(self.launcher.launch(node, self.profile_now(node)))
            self.killed.discard(node)
            self.paused.discard(node)
            self.cut.discard(node)   # a fresh sandbox: its link is up and shaped by its profile
            self.lost[node] = "restarted by a fault event"
        elif action == "pause":
            self._pause_process(node)
            self.paused.add(node)
        elif action == "resume":
            if node in self.paused:
                if node not in self.offline:  # offline (availability) as well: it stays stopped
                    self._resume_process(node)
                self.paused.discard(node)
        elif action == "cut_link":
            b.cut_link(node)
            self.cut.add(node)
        elif action == "restore_link":
            if node in self.cut:
                b.restore_link(node)
                self.cut.discard(node)
        elif action == "link":
            new = back or self.current[node].with_overrides(
                **{k: getattr(ev, k) for k in ("uplink_mbit", "downlink_mbit", "latency_ms") if getattr(ev, k) is not None})
            b.reshape(self.launcher.launch(node, self._traced(node, new)))
            self.current[node] = new
            return f"up {new.uplink_mbit:g} Mbit/s, down {new.downlink_mbit:g} Mbit/s, latency {new.latency_ms:g} ms"
        elif action == "profile":
            return self._set(node, back or self._profile(ev.profile))
        return None

    def _pause_process(self, node: str) -> None:
        """Stop the node's process; on the virtual clock its task's time stands still instead
        (testbed/vclock.py), and the process is left alone."""
        if not self.virtual:
            self.backend.pause(node)

    def _resume_process(self, node: str) -> None:
        if not self.virtual:
            self.backend.resume(node)

    def _set(self, node: str, profile: Profile) -> str:
        how = self.backend.set_profile(self.launcher.launch(node, self._traced(node, profile)))
        if how.startswith("restarted"):
            self.agg.forget(node)
            self.paused.discard(node)
            self.cut.discard(node)
            self.lost[node] = "restarted by a profile change"
        self.current[node] = profile
        return f"{profile.name}: {how}"

    def _profile(self, name: str) -> Profile:
        if name in PROFILES:
            return PROFILES[name]
        return Profile(name=name, **self.sc.profiles[name].model_dump())

    # -- links and availability over time ------------------------------------------------------
    def _traced(self, node: str, profile: Profile) -> Profile:
        """`profile` with the node's link trace's rates of now (a trace wins over the profile's rates)."""
        if node not in self.link_now:
            return profile
        up, down = self.link_now[node]
        return profile.with_overrides(uplink_mbit=up, downlink_mbit=down)

    def profile_now(self, node: str) -> Profile:
        """What the node's sandbox emulates now: its current profile, with its trace's rates."""
        return self._traced(node, self.current[node])

    def _step_rate(self, node: str, t: float) -> None:
        """The node's link follows its trace to time t (kernel shaping at once; the process
        backend's transport follows the schedule its tasks carry), and its next step is queued."""
        rates = self.rates[node].at(t)
        if self.link_now.get(node) != rates:
            self.link_now[node] = rates
            self.rate_steps += 1
            if node not in self.killed:
                try:
                    self.backend.reshape(self.launcher.launch(node, self.profile_now(node)))
                except Exception as exc:  # recorded; the run goes on
                    self._record({"type": "link_trace", "node": node, "round": self.round, "at_s": round(t, 3),
                                  "applied": False, "how": f"{type(exc).__name__}: {exc}"})
        nxt = self.rates[node].next_change(t)
        if nxt is not None:
            self._push(Due(nxt, 0, -1, node, kind="rate"))

    def _edge(self, node: str, t: float) -> None:
        """The node comes online or goes offline at t. Offline with work out: the work is lost and
        the node is paused (a device that is off computes nothing) until it is online again."""
        spans = self.intervals[node]
        if spans.online_at(t):
            if node in self.offline and node not in self.paused and node not in self.killed:
                self._resume_process(node)
            self.offline.discard(node)
        elif node in self.busy and node not in self.killed:
            self.lost[node] = f"went offline at {t:.1f} s (faults.availability)"
            self.gone.add(node)
            self.dropped_offline += 1
            rec = {"type": "offline", "node": node, "round": self.round, "at_s": round(t, 3), "applied": True}
            try:
                self._pause_process(node)
                self.offline.add(node)
                rec["how"] = "its work is dropped; paused until it is online again"
            except FaultUnsupported as exc:
                rec["how"] = f"its work is dropped; not paused: {exc}"
            self._record(rec)
        nxt = spans.next_change(t)
        if nxt is not None:
            self._push(Due(nxt, 0, -1, node, kind="online"))

    def _record(self, rec: dict) -> None:
        self.records.append(rec)
        said = (rec["type"], rec["node"])
        if not rec["applied"] and (rec["type"] == "fault" or said not in self._said):  # a trace step: once
            self._said.add(said)
            self.say(f"{rec['type']} not applied: {rec.get('action', '')} {rec['node']}: {rec['how']}".replace("  ", " "))

    def transport_schedule(self, node: str, horizon_s: float) -> list[tuple[float, float, float]]:
        """The node's trace from now for `horizon_s` emulated seconds, as its transport replays it:
        (wall seconds from now, uplink, downlink Mbit/s) with the dilation applied."""
        now, f = self.now_s(), self.dilation
        return [((t - now) * f, up / f, down / f) for t, up, down in self.rates[node].schedule(now, now + horizon_s)]

    # -- what the round records say ------------------------------------------------------------
    def why_failed(self, node: str) -> str | None:
        """A fault that explains a node's missing result in the current round."""
        if node in self.lost:
            return self.lost[node]
        if node in self.paused:
            return "paused by a fault event"
        if node in self.cut:
            return "link cut by a fault event"
        return None

    # -- checkpoints -------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The faults in force and still due, as plain data (for the run's checkpoint)."""
        return {"queue": [{**asdict(d), "prev": d.prev and d.prev.as_dict()} for d in self.queue if d.kind == "event"],
                "seq": self._seq, "clock_s": self.now_s(),
                "current": {n: p.as_dict() for n, p in self.current.items()},
                "paused": sorted(self.paused), "cut": sorted(self.cut), "killed": sorted(self.killed),
                "injected": self.injected, "not_applied": self.not_applied}

    def restore(self, snap: dict, strategy: str, agg, launcher) -> list[dict]:
        """Resume a strategy: the fleet is fresh, so the faults in force at the checkpoint are
        applied again (the same nodes dead, paused, cut off or switched), and the queue goes on."""
        self.strategy, self.agg, self.launcher = strategy, agg, launcher
        self.queue = [replace(Due(**{**d, "prev": None}), prev=d["prev"] and Profile(**d["prev"]))
                      for d in snap["queue"]]
        self._seq = snap["seq"]
        heapq.heapify(self.queue)
        self.vnow = snap.get("clock_s", 0.0)
        self._start_clocks(self.vnow)  # traces and intervals: from the checkpoint's time
        self.injected, self.not_applied = snap["injected"], snap["not_applied"]
        for n, d in snap["current"].items():
            p = Profile(**d)
            if p != self.base[n]:
                self._do("profile", n, None, p)
        for n in snap["killed"]:
            self._do("kill", n, None, None)
        for n in snap["paused"]:
            self._do("pause", n, None, None)
        for n in snap["cut"]:
            self._do("cut_link", n, None, None)
        for r in self.records:
            r["why"] = "in force when the run was interrupted: applied again on resume"
        out, self.records = self.records, []
        return out
