"""The virtual clock (`clock: virtual`): the same nodes train for real at host speed, and the
round's emulated times are computed instead of waited for.

- A node's compute time is its training's CPU seconds over its profile's cores (the node
  reports it: node/device.py, clock `virtual`), with no quota and no dilation.
- A link's time is the profile's latency plus the real bytes of the message at the link's rate
  (its trace's rates where it has one, step by step: node/shaping.Link), the same model as the
  process backend's transport.
- The aggregator waits in real time for every result, then replays the round on one virtual
  clock: arrivals and the strategy's due faults in time order. A result that arrives after
  the deadline, after its node was killed, restarted or went offline is lost as in real time;
  a paused node's task stands still until it is resumed.

So a virtual round needs the host's CPU for the work only: wall ~ training CPU / cores.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from node.shaping import Link

from .aggregator import RoundOutcome


def link_s(nbytes: int, rate_mbit: float, latency_ms: float, at_s: float,
           steps: list[tuple[float, float]] = ()) -> float:
    """Seconds `nbytes` sent at `at_s` take on a link of `rate_mbit` (0 = unshaped) and
    `latency_ms`, whose rate follows `steps` ((emulated time, Mbit/s)) from then on."""
    return Link(rate_mbit, latency_ms, schedule=list(steps)).delay_for(nbytes, at=at_s)


def link_of(inj, node: str, nbytes: int, at_s: float, horizon_s: float, way: str) -> float:
    """Seconds `nbytes` sent at `at_s` take on the node's link `way` ("up" or "down"): its
    current profile's rate and latency, and its trace's steps for `horizon_s` from then on."""
    prof, trace = inj.profile_now(node), inj.rates.get(node)
    col = 1 if way == "up" else 2
    steps = [(s[0], s[col]) for s in trace.schedule(at_s, at_s + horizon_s)] if trace else []
    rate = prof.uplink_mbit if way == "up" else prof.downlink_mbit
    return link_s(nbytes, rate, prof.latency_ms, at_s, steps)


@dataclass
class Leg:
    """One task's times on the virtual clock, in emulated seconds."""
    download_s: float
    compute_s: float
    upload_s: float
    remaining_s: float          # of the whole task, from `since`
    since: float                # when it last started moving (the round's start, or a resume)

    @property
    def arrival(self) -> float:
        return self.since + self.remaining_s


class VirtualRound:
    """Times one round's tasks on the strategy's virtual clock and applies the faults due meanwhile."""

    def __init__(self, inj, start_s: float, deadline_s: float):
        self.inj, self.start, self.deadline = inj, start_s, deadline_s

    def legs(self, outcome: RoundOutcome) -> dict[str, Leg]:
        """Each answered task's download, compute and upload on its node's link at the round's start."""
        out, horizon = {}, self.deadline + 1.0
        for n, rec in outcome.records.items():
            if n not in outcome.answered:
                continue
            down = link_of(self.inj, n, rec.bytes_down, self.start, horizon, "down")
            up = link_of(self.inj, n, rec.bytes_up, self.start + down + rec.compute_s, horizon, "up")
            out[n] = Leg(down, rec.compute_s, up, down + rec.compute_s + up, self.start)
        return out

    def settle(self, outcome: RoundOutcome) -> float:
        """Replay the round: fill each record's link times, drop what a fault or the deadline lost,
        and return the round's emulated duration. The injector's clock ends at the round's end."""
        inj, end = self.inj, self.start + self.deadline
        self.outcome, moving = outcome, self.legs(outcome)
        frozen: dict[str, Leg] = {}
        inj.vbusy = set(moving)
        last = self.start
        self._pause_or_resume(moving, frozen, self.start)  # paused before the task went out
        while moving or frozen:
            arrival, n = min(((leg.arrival, n) for n, leg in moving.items()), default=(math.inf, ""))
            due = inj.next_due()
            t = min(arrival, math.inf if due is None else due)
            if t > end:
                break
            if due is not None and due <= arrival:
                inj.advance(due)
                self._pause_or_resume(moving, frozen, due)
                continue
            leg = moving.pop(n)
            inj.vbusy.discard(n)
            inj.advance(t)
            self._times(n, leg)
            last = t
        late = set(moving) | set(frozen) | {n for n, r in outcome.records.items()
                                           if n not in outcome.answered and r.status == "dropped"}
        for n in set(moving) | set(frozen):
            self._times(n, moving.get(n) or frozen[n])
            outcome.results.pop(n, None)
            rec = outcome.records[n]
            rec.status, rec.reason = "dropped", "missed the round deadline"
        wall = self.deadline if late else last - self.start
        inj.advance(self.start + wall)
        inj.vbusy = set()
        return wall

    def _times(self, n: str, leg: Leg) -> None:
        rec = self.outcome.records[n]
        rec.download_s, rec.upload_s = leg.download_s, leg.upload_s

    def _pause_or_resume(self, moving: dict[str, Leg], frozen: dict[str, Leg], t: float) -> None:
        """After the faults of time t: a task whose node was killed, restarted or went offline is
        lost at once (as the real round stops waiting for it); one whose node is paused stands
        still, and goes on when it is resumed."""
        for tasks in (moving, frozen):
            for n in [n for n in tasks if n in self.inj.lost]:
                self._times(n, tasks.pop(n))
                self.inj.vbusy.discard(n)
                self.outcome.results.pop(n, None)
                self.outcome.records[n].status, self.outcome.records[n].reason = "failed", None
        for n in [n for n in moving if n in self.inj.paused]:
            leg = frozen[n] = moving.pop(n)
            leg.remaining_s, leg.since = leg.arrival - t, t
        for n in [n for n in frozen if n not in self.inj.paused]:
            leg = moving[n] = frozen.pop(n)
            leg.since = t


