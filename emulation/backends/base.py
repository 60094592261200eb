"""The backend interface: how one node of a scenario becomes a running, limited sandbox.

A backend maps nodes one-to-one onto OS objects (a process; later a namespace + cgroup, or a
container), starts the node program inside, and removes everything it made in `teardown`,
which must be safe to call twice and after a crash.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

from ..profiles import Profile

RUN_ENV = "TESTBED_RUN"  # every process the testbed starts carries its run id here (for `clean`)


def log_message(msg: str) -> None:
    logging.getLogger("emulation").info("%s", msg)


class FaultUnsupported(RuntimeError):
    """This backend cannot inject that fault; the message says why (recorded, not fatal)."""


class Backend(ABC):
    name: str
    forks_nodes = False  # can fork nodes from a node zygote (prepare(zygote=True))

    def __init__(self, run_id: str, workdir: Path, caps: dict | None = None):
        if caps is None:
            from ..probe import probe
            caps = probe()
        self.run_id = run_id
        self.workdir = Path(workdir)
        self.caps = caps
        self.keys = None  # testbed.auth.RunKeys: each node gets its own CURVE key, as a real device does
        self.say = log_message  # the runner points this at its progress display

    def auth_args(self) -> list[str]:
        return self.keys.join_args() if self.keys is not None else []

    def auth_env(self, name: str) -> dict[str, str]:
        return self.keys.join_env(name) if self.keys is not None else {}

    def bind_address(self, requested: str) -> str:
        """Where the aggregator must listen so this backend's nodes reach it (default: as the scenario says)."""
        return requested

    def connect_address(self, bind: str) -> str:
        """The address nodes of this backend dial to reach an aggregator bound at `bind`."""
        return bind

    def cpu_demand(self, profile: Profile) -> float:
        """Host cores this node uses while training (a quota caps it at cpu_share)."""
        return min(float(profile.threads), profile.cpu_share)

    def fidelity(self, profiles: list[Profile], dilation: float) -> list[str]:
        """What this backend cannot honour for these profiles, said plainly for the manifest."""
        return []

    def prepare(self, spec: dict, dataset: str, zygote: bool) -> None:
        """Before the first start: what all nodes share (the process-based backends start the node
        zygote here when `zygote` is set: emulation/zygote.py)."""

    def zygote_notes(self, profiles: list[Profile]) -> list[str]:
        """What forking from a zygote changes, for the manifest's fidelity notes."""
        return []

    def zygote_info(self) -> dict | None:
        """{pid, shared_mb} of the node zygote when nodes are forked from one, else None."""
        return None

    @abstractmethod
    def start(self, name: str, profile: Profile, endpoint: str, dilation: float) -> None:
        """Start node `name` with its profile's limits, dialling `endpoint`."""

    @abstractmethod
    def alive(self, name: str) -> bool:
        """Is the node's program still running?"""

    def exit_reason(self, name: str) -> str | None:
        """Why a node that is no longer alive stopped (None while it runs)."""
        return None if self.alive(name) else "node process exited"

    def oom(self, name: str) -> dict | None:
        """{limit_mb, peak_mb} if the kernel killed the node for exceeding its memory limit."""
        return None

    def restart(self, name: str, profile: Profile, endpoint: str, dilation: float) -> None:
        """Replace a node's sandbox with a fresh one (a dead device, or one still busy with old work)."""
        self.stop(name)
        self.start(name, profile, endpoint, dilation)

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

    def reshape(self, name: str, profile: Profile, dilation: float) -> None:
        """Apply the link fields of `profile` (rates, latency) to the running node."""
        raise FaultUnsupported(f"the {self.name} backend emulates links inside the node's transport: "
                               "link faults need the netns or docker backend (as root)")

    def set_profile(self, name: str, profile: Profile, endpoint: str, dilation: float) -> str:
        """Switch a running node to another device profile; returns how ("live" or "restarted")."""
        self.restart(name, profile, endpoint, dilation)
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
