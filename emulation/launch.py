"""How one node starts: a launch description, built once from the dilated profile.

The runner makes one `Launch` per node (name, endpoint, keys, environment, and the profile's
limits with the dilation applied: the only place it is applied). Each backend consumes it:
a kernel backend turns `limits` into a quota, a memory limit and qdiscs, and asks the node to
emulate in its own transport only what the sandbox cannot (`Emulate`). Nothing rewrites a
command line by position.

Every option of the node's command line is one `--option=value` word, never two: a value
that starts with '-' (z85 keys use '-', and so may names and paths) cannot be read as an
option by the node's parser.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from typing import Mapping

from node.agent import NODE_KEY_ENV  # the node's CURVE secret key (z85), read by `python -m node`
from node.device import Emulated, weight_nice

from .profiles import Profile

RUN_ENV = "TESTBED_RUN"  # every process the testbed starts carries its run id here (for `clean`)
NODE_PROGRAM = ("python", "-m", "node")


def base_env(run_id: str, threads: int) -> dict[str, str]:
    """What every node program of run `run_id` has in its environment (its key aside)."""
    return {RUN_ENV: run_id, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def option(name: str, value) -> str:
    """One command-line word `--name=value` (floats in a short exact-enough form)."""
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f"--{name}={text}"


@dataclass(frozen=True)
class Limits:
    """A device profile as this host enforces it, with the time dilation applied: the CPU
    quota and link rates are divided by the factor, the latency multiplied by it.

    `cpu_share` is the profile's own (not divided): a node that emulates its speed by
    stretching compute time stretches the time it measures, which host contention has
    already inflated by about the dilation factor."""
    cpus: float            # host cores: cpu_share / dilation (a kernel quota)
    cpu_share: float
    threads: int
    memory_mb: int
    uplink_mbit: float     # 0 = unshaped
    downlink_mbit: float   # 0 = unshaped
    latency_ms: float

    @classmethod
    def of(cls, profile: Profile, dilation: float) -> "Limits":
        if not dilation >= 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        return cls(cpus=profile.cpu_share / dilation, cpu_share=profile.cpu_share, threads=int(profile.threads),
                   memory_mb=int(profile.memory_mb), uplink_mbit=profile.uplink_mbit / dilation,
                   downlink_mbit=profile.downlink_mbit / dilation, latency_ms=profile.latency_ms * dilation)


@dataclass(frozen=True)
class Emulate:
    """What a node emulates in user space because its sandbox does not: a slower CPU by
    stretching compute time, link rates and latency in its transport (node/shaping.py).
    `cpu_time`: the sandbox shares cores by weight without a cap, and the node stretches the
    CPU seconds its training used to its dilated share (`cpu_limit: weight`)."""
    cpu: bool = False
    cpu_time: bool = False
    uplink: bool = False
    downlink: bool = False
    latency: bool = False


EVERYTHING = Emulate(cpu=True, uplink=True, downlink=True, latency=True)


@dataclass(frozen=True)
class Launch:
    """Everything a backend needs to start one node."""
    name: str
    profile: Profile                 # as the scenario gives it (for records and restarts)
    endpoint: str                    # where the node dials the aggregator
    limits: Limits
    env: Mapping[str, str] = field(default_factory=dict)  # run id, threads, offline flags, its CURVE key
    server_key: str | None = None    # the aggregator's CURVE public key
    virtual: bool = False            # `clock: virtual`: the node reports its CPU seconds at its share, never waits
    largest_share: float = 0.0       # the virtual clock: the run's largest cpu_share (node.device.weight_nice)

    def identity(self) -> list[str]:
        """Who the node is and where it dials: what a real device's join command gives too."""
        args = [option("connect", self.endpoint), option("name", self.name), option("profile", self.profile.name)]
        return args + ([option("server-key", self.server_key)] if self.server_key else [])

    def emulated(self, emulate: Emulate) -> Emulated:
        """The device as the node emulates it in a sandbox that leaves `emulate` to it: given on
        its command line at start, and in every TASK (a changed profile reaches it so)."""
        lim = self.limits
        if self.virtual:  # the aggregator times the links; the node only converts its CPU seconds
            return Emulated(lim.cpus, "virtual", nice=weight_nice(lim.cpus, self.largest_share))
        if emulate.cpu_time:  # CPU seconds at the dilated share (may exceed one core)
            share, clock = lim.cpus, "cpu"
        else:  # wall time: host contention has already slowed it by about the dilation
            share, clock = (min(1.0, lim.cpu_share) if emulate.cpu else 1.0), "wall"
        return Emulated(share, clock, lim.uplink_mbit if emulate.uplink else 0.0,
                        lim.downlink_mbit if emulate.downlink else 0.0, lim.latency_ms if emulate.latency else 0.0)

    def argv(self, emulate: Emulate) -> list[str]:
        """The arguments of `python -m node` for this node in a sandbox that leaves `emulate` to it."""
        dev = self.emulated(emulate)
        args = [*self.identity(), option("threads", self.limits.threads), option("cpu-share", dev.cpu_share)]
        if dev.cpu_clock != "wall":
            args.append(option("cpu-clock", dev.cpu_clock))
        for name in ("uplink_mbit", "downlink_mbit", "latency_ms"):
            if getattr(dev, name):
                args.append(option(name.replace("_", "-"), getattr(dev, name)))
        return args

    def join_command(self) -> str:
        """One shell line that starts this node on a real device (its key in the environment;
        z85 keys hold shell metacharacters, so every word is quoted)."""
        key = {k: v for k, v in self.env.items() if k == NODE_KEY_ENV}
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in key.items()), *NODE_PROGRAM,
                         *map(shlex.quote, self.identity())])

    def dialling(self, endpoint: str) -> "Launch":
        """The same node dialling another address (an engine's nodes reach the aggregator elsewhere)."""
        return replace(self, endpoint=endpoint)


@dataclass(frozen=True)
class Launcher:
    """Makes the Launch of any node of one run (also for restarts and profile switches)."""
    run_id: str
    endpoint: str
    dilation: float
    server_key: str | None = None
    secrets: Mapping[str, str] = field(default_factory=dict)  # node -> its CURVE secret key
    virtual: bool = False
    largest_share: float = 0.0  # the virtual clock: the largest cpu_share of the run's emulated nodes

    def launch(self, name: str, profile: Profile) -> Launch:
        limits = Limits.of(profile, self.dilation)
        env = {**base_env(self.run_id, limits.threads),
               **({NODE_KEY_ENV: self.secrets[name]} if name in self.secrets else {})}
        return Launch(name, profile, self.endpoint, limits, env, self.server_key, self.virtual, self.largest_share)
