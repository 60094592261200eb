"""The backend interface: how one node of a scenario becomes a running, limited sandbox.

A backend maps nodes one-to-one onto OS objects (a process, a namespace + cgroup, or a
container), starts the node program inside from its `Launch` (emulation/launch.py: arguments,
environment and the dilated limits, built once by the runner), and removes everything it made
in `teardown`, which must be safe to call twice and after a crash.
"""
from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path

from ..launch import EVERYTHING, RUN_ENV, Emulate, Launch  # noqa: F401  (RUN_ENV: re-exported for cleanup)
from ..profiles import Profile

THIS_HOST = "this host"  # the key of this machine in core_demands()


def log_message(msg: str) -> None:
    logging.getLogger("emulation").info("%s", msg)


class FaultUnsupported(RuntimeError):
    """This backend cannot inject that fault; the message says why (recorded, not fatal)."""


class Backend(ABC):
    name: str
    forks_nodes = False  # can fork nodes from a node zygote (prepare(zygote=True))
    cpu_limit = "weight"  # how a slower CPU is enforced where the backend has a choice (netns: quota or weight)

    def __init__(self, run_id: str, workdir: Path, caps: dict | None = None):
        if caps is None:
            from ..probe import probe
            caps = probe()
        self.run_id = run_id
        self.workdir = Path(workdir)
        self.caps = caps
        self.cores = int(caps.get("cores") or os.cpu_count() or 1)
        self.say = log_message  # the runner points this at its progress display

    def bind_address(self, requested: str) -> str:
        """Where the aggregator must listen so this backend's nodes reach it (default: as the scenario says)."""
        return requested

    def connect_address(self, bind: str) -> str:
        """The address nodes of this backend dial to reach an aggregator bound at `bind`."""
        return bind

    def attach(self, agg, requested: str) -> dict[str, str]:
        """Make the aggregator listen wherever this backend's nodes need it beyond its main
        address; {place: endpoint} of each such address (none for a single-host backend)."""
        return {}

    def engine_info(self) -> dict[str, dict]:
        """The docker engines on which this backend runs nodes, for the manifest (none here)."""
        return {}

    def on_this_host(self, name: str) -> bool:
        """Does this machine hold the node's CPU and memory (not another host's engine)?"""
        return True

    def cpu_demand(self, profile: Profile) -> float:
        """Host cores this node uses while training (a quota caps it at cpu_share)."""
        return min(float(profile.threads), profile.cpu_share)

    def core_demands(self, profiles: dict[str, Profile]) -> dict[str, tuple[int, list[float]]]:
        """Per host that runs these nodes (name -> profile): its cores and each node's CPU demand
        while training; the time dilation is sized from it."""
        return {THIS_HOST: (self.cores, [self.cpu_demand(p) for p in profiles.values()])}

    def fidelity(self, profiles: list[Profile], dilation: float) -> list[str]:
        """What this backend cannot honour for these profiles, said plainly for the manifest."""
        return []

    def prepare(self, spec: dict, data: dict, zygote: bool) -> None:
        """Before the first start: what all nodes share (the process-based backends start the node
        zygote here when `zygote` is set: emulation/zygote.py). `data`: the run's data source
        (node.data.DataSource.to_dict())."""

    def forks(self, name: str) -> bool:
        """Whether node `name` would fork from this backend's zygote (zygote: auto counts these)."""
        return self.forks_nodes

    def zygote_notes(self, profiles: list[Profile]) -> list[str]:
        """What forking from a zygote changes, for the manifest's fidelity notes."""
        return []

    def zygote_info(self) -> dict | None:
        """{pid, shared_mb} of the node zygote when nodes are forked from one, else None."""
        return None

    def emulated(self, name: str) -> Emulate:
        """What the node `name` emulates itself because its sandbox does not (Launch.emulated)."""
        return EVERYTHING

    @abstractmethod
    def start(self, launch: Launch) -> None:
        """Start the node `launch` describes, with its limits, dialling its endpoint."""

    @abstractmethod
    def alive(self, name: str) -> bool:
        """Is the node's program still running?"""

    def exit_reason(self, name: str) -> str | None:
        """Why a node that is no longer alive stopped (None while it runs)."""
        return None if self.alive(name) else "node process exited"

    def oom(self, name: str) -> dict | None:
        """{limit_mb, peak_mb} if the kernel killed the node for exceeding its memory limit."""
        return None

    def restart(self, launch: Launch) -> None:
        """Replace a node's sandbox with a fresh one (a dead device, or one still busy with old work)."""
        self.stop(launch.name)
        self.start(launch)

    # -- faults (scenario events); a backend that cannot do one raises FaultUnsupported -----
    def kill(self, name: str) -> None:
        """Kill the node at once (SIGKILL): a device that crashes or loses power."""
        raise FaultUnsupported(f"the {self.name} backend cannot kill a node")

    def pause(self, name: str) -> None:
        """Freeze the node (it keeps its connection and memory, runs nothing): a hung device."""
        raise FaultUnsupported(f"the {self.name} backend cannot pause a node")

    def resume(self, name: str) -> None:
        raise FaultUnsupported(f"the {self.name} backend cannot resume a node")

    def cut_link(self, name: str) -> None:
        """Take the node's link down: nothing passes either way until restore_link."""
        raise FaultUnsupported(f"the {self.name} backend emulates links inside the node's transport: "
                               "link faults need the netns or docker backend (as root)")

    def restore_link(self, name: str) -> None:
        raise FaultUnsupported(f"the {self.name} backend cannot restore a link")

    def reshape(self, launch: Launch) -> None:
        """Apply the link limits of `launch` (rates, latency) to the running node."""
        raise FaultUnsupported(f"the {self.name} backend emulates links inside the node's transport: "
                               "link faults need the netns or docker backend (as root)")

    def set_profile(self, launch: Launch) -> str:
        """Switch a running node to another device profile; returns how ("live" or "restarted")."""
        self.restart(launch)
        return f"restarted: the {self.name} backend cannot change a running node's limits"

    @abstractmethod
    def stop(self, name: str) -> None:
        """Stop one node (and remove what was made for it)."""

    def teardown(self) -> None:
        """Stop every node and remove everything this backend made; idempotent."""
        for name in list(self.nodes()):
            self.stop(name)

    @abstractmethod
    def nodes(self) -> list[str]:
        """Names of the nodes this backend started and has not stopped."""