def real_timeout_s(deadline_s: float, shares: list[float], cores: int) -> float:
    """How long the aggregator waits in real time for a virtual round's results: twice the CPU
    the tasks may use within the deadline, on this host's cores (a node still running then
    could not have finished in time on any share of them), and at least a minute."""
    return max(60.0, 2.0 * deadline_s * sum(shares) / max(1, cores))


@dataclass(frozen=True)
class Agreement:
    """How a virtual-clock run matches a real-clock run of the same scenario, round by round:
    ratios virtual / real of each round's time, each device's compute time and each device's
    time in the round (download + compute + upload).

    Both clocks time compute by one CPU model (CPU seconds at the profile's share), so they agree
    exactly when the same work costs the same CPU seconds in both runs. `model_ratios` check
    the model: each device's emulated seconds per CPU second, virtual / real (1 when both apply
    the same). The host's speed is not the same from one run to the next: `host_speed` is, per
    round, the median over its devices of the virtual run's CPU seconds over the real run's for
    the same work. The device and round ratios take the real run's compute at that speed, so
    that a round the host ran slower as a whole in one run is not read as a wrong model; a device
    whose CPU seconds moved apart from its round's still shows. A device's real times are taken
    by the CPU model, without the time the host added by not giving it its share
    (`host_short_s`, which the real run records, and `host_short` lists); `recorded_ratios`
    keep it in and take the host as it was. A real round's time changes by what the host's
    stretch and speed changed in its slowest device's time. The totals add each device's
    seconds (and all rounds' seconds) over the rounds before they are divided: one device-round's
    CPU seconds vary more between two runs than a device's over several rounds."""
    accuracy_pairs: list[tuple[str, int, float, float]]  # (strategy, round, real, virtual)
    device_ratios: list[tuple[str, int, str, float]]      # (strategy, round, node, ratio)
    compute_ratios: list[tuple[str, int, str, float]]
    round_ratios: list[tuple[str, int, float]]
    recorded_ratios: list[tuple[str, int, str, float]] = ()   # device times as the real run recorded them
    host_short: list[tuple[str, int, str, float]] = ()        # real node-rounds the host stretched: share of compute
    host_speed: list[tuple[str, int, float]] = ()             # virtual / real CPU seconds of a round's same work
    model_ratios: list[tuple[str, int, str, float]] = ()      # emulated compute per CPU second, virtual / real
    device_totals: list[tuple[str, float]] = ()               # (node, its time over all rounds: ratio)
    compute_totals: list[tuple[str, float]] = ()              # (node, its compute over all rounds: ratio)
    rounds_total: float = 1.0                                 # all rounds' time, virtual / real

    @property
    def accuracy_identical(self) -> bool:
        return all(a == b for *_, a, b in self.accuracy_pairs)

    @property
    def worst(self) -> float:
        """The largest relative difference of one device's time in one round."""
        return max((abs(r - 1) for *_, r in self.device_ratios), default=0.0)


