"""Before any node starts: what this host can do, which backend runs the nodes, the time
dilation, and what the host cannot honour. Made once per run and held in one frozen record.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from emulation.backends import BACKENDS, Backend, choose
from emulation.backends.base import THIS_HOST
from emulation.backends.docker import DockerBackend, Engine
from emulation.backends.fleet import Fleet
from emulation.probe import probe

from .scenario import NodeSpec, Scenario
from .store import RunError


@dataclass(frozen=True)
class RunSetup:
    caps: dict                    # the probed capabilities of this host (emulation.probe)
    backend: str                  # the backend that runs the emulated nodes
    backend_reason: str
    dilation: float               # every CPU share and link rate divided by it, every time measured / it
    fidelity: tuple[str, ...]     # what this host cannot honour, said before any node starts
    here: frozenset[str]          # nodes whose CPU and memory this host holds
    clock: str = "real"           # real | virtual (testbed/vclock.py)

    @property
    def virtual(self) -> bool:
        return self.clock == "virtual"


VIRTUAL_NOTES = (
    "clock: virtual: each node's compute time is the CPU seconds of its training / its profile's cores, "
    "measured at host speed with no quota and no dilation",
    "clock: virtual: link times are the profile's latency + the bytes sent at its rate (its trace's where it "
    "has one); no TCP/IP header overhead (tc-shaped links deliver about 0.956 of the rate)",
    "clock: virtual: memory limits are not enforced, only measured (peak RSS per node)",
)


def auto_dilation(demands: list[float], per_round: int, cores: int) -> float:
    """Slow everything down by one factor when the concurrently training nodes need more CPU
    than the host has; otherwise host contention, not the devices, would set the times."""
    return max(1.0, sum(sorted(demands, reverse=True)[:per_round]) / max(1, cores))


def prepare(sc: Scenario, nodes: list[NodeSpec], requested: str, run_id: str, out: Path) -> tuple[RunSetup, Backend]:
    """Probe the host, make the backend (nothing started yet), size the dilation."""
    caps = probe()
    if sc.clock == "virtual":
        return _prepare_virtual(sc, nodes, requested, run_id, out, caps)
    name, reason = choose(requested, caps)
    if sc.release_waits and name == "docker":  # before any backend is made: nothing to tear down
        raise RunError(f"release_waits: the docker backend ({reason}) cannot give its nodes the run's release "
                       "file; use --backend netns or process, or remove release_waits")
    backend = make_backend(sc, nodes, name, run_id, out, caps)
    local = {n.name: n.profile for n in nodes if not n.remote}
    hosts = backend.core_demands(local)
    per_round = sc.training.clients_per_round or len(nodes)
    if sc.dilation == "off":
        dilation = 1.0
    elif sc.dilation == "auto":  # the host that is shortest of cores sets the one factor for all
        dilation = max(auto_dilation(d, per_round, cores) for cores, d in hosts.values())
    else:
        dilation = float(sc.dilation)
    here = frozenset(n for n in local if backend.on_this_host(n))
    notes = backend.fidelity([p for n, p in local.items() if n in here], dilation)
    demand = sum(sorted(hosts.get(THIS_HOST, (0, []))[1], reverse=True)[:per_round])
    if demand > caps["cores"] * dilation * 1.001:
        notes.append(f"{per_round} concurrent nodes need {demand:g} cores on {caps['cores']} "
                     f"with dilation {dilation:g}: compute times include host contention (set dilation: auto)")
    if dilation > 1 and len(local) < len(nodes):
        notes.append("remote (real) devices run at real speed: their times are divided by the "
                     f"dilation {dilation:g} like the emulated ones; use dilation: off to compare them")
    if sc.cpu_limit == "weight" and "cpu_limit" in sc.model_fields_set and name != "netns":
        notes.append(f"cpu_limit: weight applies to the netns backend; the {name} backend keeps its own CPU emulation")
    if name == "process" and any(e.action in ("cut_link", "restore_link") for e in sc.faults.events):
        notes.append("process backend: links live in the node's transport, so the scenario's link "
                     "cuts are recorded as not applied (use the netns or docker backend); rate and "
                     "latency changes reach the node with its next task")
    notes += release_notes(sc, dilation, len(local) < len(nodes))
    return RunSetup(caps, name, reason, dilation, tuple(notes), here), backend


def release_notes(sc: Scenario, dilation: float, remote: bool) -> list[str]:
    """What `release_waits` will not release in this run (testbed/release.py)."""
    if not sc.release_waits:
        return []
    if dilation <= 1:
        return [f"release_waits: the dilation is {dilation:g}, so there is no slowed wait to release"]
    from .strategies import STRATEGIES
    notes = [f"release_waits: {e.name} is asynchronous (no rounds to release): its waits stay dilated"
             for e in sc.strategies.run if getattr(STRATEGIES[e.type], "asynchronous", False)]
    if remote:
        notes.append("release_waits: rounds with a remote (real) device are not released (it cannot read the "
                     "run's release file)")
    avail = sc.faults.availability
    if sc.faults.events or any(g.link_trace for g in sc.nodes) or avail.trace or avail.markov:
        notes.append("release_waits: a round in which a fault, link trace step or availability change falls due "
                     "is not released (they are timed in real time)")
    return notes


def _prepare_virtual(sc: Scenario, nodes: list[NodeSpec], requested: str, run_id: str, out: Path,
                     caps: dict) -> tuple[RunSetup, Backend]:
    """The virtual clock: plain processes at host speed, no dilation; nothing to enforce."""
    if requested not in ("auto", "process"):
        raise RunError(f"--backend {requested}: clock: virtual runs on the process backend (nodes are not slowed, "
                       "so no sandbox limits their CPU or links); allowed: auto, process")
    backend = make_backend(sc, nodes, "process", run_id, out, caps)
    here = frozenset(n.name for n in nodes if not n.remote)
    return RunSetup(caps, "process", "clock: virtual: nodes train at host speed and report their CPU seconds",
                    1.0, VIRTUAL_NOTES, here, "virtual"), backend


def make_backend(sc: Scenario, nodes: list[NodeSpec], name: str, run_id: str, out: Path, caps: dict) -> Backend:
    """The scenario's backend on this host; with `engines:`, a Fleet of it and one docker backend
    per engine the nodes use. An unreachable engine stops the run before any node starts."""
    main = BACKENDS[name](run_id, out, caps)
    main.cpu_limit = sc.cpu_limit
    used = sorted({n.engine for n in nodes if n.engine})
    if not used:
        return main
    engines = {}
    try:
        for engine in used:
            spec = sc.engines[engine]
            engines[engine] = DockerBackend(run_id, out, caps,
                                            Engine(engine, spec.url, bool(spec.same_host), spec.connect, spec.tls))
    except Exception as exc:
        for b in [*engines.values(), main]:
            b.teardown()
        raise RunError(str(exc)) from exc
    return Fleet(main, engines, {n.name: n.engine for n in nodes if not n.remote},
                 {n.name: n.profile for n in nodes})
