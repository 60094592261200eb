"""The round loop: every round of one strategy, from sampling to the row in rounds.jsonl.

A round: faults due, sample the online idle nodes (the same nodes in round r for every
strategy), the strategy configures a task per node, the aggregator runs the round, results
are checked, the strategy aggregates and returns its metrics, the global model is evaluated,
the round is checkpointed and then written.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from emulation.backends import Backend
from emulation.launch import Launcher
from node import protocol as P
from node.plan import Plan

from .aggregator import (MISSED, PAYLOAD_PARTS, Aggregator, NodeRecord, RoundOutcome,  # noqa: F401
                         add_payload, check_result)
from .faults import Injector
from .hostwatch import HostWatch
from .progress import Progress
from .release import ReleaseFile
from .scenario import NodeSpec, Scenario
from .setup import RunSetup
from .spill import Spill, tensor_sizes
from .store import Checkpoint, RunStore
from .strategies import STRATEGIES, NodeInfo, Strategy, Task, Update
from .strategies.base import update_counts
from .vclock import VirtualRound, real_timeout_s
from .workload import Workload


def resolved_params(sc: Scenario, ctx) -> dict[str, dict]:
    """Every strategy's parameters as this version resolves them (defaults filled in): a
    checkpoint keeps them, so a resume by a version that resolves them otherwise is refused."""
    return {e.name: STRATEGIES[e.type].Params.model_validate(e.params, context=ctx).model_dump(mode="json")
            for e in sc.strategies.run}


def payload(tasks: dict[str, Task], outcome: RoundOutcome) -> dict[str, int]:
    """The tensor bytes of the round, split into the task head (and anything else outside the
    blocks) and the blocks (LoRA adapters or whole blocks): sent with the tasks, and in the
    results accepted (protocol headers not included)."""
    out = dict.fromkeys(PAYLOAD_PARTS, 0)
    parts = [("down", t.tensors) for t in tasks.values()] + [("up", m.tensors) for m in outcome.results.values()]
    for way, tensors in parts:
        add_payload(out, tensors, way)
    return out


@dataclass
class Position:
    """Where a strategy stands: its global model, emulated time used, the next round."""
    state: dict
    elapsed: float
    next_round: int


class RoundLoop:
    """Runs the strategies' rounds on a started fleet; one per run."""

    def __init__(self, sc: Scenario, nodes: list[NodeSpec], setup: RunSetup, workload: Workload, store: RunStore,
                 agg: Aggregator, backend: Backend, injector: Injector, launcher: Launcher, progress: Progress,
                 host: HostWatch):
        self.sc, self.nodes, self.setup, self.work, self.store = sc, nodes, setup, workload, store
        self.agg, self.backend, self.inj, self.launcher, self.progress = agg, backend, injector, launcher, progress
        self.host = host
        self.remote = {n.name for n in nodes if n.remote}
        self.stopped: dict[str, str] = {}   # strategy -> why it ran fewer rounds than the scenario asks
        self.restarts: list[dict] = []      # devices replaced between strategies, and why
        self.fault_restores: list[dict] = []
        self.spill = Spill(store.out / "spill")  # a round's results, when they would not fit in memory
        self.spill.clear()                         # left by a run that was killed (--resume)
        self.release = ReleaseFile(store.out / "release", setup.dilation) \
            if sc.release_waits and not setup.virtual and setup.dilation > 1 else None
        if self.release is not None:
            self.release.clear()

    def alive(self, name: str) -> bool:
        """Emulated nodes: their sandbox runs. Remote (real) devices: judged by the round deadline."""
        return name in self.remote or self.backend.alive(name)

    # -- one strategy ----------------------------------------------------------------------
    def run_strategy(self, index: int, entry, ctx, go_on: Checkpoint | None = None) -> None:
        """All rounds of one strategy; `go_on` is the checkpoint of an interrupted run to continue."""
        self.ctx = ctx
        strat = STRATEGIES[entry.type](entry.params, ctx)
        gplan = strat.global_plan()
        self.progress.start_strategy(entry.name, self.sc.training.rounds)
        if getattr(strat, "asynchronous", False):  # no round barrier: testbed/asyncloop.py
            return self._run_async(index, entry, strat, gplan, go_on)
        if go_on is None:
            pos, restored = self._round_zero(entry, gplan), []
        else:
            strat.load_state_dict(go_on.strategy_state)
            pos = Position(go_on.state, go_on.elapsed, go_on.round + 1)
            for row in self.store.rows:
                if row["strategy"] == entry.name:
                    self.progress.round_done(row)
            restored = self.inj.restore(go_on.faults, entry.name, self.agg, self.launcher)
        budget, last = self.sc.training.time_budget_s, pos.next_round - 1
        for rnd in range(pos.next_round, self.sc.training.rounds + 1):
            if budget is not None and pos.elapsed >= budget:
                self.stopped[entry.name] = (f"time budget {budget:g} s of emulated time used after round {rnd - 1} "
                                            f"of {self.sc.training.rounds} ({pos.elapsed:.1f} s)")
                self.progress.message(f"{entry.name}: {self.stopped[entry.name]}")
                break
            row = self._round(rnd, entry, strat, gplan, pos, restored)
            restored = []
            self._checkpoint(index, entry.name, rnd, pos, strat, row, done=False)
            self.store.append_row(row)
            self.progress.round_done(row)
            self._say_faults(entry.name, rnd, row["events"])
            last = rnd
        self.fault_restores += [{**r, "after": entry.name} for r in self.inj.end_strategy()]
        if self.store.rows and self.store.rows[-1]["strategy"] == entry.name:
            self._checkpoint(index, entry.name, last, pos, strat, self.store.rows[-1], done=True)

    def _run_async(self, index: int, entry, strat: Strategy, gplan: Plan, go_on: Checkpoint | None) -> None:
        """An asynchronous strategy: round 0 checkpointed, its steps saved as they happen (a
        resume goes on from the last), written when it ends, then checkpointed as done."""
        from .asyncloop import AsyncRun
        from .vasync import VirtualAsyncRun
        if go_on is None:
            pos = self._round_zero(entry, gplan)
            self._checkpoint(index, entry.name, 0, pos, strat, self.store.rows[-1], done=False)
        else:
            pos = Position(go_on.state, go_on.elapsed, 1)
        (VirtualAsyncRun if self.setup.virtual else AsyncRun)(self, index, entry, strat, gplan, pos, go_on).run()
        self.fault_restores += [{**r, "after": entry.name} for r in self.inj.end_strategy()]
        last = self.store.rows[-1]
        self._checkpoint(index, entry.name, last["round"], pos, strat, last, done=True)
        self.store.drop_async_steps(index, entry.name)

    def _round_zero(self, entry, gplan: Plan) -> Position:
        state = self.work.initial_state(gplan)
        ev, eval_s = self.work.evaluate(gplan, state)
        row = {"strategy": entry.name, "round": 0, "wall_s": 0.0, "elapsed_s": 0.0, **ev, "bytes_up": 0,
               "bytes_down": 0, "participants": 0, "dropped": 0, "failed": False, "eval_s": eval_s, "nodes": []}
        self.store.append_row(row)
        self.progress.round_done(row)
        self.inj.begin_strategy(entry.name, self.agg, self.launcher)
        return Position(state, 0.0, 1)

    def _checkpoint(self, index: int, name: str, rnd: int, pos: Position, strat: Strategy, row: dict,
                    done: bool) -> None:
        self.store.save_checkpoint(Checkpoint(
            scenario=self.sc.model_dump(mode="json"), run_id=self.launcher.run_id, strategy_index=index,
            strategy=name, round=rnd, elapsed=pos.elapsed, done=done, state=pos.state,
            strategy_state=strat.state_dict(), row=row, stopped=dict(self.stopped), restarts=list(self.restarts),
            faults=self.inj.snapshot(), strategy_params=resolved_params(self.sc, self.ctx)))

    # -- one round -------------------------------------------------------------------------
    def _sample(self, rnd: int, elapsed: float) -> tuple[list[str], list[str], set[str]]:
        """(ready nodes, sampled nodes, online nodes): the same nodes in round r for every strategy."""
        self.agg.poll(0)                     # registrations that arrived between rounds
        online = self.inj.online(rnd, elapsed)
        ready = sorted(n for n in self.agg.ready() if self.alive(n) and n not in self.agg.busy)
        pool = [n for n in ready if n in online]
        k = min(self.sc.training.clients_per_round or len(self.nodes), len(pool))
        rng = np.random.default_rng([self.sc.seed, rnd])
        return ready, sorted(rng.choice(pool, size=k, replace=False).tolist()) if k else [], online

    def _round(self, rnd: int, entry, strat: Strategy, gplan: Plan, pos: Position, restored: list[dict]) -> dict:
        f, inj = self.setup.dilation, self.inj
        inj.begin_round(rnd, pos.elapsed)   # faults due before the round's tasks go out
        ready, sampled, online = self._sample(rnd, pos.elapsed)
        tasks = strat.configure(rnd, [NodeInfo(n, inj.current[n], len(self.work.shards[n])) for n in sampled],
                                pos.state)
        host, kills0 = self.host.before(entry.name, rnd, {n: t.plan for n, t in tasks.items()},
                                        self._parallel() if self.setup.virtual else None)
        links = {n: inj.link_now[n] for n in tasks if n in inj.link_now}  # traced links' rates at the start
        t_round, cpu0, m_round = time.perf_counter(), time.process_time(), time.monotonic()
        outcome, devices_s, keep = self._collect(rnd, entry.name, tasks, pos.elapsed)
        m_collected, saved_real_s = time.monotonic(), None
        if outcome.released_at is not None:  # the devices' time as the round would have taken it unreleased
            devices_s = outcome.started_at - m_round + self._released_devices(outcome)
            saved_real_s = max(0.0, devices_s - (m_collected - m_round))
        events = [*restored, *inj.end_round(), *self._explain_losses(rnd, outcome)]
        self.host.after(rnd, host, kills0, outcome.records, events, self.backend.alive)
        nodes = {n: self._node_entry(n, tasks[n], outcome, links.get(n)) for n in outcome.records}
        # strategies learn from what happened (LEGEND estimates speed and bandwidth from it)
        updates = [Update(n, tasks[n].plan, m.tensors, int(m.meta["samples"]), {**m.meta, **nodes[n]})
                   for n, m in sorted(outcome.results.items())]  # arrival order must not change sums
        failed = len(updates) < self.sc.training.min_results
        metrics, t_agg = {}, time.perf_counter()
        if not failed:
            pos.state, metrics = strat.aggregate(rnd, updates, pos.state)
        self.spill.clear()
        real_s = time.perf_counter() - t_round
        if self.setup.virtual:  # the devices' time on the virtual clock, then the server's aggregation as it took
            wall_s = devices_s + time.perf_counter() - t_agg
        elif outcome.released_at is not None:  # the devices' unreleased real time, then the rest as it took
            wall_s = (devices_s + time.monotonic() - m_collected) / f
        else:
            wall_s = real_s / f
        aggregator_cpu_s = time.process_time() - cpu0  # the orchestrator's own work in the round, host seconds
        pos.elapsed += wall_s
        if self.setup.virtual:
            self._await_restarted()
        ev, eval_s = self.work.evaluate(gplan, pos.state)
        for d in nodes.values():
            if d["status"] == "ok":
                d["wait_s"] = max(0.0, wall_s - d["compute_s"] - d["upload_s"] - d["download_s"])
        return {"strategy": entry.name, "round": rnd, "wall_s": wall_s, "real_s": real_s, "elapsed_s": pos.elapsed, **ev,
                "bytes_up": sum(r.bytes_up for r in outcome.records.values()),
                "bytes_down": sum(r.bytes_down for r in outcome.records.values()),
                "payload": (moved := payload(tasks, outcome)),
                "spilled_mb": (moved["blocks_up"] + moved["head_up"]) / 1e6 if keep else 0.0,
                "participants": len(updates), "dropped": len(outcome.records) - len(updates), "failed": failed,
                "eval_s": eval_s, "aggregator_cpu_s": aggregator_cpu_s, "update_counts": update_counts(updates),
                "released_at_s": None if outcome.released_at is None
                else (outcome.released_at - outcome.started_at) / f, "release_saved_real_s": saved_real_s,
                "metrics": metrics, "events": events,
                "offline": sorted(set(ready) - online), "host": host, "nodes": list(nodes.values())}

    def _collect(self, rnd: int, tag: str, tasks: dict[str, Task], elapsed: float) -> tuple[RoundOutcome, float, bool]:
        """Send the tasks and collect the results: (outcome, the devices' time on the virtual
        clock or 0 on the real one, whether the results were spilled). On the real clock the
        deadline and faults act while the round runs; on the virtual clock they are applied to
        the arrivals afterwards (testbed/vclock.py)."""
        deadline, virtual, inj = self.sc.training.round_deadline_s, self.setup.virtual, self.inj
        keep = self._keep(tasks)
        outcome = self.agg.run_round(rnd, tag, {n: (t.plan.to_dict(), t.tensors) for n, t in tasks.items()},
                                     self._real_timeout(tasks) if virtual else deadline * self.setup.dilation,
                                     lambda n: self.alive(n) and (virtual or n not in inj.lost),
                                     lambda n, sent, msg: check_result(sent, msg), tick=None if virtual else inj.tick,
                                     devices=self._devices(tasks), parallel=self._parallel() if virtual else None,
                                     keep=keep, release=self._release(tasks, elapsed))
        devices_s = VirtualRound(inj, elapsed, deadline).settle(outcome) if virtual else 0.0
        return outcome, devices_s, keep is not None

    def _release(self, tasks: dict[str, Task], elapsed: float) -> ReleaseFile | None:
        """The release file, where this round may be released (`release_waits`): every node runs
        on this host (a real device does not read the file), and no fault, trace step or
        availability edge falls due within the round's deadline (they are timed in real time,
        which a released round no longer keeps in step with the emulated one)."""
        if self.release is None or any(n in self.remote for n in tasks):
            return None
        due = self.inj.next_due()
        if due is not None and due <= elapsed + self.sc.training.round_deadline_s:
            return None
        return self.release

    def _released_devices(self, outcome: RoundOutcome) -> float:
        """A released round's device phase in real seconds as it would have lasted unreleased:
        each node left the round the seconds its release saved later. A result that then falls
        after the deadline is dropped, as the unreleased round would have dropped it."""
        deadline = self.sc.training.round_deadline_s * self.setup.dilation
        ends = {n: t - outcome.started_at + outcome.released_s.get(n, 0.0) for n, t in outcome.done_at.items()}
        late = sorted(n for n, end in ends.items() if end > deadline and n in outcome.answered)
        for n in late:
            rec = outcome.records[n]
            outcome.records[n] = NodeRecord(n, rec.profile, bytes_down=rec.bytes_down, reason=MISSED)
            outcome.results.pop(n, None)
            outcome.answered.discard(n)
        if late or any(r.reason == MISSED for r in outcome.records.values()):  # someone was out at the deadline
            return deadline
        return max(ends.values(), default=0.0)

    def _keep(self, tasks: dict[str, Task]):
        """Where the round's accepted results go: to files (testbed/spill.py) when they would add
        up to more than `aggregator.hold_mb` (a result carries the tensors its task sent)."""
        sent = sum(sum(tensor_sizes(t.tensors).values()) for t in tasks.values())
        return self.spill.keep if sent > self.sc.aggregator.hold_mb * 1e6 else None

    def _parallel(self) -> int:
        """Virtual clock: nodes training at once (fewer trainers in memory, less contention in
        the CPU seconds they measure)."""
        return self.sc.virtual_parallel or self.setup.caps.get("cores") or 1

    def _real_timeout(self, tasks) -> float:
        """Virtual clock: how long to wait in real time for the round's results."""
        shares = [self.inj.profile_now(n).cpu_share for n in tasks]
        cores = min(self.setup.caps.get("cores") or 1, self._parallel())
        return real_timeout_s(self.sc.training.round_deadline_s, shares, cores)

    def registering(self) -> set[str]:
        """Emulated nodes that run but have not registered (restarted ones)."""
        return {n.name for n in self.nodes if n.name not in self.remote and self.backend.alive(n.name)
                and n.name not in self.agg.ready()}

    def _await_restarted(self) -> None:
        """Virtual clock: a node restarted in the round registers before the next one, as it
        would have within the round's real time."""
        names = self.registering()
        if names:
            self.agg.wait_ready(names, self.sc.aggregator.register_timeout_s, self.alive)

    def _devices(self, nodes) -> dict[str, dict]:
        """What each emulated node emulates itself of its current profile (faults may have changed
        it), with the steps of its link trace where its transport shapes the link."""
        out = {}
        for n in (n for n in nodes if n not in self.remote):
            emulate = self.backend.emulated(n)
            dev = self.launcher.launch(n, self.inj.profile_now(n)).emulated(emulate)
            if n in self.inj.rates and (emulate.uplink or emulate.downlink) and not self.setup.virtual:
                steps = self.inj.transport_schedule(n, self.sc.training.round_deadline_s)
                dev = replace(dev, rate_steps=tuple((s, u if emulate.uplink else 0.0, d if emulate.downlink else 0.0)
                                                    for s, u, d in steps))
            out[n] = dev.to_dict()
        return out

    def _explain_losses(self, rnd: int, outcome: RoundOutcome) -> list[dict]:
        """Why a node's result is missing: a fault, or the end of its sandbox (an OOM kill is an event)."""
        events = []
        for n, rec in outcome.records.items():
            why = self.inj.why_failed(n) if rec.status != "ok" else None
            if n in self.inj.gone and rec.status != "ok":  # offline mid-round: its work never came back
                rec.status, rec.reason = "dropped", why
            elif why:
                rec.reason = f"{why} ({rec.reason})" if rec.reason else why
            elif rec.status != "ok" and n not in self.remote and not self.backend.alive(n):
                rec.reason = self.backend.exit_reason(n) or rec.reason
                oom = self.backend.oom(n)
                if oom:
                    events.append({"type": "oom", "round": rnd, "node": n, **oom})
        return events

    def _node_entry(self, n: str, task: Task, outcome: RoundOutcome, link: tuple[float, float] | None) -> dict:
        """A node's part in the round, in emulated seconds, with what it was asked to train."""
        return self.node_entry(n, outcome.records[n], task, outcome.results[n].meta if n in outcome.results else {},
                               link)

    def node_entry(self, n: str, record, task: Task, meta: dict, link: tuple[float, float] | None) -> dict:
        """One task's record as rounds.jsonl keeps it (the asynchronous loop's too)."""
        d = asdict(record)
        d["profile"] = self.inj.current[n].name  # a profile fault may have switched it
        if link is not None:  # its link trace's rates when the task went out
            d["link_mbit"] = {"up": link[0], "down": link[1]}
        d["plan"] = {**task.plan.record(), **task.choices}
        share, loss = meta.get("tail_share"), meta.get("loss")
        if isinstance(share, float) and np.isfinite(share):  # HetLoRA self-pruning: the device's measure
            d["tail_share"] = share
        if isinstance(loss, float) and np.isfinite(loss):  # its local training loss: drift shows here
            d["train_loss"] = loss
        for key in ("compute_s", "upload_s", "download_s", "host_short_s"):
            d[key] = d[key] / self.setup.dilation  # emulated seconds, as everything the strategy and results see
        return d

    def _say_faults(self, strategy: str, rnd: int, events: list[dict]) -> None:
        for e in events:
            if e.get("type") == "fault" and e.get("applied"):
                self.progress.message(f"{strategy} round {rnd}: fault {e['action']} {e['node']}"
                                      + (f" ({e['how']})" if e.get("how") else ""))

    # -- between strategies ----------------------------------------------------------------
    def fresh_devices(self, strategy: str) -> None:
        """Every strategy starts from the same fleet: an emulated device that died under the previous
        strategy (out of memory, crashed) or is still busy with a task its round gave up on is
        replaced by a fresh one. Otherwise strategy order would decide who takes part."""
        why = {}
        for n in self.nodes:
            if n.remote:
                continue
            if not self.backend.alive(n.name):
                why[n.name] = self.backend.exit_reason(n.name) or "not running"
            elif n.name in self.agg.busy:
                why[n.name] = "still busy with a task of the previous strategy"
        if not why:
            return
        profiles = {n.name: n.profile for n in self.nodes}
        self.progress.message(f"before {strategy}: restarting {len(why)} device(s): "
                              + "; ".join(f"{k} ({v})" for k, v in list(why.items())[:8]))
        for name in why:
            self.agg.forget(name)
            self.backend.restart(self.launcher.launch(name, profiles[name]))
        ready = self.agg.wait_ready(set(why), self.sc.aggregator.register_timeout_s, self.alive)
        self.restarts.append({"before": strategy, "nodes": why, "not_ready": sorted(set(why) - ready)})
        if ready != set(why):
            self.progress.message(f"before {strategy}: {len(why) - len(ready)} restarted device(s) did not "
                                  f"register and sit this strategy out: {', '.join(sorted(set(why) - ready))}",
                                  style="yellow")