def host_speed(pairs: list[tuple[dict, dict]]) -> float:
    """The median of virtual / real CPU seconds over a round's (virtual, real) device entries:
    how much faster or slower the host did the same work in the virtual run (1 without CPU
    seconds to compare, as in runs recorded before they were kept)."""
    ratios = [v["cpu_s"] / r["cpu_s"] for v, r in pairs if _has_cpu(v, r)]
    return statistics.median(ratios) if ratios else 1.0


def _has_cpu(*entries: dict) -> bool:
    """Whether every entry recorded the CPU seconds of its training."""
    return all((e.get("cpu_s") or 0) > 0 for e in entries)


def device_time(entry: dict) -> float:
    """A device's time in a round: download, compute and upload (emulated seconds)."""
    return entry["download_s"] + entry["compute_s"] + entry["upload_s"]


def agreement(real_rows: list[dict], virtual_rows: list[dict]) -> Agreement:
    """Per-round accuracy and each answered device's per-round time of two runs of one scenario."""
    real = {(r["strategy"], r["round"]): r for r in real_rows}
    out: dict[str, list] = {k: [] for k in ("acc", "device", "compute", "rounds", "recorded", "short", "speed", "model")}
    for v in virtual_rows:
        r = real.get((v["strategy"], v["round"]))
        if r is None or v["round"] == 0:
            continue
        key = (v["strategy"], v["round"])
        out["acc"].append((*key, r.get("accuracy"), v.get("accuracy")))
        ok = {n["node"]: n for n in r["nodes"] if n["status"] == "ok"}
        pairs = [(n, ok[n["node"]]) for n in v["nodes"] if n["status"] == "ok" and n["node"] in ok]
        speed = host_speed(pairs)
        out["speed"].append((*key, speed))
        if r["wall_s"] > 0:  # the slowest device sets the round: by the CPU model at this speed, its time changes
            cut = max(map(device_time, ok.values())) - max(_modelled(m, speed) for m in ok.values()) if ok else 0.0
            out["rounds"].append((*key, v["wall_s"], r["wall_s"] - cut))
        for n, m in pairs:
            _compare(key, n, m, speed, out)
    return Agreement(out["acc"], _ratios(out["device"]), _ratios(out["compute"]), _ratios(out["rounds"]),
                     out["recorded"], out["short"], out["speed"], out["model"], _totals(out["device"]),
                     _totals(out["compute"]),
                     sum(a for *_, a, _ in out["rounds"]) / max(1e-9, sum(b for *_, b in out["rounds"])))


def _ratios(seconds: list[tuple]) -> list[tuple]:
    """(key..., virtual seconds, real seconds) -> (key..., virtual / real)."""
    return [(*key, a / b) for *key, a, b in seconds]


def _totals(seconds: list[tuple[str, int, str, float, float]]) -> list[tuple[str, float]]:
    """Per node, in order of first appearance: its virtual seconds over its real seconds, summed over rounds."""
    sums: dict[str, list[float]] = {}
    for _, _, node, a, b in seconds:
        pair = sums.setdefault(node, [0.0, 0.0])
        pair[0], pair[1] = pair[0] + a, pair[1] + b
    return [(node, a / b) for node, (a, b) in sums.items()]


def _modelled(real: dict, speed: float) -> float:
    """A real device's time in its round by the CPU model, its compute at the host's `speed`."""
    short = float(real.get("host_short_s") or 0.0)
    return real["download_s"] + (real["compute_s"] - short) * speed + real["upload_s"]


def _compare(key: tuple, v: dict, r: dict, speed: float, out: dict[str, list]) -> None:
    """One device-round's times, virtual entry `v` against real entry `r`, into `out`: (virtual
    seconds, real seconds by the CPU model at the host's speed) and ratios."""
    added = float(r.get("host_short_s") or 0.0)
    node = v["node"]
    if added > 0 and r["compute_s"] > 0:
        out["short"].append((*key, node, added / r["compute_s"]))
    modelled = _modelled(r, speed)
    if modelled > 0:
        out["device"].append((*key, node, device_time(v), modelled))
        out["recorded"].append((*key, node, device_time(v) / device_time(r)))
    if r["compute_s"] > added:
        out["compute"].append((*key, node, v["compute_s"], (r["compute_s"] - added) * speed))
        if _has_cpu(v, r):
            out["model"].append((*key, node, (v["compute_s"] / v["cpu_s"]) / ((r["compute_s"] - added) / r["cpu_s"])))
