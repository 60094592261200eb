"""The `netns` backend: each node in its own network namespace and cgroup (needs root).

Per run: one bridge with the run's private /24 (the aggregator listens on the bridge address).
Per node: a namespace, a veth pair to the bridge, htb (and netem where the kernel has it) on
both ends (uplink on the node side, downlink on the host side), and a cgroup with CPU quota
= cpu_share / dilation (or, with `cpu_limit: weight`, no quota, a CPU weight in proportion to
cpu_share, and the node stretching its CPU seconds to cpu_share / dilation) and memory limit =
the profile's memory. A node killed by its memory
limit is reported as an out-of-memory event (exit_reason), not as a silent loss.
"""
from __future__ import annotations

import os
from pathlib import Path

from .. import netns as N
from ..cgroups import CGroup
from ..cgroups import remove_run
from ..launch import Emulate, Launch, Limits
from ..lifetime import node_preexec
from ..profiles import Profile
from .base import Backend
from .process import ProcessBackend


MIN_OWN_MB = 64  # the least memory of its own a forked node's cgroup gets


class NetnsBackend(ProcessBackend):
    """Processes as in the process backend, each inside its namespace and cgroup."""
    name = "netns"
    cpu_demand = Backend.cpu_demand  # the quota caps a node at its cpu_share

    def __init__(self, run_id: str, workdir: Path, caps: dict | None = None):
        super().__init__(run_id, workdir, caps)
        cg = self.caps["cgroup"]
        if not self.caps.get("root") or not self.caps.get("netns"):
            raise RuntimeError("the netns backend needs root and iproute2 (ip netns); use backend: process")
        if cg.get("version") is None:
            raise RuntimeError("the netns backend needs writable cpu and memory cgroup controllers (v1 or v2)")
        self.cg_version, self.v2_root = cg["version"], (Path(cg["v2_path"]) if cg.get("v2_path") else None)
        self.netem = bool(self.caps.get("netem"))
        self.tag = N.run_tag(run_id)
        self.subnet = None
        self.bridge: N.Bridge | None = None
        self.sandboxes: dict[str, tuple[N.Namespace, N.VethLink, CGroup, Profile]] = {}
        self._index = 0
        self._slots: dict[str, tuple[int, object]] = {}  # node -> (interface index, address)

    # -- network of the run ----------------------------------------------------------------
    def _ensure_bridge(self) -> None:
        if self.bridge is None:
            self.subnet = N.pick_subnet(self.tag)
            hosts = list(self.subnet.hosts())
            self._hosts = iter(hosts[1:])
            self.bridge = N.Bridge(f"{N.IF_PREFIX}{self.tag}b", f"{hosts[0]}/{self.subnet.prefixlen}")
            self.bridge.create()

    def bind_address(self, requested: str) -> str:
        self._ensure_bridge()
        return self.bridge.ip

    def fidelity(self, profiles: list[Profile], dilation: float) -> list[str]:
        notes = []
        if not self.netem and any(p.latency_ms > 0 for p in profiles):
            notes.append("netns backend: no netem in this kernel: latency is emulated in the transport, rates by htb")
        if self.by_weight:
            notes.append("netns backend: cpu_limit weight: no CPU quota; cores shared in proportion to cpu_share, "
                         "each node stretches the CPU seconds of its training to cpu_share / dilation")
        return notes

    @property
    def by_weight(self) -> bool:
        return self.cpu_limit == "weight"

    # -- nodes -----------------------------------------------------------------------------
    def start(self, launch: Launch) -> None:
        self._ensure_bridge()
        name = launch.name
        if name not in self._slots:  # a restarted node keeps its interface names and address
            self._slots[name] = (self._index, next(self._hosts))
            self._index += 1
        i, host = self._slots[name]
        ns = N.Namespace(f"{N.NS_PREFIX}{self.tag}-{name}")
        link = N.VethLink(f"{N.IF_PREFIX}{self.tag}h{i}", f"{N.IF_PREFIX}{self.tag}n{i}", ns,
                          f"{host}/{self.subnet.prefixlen}")
        cg = CGroup(self.run_id, name, self.cg_version, self.v2_root)
        self.sandboxes[name] = (ns, link, cg, launch.profile)
        ns.create()
        link.create(self.bridge)
        self._shape(link, launch.limits)
        cg.create(launch.limits.cpus, self._own_memory_mb(launch.limits), self.by_weight)
        argv = launch.argv(self.emulated(name))  # the kernel does the rest
        if self.zygote is not None:  # enters its cgroup and namespace itself, right after fork
            self._spawn(launch, argv, cgroup_procs=cg.procs_files(), netns=ns.path)
            return

        def enter_sandbox():
            node_preexec()
            cg.add(os.getpid())  # before exec: everything the node runs is limited

        self._spawn(launch, argv, preexec=enter_sandbox, prefix=ns.exec_prefix())

    def _shape(self, link: N.Link, lim: Limits) -> None:
        delay = lim.latency_ms if self.netem else 0.0
        link.shape(N.Shaping(lim.uplink_mbit, delay), N.Shaping(lim.downlink_mbit, delay), self.netem)

    # -- faults ----------------------------------------------------------------------------
    def pause(self, name: str) -> None:
        if not self.sandboxes[name][2].freeze(True):
            super().pause(name)

    def resume(self, name: str) -> None:
        if not self.sandboxes[name][2].freeze(False):
            super().resume(name)

    def cut_link(self, name: str) -> None:
        self.sandboxes[name][1].set_up(False)

    def restore_link(self, name: str) -> None:
        self.sandboxes[name][1].set_up(True)

    def emulated(self, name: str) -> Emulate:
        return Emulate(latency=not self.netem, cpu_time=self.by_weight)

    def reshape(self, launch: Launch) -> None:
        """Rates by htb at once; latency by netem, or without it in the node's transport from its
        next task (which carries the new device)."""
        ns, link, cg, _ = self.sandboxes[launch.name]
        self._shape(link, launch.limits)
        self.sandboxes[launch.name] = (ns, link, cg, launch.profile)

    def set_profile(self, launch: Launch) -> str:
        """Live, as a device switching power mode: new CPU quota or weight, memory limit and link,
        same process. What the node emulates itself (its CPU seconds' share with `cpu_limit:
        weight`, latency without netem) changes from its next task. Threads are fixed at start: a
        profile with another thread count restarts the node."""
        ns, link, cg, old = self.sandboxes[launch.name]
        new = launch.profile
        if new.threads != old.threads:
            self.restart(launch)
            return "restarted: thread count changed"
        cg.set_limits(launch.limits.cpus, self._own_memory_mb(launch.limits), self.by_weight)
        self._shape(link, launch.limits)
        self.sandboxes[launch.name] = (ns, link, cg, new)
        in_node = (self.by_weight and new.cpu_share != old.cpu_share) or (not self.netem and new.latency_ms != old.latency_ms)
        return "live; in the node from its next task" if in_node else "live"

    def _shared_mb(self) -> float:
        return self.zygote.shared_mb if self.zygote is not None else 0.0

    def _own_memory_mb(self, limits: Limits) -> int:
        """A forked node's shared pages (libraries, weights) stay charged to the zygote, so its
        cgroup may hold only the rest of the device's memory."""
        return max(MIN_OWN_MB, int(limits.memory_mb - self._shared_mb()))

    def zygote_notes(self, profiles: list[Profile]) -> list[str]:
        if self.zygote is None:  # memory cgroups charge a page cache page to whoever read it first
            return ["nodes started one by one: pages of torch's libraries and the model file that another "
                    "process already read are not charged to a node's cgroup, so a node's RSS can exceed its "
                    "profile memory by that much before its limit acts; zygote: on charges them (the "
                    "shared part is taken off every limit)"] if profiles else []
        notes = [f"nodes forked from one zygote: {self._shared_mb():.0f} MB shared copy-on-write and charged to "
                 "the zygote; each node's cgroup limit is its profile memory minus that"]
        small = sorted({p.name for p in profiles if p.memory_mb - self._shared_mb() < MIN_OWN_MB})
        if small:
            notes.append(f"profiles with less memory than the shared part + {MIN_OWN_MB} MB get {MIN_OWN_MB} MB of "
                         f"their own: {', '.join(small)}")
        return notes

    def exit_reason(self, name: str) -> str | None:
        reason = super().exit_reason(name)
        oom = self.oom(name) if reason else None
        if oom:
            return f"out of memory: killed by its {oom['limit_mb']} MB limit (peak {oom['peak_mb']:.0f} MB)"
        return reason

    def oom(self, name: str) -> dict | None:
        sb = self.sandboxes.get(name)
        if sb is None or sb[2].oom_kills() == 0 or not sb[2].hit_limit():  # else the host ran out
            return None
        return {"limit_mb": sb[3].memory_mb, "peak_mb": sb[2].peak_memory_bytes() / 2**20 + self._shared_mb()}

    def limits(self, name: str) -> dict:
        ns, link, cg, _ = self.sandboxes[name]
        return {**cg.limits(), **link.qdiscs(), "namespace": ns.name}

    def nodes(self) -> list[str]:
        return list(self.sandboxes)

    def _remove_sandbox(self, name: str) -> None:
        sb = self.sandboxes.pop(name, None)
        if sb:
            ns, link, cg, _ = sb
            cg.remove()
            link.delete()
            ns.delete()

    def _thaw(self, names) -> None:
        """A frozen node must run to see its SIGTERM."""
        for name in names:
            if name in self.sandboxes:
                self.sandboxes[name][2].freeze(False)

    def stop(self, name: str) -> None:
        self._thaw([name])
        super().stop(name)
        self._remove_sandbox(name)

    def teardown(self) -> None:
        self._thaw(list(self.sandboxes))
        super().teardown()
        for name in list(self.sandboxes):
            self._remove_sandbox(name)
        if self.bridge is not None:
            self.bridge.delete()
            self.bridge = None
        remove_run(self.run_id, self.cg_version, self.v2_root)


__all__ = ["NetnsBackend"]
