"""Several backends in one run: the scenario's own backend on this host, plus one docker backend
per extra engine (scenario `engines:`) for the node groups placed there.

The runner sees one Backend. Each call goes to the backend that owns the node; an engine's nodes
dial the aggregator where that engine can reach it (`attach` makes the aggregator listen there).
"""
from __future__ import annotations

from ..launch import Emulate, Launch
from ..profiles import Profile
from .base import Backend


class Fleet(Backend):
    def __init__(self, main: Backend, engines: dict[str, Backend], placement: dict[str, str | None],
                 profiles: dict[str, Profile]):
        """placement: node -> engine name (None: the main backend); profiles: node -> its profile."""
        self.main, self.engines, self.placement, self.profiles = main, engines, placement, profiles
        self.endpoints: dict[str, str] = {}  # engine -> the endpoint its nodes dial
        super().__init__(main.run_id, main.workdir, main.caps)
        self.name = main.name
        self.forks_nodes = main.forks_nodes

    @property
    def members(self) -> list[Backend]:
        return [self.main, *self.engines.values()]

    # the message hook reaches every member backend
    @property
    def say(self):
        return self.main.say

    @say.setter
    def say(self, fn) -> None:
        for b in self.members:
            b.say = fn

    def owner(self, name: str) -> Backend:
        """The backend that runs node `name`."""
        engine = self.placement.get(name)
        return self.engines[engine] if engine else self.main

    def _dialling(self, launch: Launch) -> Launch:
        """The launch as its owner runs it: an engine's nodes dial the aggregator where they reach it."""
        engine = self.placement.get(launch.name)
        return launch.dialling(self.endpoints[engine]) if engine else launch

    def _names(self, engine: str | None) -> list[str]:
        return [n for n, e in self.placement.items() if e == engine]

    # -- the aggregator's addresses ----------------------------------------------------------
    def bind_address(self, requested: str) -> str:
        return self.main.bind_address(requested)

    def connect_address(self, bind: str) -> str:
        return self.main.connect_address(bind)

    def attach(self, agg, requested: str) -> dict[str, str]:
        """Make the aggregator listen where each engine's containers can reach it; {engine: endpoint}."""
        import zmq
        bound = {agg.bind: agg.port}
        for name, b in self.engines.items():
            addr = b.bind_address(requested)
            if addr not in bound:
                try:  # the same port everywhere when it is free: one firewall rule on a real network
                    ep = agg.listen_also(addr, agg.port)
                except zmq.ZMQError:
                    ep = agg.listen_also(addr)
                bound[addr] = int(ep.rsplit(":", 1)[1])
            self.endpoints[name] = f"tcp://{b.connect_address(addr)}:{bound[addr]}"
        return dict(self.endpoints)

    def engine_info(self) -> dict[str, dict]:
        return {name: {**getattr(b, "engine_facts", {}), "nodes": self._names(name),
                       "endpoint": self.endpoints.get(name)} for name, b in self.engines.items()}

    # -- what the runner asks of a backend ---------------------------------------------------
    def on_this_host(self, name: str) -> bool:
        return self.owner(name).on_this_host(name)

    def core_demands(self, profiles: dict[str, Profile]) -> dict[str, tuple[int, list[float]]]:
        """Each member's demands for the nodes it runs, merged per host (engines on this machine
        share its cores with the main backend)."""
        out: dict[str, tuple[int, list[float]]] = {}
        for engine, b in [(None, self.main), *self.engines.items()]:
            mine = {n: profiles[n] for n in self._names(engine) if n in profiles}
            for host, (cores, demands) in b.core_demands(mine).items():
                out.setdefault(host, (cores, []))[1].extend(demands)
        return out

    def fidelity(self, profiles: list[Profile], dilation: float) -> list[str]:
        """Each member's notes for the nodes it runs (the fleet knows its nodes' profiles)."""
        notes = []
        for engine, b in [(None, self.main), *self.engines.items()]:
            mine = [self.profiles[n] for n in self._names(engine)]
            if mine or engine is None:
                notes += b.fidelity(mine, dilation)
        return notes

    def prepare(self, spec: dict, data: dict, zygote: bool) -> None:
        self.main.prepare(spec, data, zygote and bool(self._names(None)))
        for b in self.engines.values():
            b.prepare(spec, data, False)

    def forks(self, name: str) -> bool:
        """Only the main backend forks; an engine's nodes are containers."""
        return self.owner(name) is self.main and self.main.forks(name)

    def zygote_notes(self, profiles: list[Profile]) -> list[str]:
        return self.main.zygote_notes([self.profiles[n] for n in self._names(None)])

    def zygote_info(self) -> dict | None:
        return self.main.zygote_info()

    def start(self, launch: Launch) -> None:
        self.owner(launch.name).start(self._dialling(launch))

    def restart(self, launch: Launch) -> None:
        self.owner(launch.name).restart(self._dialling(launch))

    def set_profile(self, launch: Launch) -> str:
        return self.owner(launch.name).set_profile(self._dialling(launch))

    def alive(self, name: str) -> bool:
        return self.owner(name).alive(name)

    def emulated(self, name: str) -> Emulate:
        return self.owner(name).emulated(name)

    def exit_reason(self, name: str) -> str | None:
        return self.owner(name).exit_reason(name)

    def oom(self, name: str) -> dict | None:
        return self.owner(name).oom(name)

    def kill(self, name: str) -> None:
        self.owner(name).kill(name)

    def pause(self, name: str) -> None:
        self.owner(name).pause(name)

    def resume(self, name: str) -> None:
        self.owner(name).resume(name)

    def cut_link(self, name: str) -> None:
        self.owner(name).cut_link(name)

    def restore_link(self, name: str) -> None:
        self.owner(name).restore_link(name)

    def reshape(self, launch: Launch) -> None:
        self.owner(launch.name).reshape(launch)

    def stop(self, name: str) -> None:
        self.owner(name).stop(name)

    def nodes(self) -> list[str]:
        return [n for b in self.members for n in b.nodes()]

    def teardown(self) -> None:
        """Every member, even when one fails (an unreachable engine must not keep this host's sandboxes)."""
        first = None
        for b in [*self.engines.values(), self.main]:
            try:
                b.teardown()
            except Exception as exc:  # noqa: BLE001 - re-raised after the others are down
                first = first or exc
        if first is not None:
            raise first
