"""Links and availability that change over time: rate traces, online intervals, and two synthetic
generators for when no measured trace is at hand.

Both run on a strategy's own clock (emulated seconds since it started, the clock of the fault
events), so every strategy meets the same link and the same outages at the same moment.

- A rate trace is a step function: from each row's time on, the link runs at its uplink and
  downlink rate. After the last row it is held, or the whole trace loops (`end: loop`).
- Gilbert-Elliott (synthetic): a two-state Markov chain, good and bad, stepped every `step_s`;
  each state runs the profile's rates times a factor. It is Gilbert's and Elliott's burst model
  of a channel, applied to the rate instead of the loss.
- Markov on/off availability (synthetic): a device is online for an exponential time of mean
  `mean_on_s`, then offline for one of mean `mean_off_s`, and so on; it starts in either state
  with its long-run probability.

Every generated sequence is seeded by the scenario's seed and the node's name: the same for
every strategy and every run of the seed. docs/traces.md describes the file formats and how each backend replays them.
"""
from __future__ import annotations

import bisect
import csv
import math
from pathlib import Path

import numpy as np

RATE_COLUMNS = ("time_s", "uplink_mbit", "downlink_mbit")
AVAILABILITY_COLUMNS = ("node", "online_from_s", "online_to_s")
MAX_LAZY_STEPS = 1_000_000  # a generated sequence never grows past this (a guard, not a horizon)
EPS = 1e-9                  # a step computed as k x period + time is in force at that time, float error or not


class TraceError(ValueError):
    """A trace that cannot be used; the message names the file and line."""


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of a CSV file, comments and blank lines left out."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    rows = [(i, [c.strip() for c in row]) for i, row in enumerate(csv.reader(text.splitlines()), start=1)]
    rows = [(i, r) for i, r in rows if "".join(r) and not r[0].startswith("#")]
    if not rows:
        raise TraceError(f"{path}: the file is empty (a header and at least one row are needed)")
    return rows


def _numbers(path: Path, line: int, names: tuple[str, ...], cells: list[str]) -> list[float]:
    names = ", ".join(names[:-1]) + " and " + names[-1]
    try:
        values = [float(c) for c in cells]
    except ValueError:
        raise TraceError(f"{path} line {line}: {names} must be numbers, got {cells}") from None
    if not all(math.isfinite(v) for v in values):
        raise TraceError(f"{path} line {line}: {names} must be finite, got {cells}")
    return values


# -- rates ----------------------------------------------------------------------------------
class RateTrace:
    """Uplink and downlink Mbit/s over emulated time, as steps (at_s, up, down) from at_s = 0."""

    def __init__(self, steps: list[tuple[float, float, float]], end: str = "hold", period_s: float | None = None,
                 grow=None):
        if not steps or steps[0][0] != 0:
            raise ValueError("a rate trace starts at time 0")
        if end not in ("hold", "loop"):
            raise ValueError(f"end must be hold or loop, got {end!r}")
        self.steps, self.end, self._grow = list(steps), end, grow
        self._times = [s[0] for s in self.steps]
        self.period_s = period_s if end == "loop" else None
        if end == "loop" and not (period_s and period_s > self.steps[-1][0]):
            raise ValueError(f"a looped trace's period_s must exceed its last time ({self.steps[-1][0]:g} s)")

    def _local(self, t: float) -> tuple[float, float]:
        """(the cycle's start, time within the trace) for emulated time t."""
        if self.period_s is None:
            return 0.0, t
        k = math.floor((t + EPS) / self.period_s)
        return k * self.period_s, max(0.0, t - k * self.period_s)

    def _cover(self, t: float) -> None:
        while self._grow is not None and self.steps[-1][0] <= t and len(self.steps) < MAX_LAZY_STEPS:
            self.steps.append(self._grow(len(self.steps)))
            self._times.append(self.steps[-1][0])

    def at(self, t: float) -> tuple[float, float]:
        """(uplink, downlink) Mbit/s at emulated time t >= 0."""
        base, local = self._local(max(0.0, t))
        self._cover(local)
        i = bisect.bisect_right(self._times, local + EPS) - 1
        return self.steps[i][1], self.steps[i][2]

    def next_change(self, t: float) -> float | None:
        """The first step time after t (None: the rates stay as they are for good)."""
        base, local = self._local(max(0.0, t))
        self._cover(local + EPS)
        i = bisect.bisect_right(self._times, local + EPS)  # always later than t: a replay moves on
        if i < len(self._times):
            return base + self._times[i]
        return base + self.period_s if self.period_s is not None else None

    def schedule(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        """The steps in force from t0 to t1: (at_s, up, down), the first at t0."""
        out = [(t0, *self.at(t0))]
        t = self.next_change(t0)
        while t is not None and t < t1 and len(out) < 10_000:
            out.append((t, *self.at(t)))
            t = self.next_change(t)
        return out


def load_rate_trace(path: str | Path, nodes: list[str], end: str = "hold",
                    period_s: float | None = None) -> dict[str, RateTrace]:
    """node -> its trace, from a CSV of time_s,uplink_mbit,downlink_mbit (one trace for all of
    `nodes`) or node,time_s,uplink_mbit,downlink_mbit (per node; a node without rows keeps its
    profile's constant link). Times start at 0 and increase; rates are > 0."""
    path = Path(path)
    rows = _rows(path)
    line, header = rows[0]
    per_node = header[:1] == ["node"]
    want = ("node", *RATE_COLUMNS) if per_node else RATE_COLUMNS
    if tuple(header) != want:
        raise TraceError(f"{path} line {line}: the header must be {','.join(RATE_COLUMNS)} "
                         f"(one trace for the group) or node,{','.join(RATE_COLUMNS)} (per node); got {','.join(header)}")
    if len(rows) == 1:
        raise TraceError(f"{path}: the file has a header and no rows")
    steps: dict[str, list[tuple[float, float, float]]] = {}
    for line, cells in rows[1:]:
        if len(cells) != len(want):
            raise TraceError(f"{path} line {line}: expected {len(want)} fields ({','.join(want)}), got {len(cells)}")
        node = cells[0] if per_node else "*"
        if per_node and node not in nodes:
            raise TraceError(f"{path} line {line}: unknown node {node!r}; this group's nodes are "
                             f"{', '.join(nodes[:8])}{' ...' if len(nodes) > 8 else ''}")
        t, up, down = _numbers(path, line, RATE_COLUMNS, cells[-3:])
        mine = steps.setdefault(node, [])
        if not mine and t != 0:
            raise TraceError(f"{path} line {line}: a trace starts at time_s 0, got {t:g}")
        if mine and t <= mine[-1][0]:
            raise TraceError(f"{path} line {line}: time_s must increase, got {t:g} after {mine[-1][0]:g}")
        if up <= 0 or down <= 0:
            raise TraceError(f"{path} line {line}: rates must be > 0 Mbit/s, got {up:g}, {down:g} "
                             "(a link that is down is a cut_link fault or an availability interval)")
        mine.append((t, up, down))
    out = {}
    for node, mine in steps.items():
        period = period_s
        if end == "loop" and period is None:  # the last step lasts as long as the one before it
            period = mine[-1][0] + (mine[-1][0] - mine[-2][0] if len(mine) > 1 else 1.0)
        if end == "loop" and period <= mine[-1][0]:
            raise TraceError(f"{path}: period_s {period:g} must exceed the last time_s ({mine[-1][0]:g})")
        trace = RateTrace(mine, end, period)
        out.update({n: trace for n in nodes} if node == "*" else {node: trace})
    return out


def gilbert_elliott(up_mbit: float, down_mbit: float, p_good_to_bad: float, p_bad_to_good: float,
                    bad_factor: float, good_factor: float, step_s: float, seed: list[int | str]) -> RateTrace:
    """Rates stepped every `step_s` by a good/bad Markov chain; the first state is drawn with its
    long-run probability (bad: p_gb / (p_gb + p_bg))."""
    rng = np.random.default_rng([ord(c) for c in "/".join(map(str, seed))])
    bad = [bool(rng.random() < p_good_to_bad / (p_good_to_bad + p_bad_to_good))]

    def step(k: int) -> tuple[float, float, float]:
        while len(bad) <= k:
            u = rng.random()
            bad.append(u >= p_bad_to_good if bad[-1] else u < p_good_to_bad)
        f = bad_factor if bad[k] else good_factor
        return k * step_s, up_mbit * f, down_mbit * f

    return RateTrace([step(0)], "hold", grow=step)


# -- availability ----------------------------------------------------------------------------
class Intervals:
    """When a node is online: intervals [from, to) of emulated time, listed or drawn lazily."""

    def __init__(self, spans: list[tuple[float, float]], grow=None):
        self.spans, self._grow = sorted(spans), grow
        self._starts = [lo for lo, _ in self.spans]

    def _cover(self, t: float) -> None:
        while self._grow is not None and (not self.spans or self.spans[-1][1] <= t) \
                and len(self.spans) < MAX_LAZY_STEPS:
            self.spans.append(self._grow())
            self._starts.append(self.spans[-1][0])

    def online_at(self, t: float) -> bool:
        self._cover(t)
        i = bisect.bisect_right(self._starts, t) - 1
        return i >= 0 and t < self.spans[i][1]

    def next_change(self, t: float) -> float | None:
        """The first time after t at which the node comes online or goes offline."""
        self._cover(t)
        i = bisect.bisect_right(self._starts, t)
        if i > 0 and self.spans[i - 1][1] > t:
            return self.spans[i - 1][1]
        return self.spans[i][0] if i < len(self.spans) else None


def load_availability(path: str | Path, names: set[str]) -> dict[str, Intervals]:
    """node -> its online intervals, from a CSV of node,online_from_s,online_to_s."""
    path = Path(path)
    rows = _rows(path)
    line, header = rows[0]
    if tuple(header) != AVAILABILITY_COLUMNS:
        raise TraceError(f"{path} line {line}: the header must be {','.join(AVAILABILITY_COLUMNS)}")
    if len(rows) == 1:
        raise TraceError(f"{path}: the file has a header and no rows")
    spans: dict[str, list[tuple[float, float]]] = {}
    for line, cells in rows[1:]:
        if len(cells) != 3:
            raise TraceError(f"{path} line {line}: expected 3 fields ({','.join(AVAILABILITY_COLUMNS)}), "
                             f"got {len(cells)}")
        node = cells[0]
        if node not in names:
            raise TraceError(f"{path} line {line}: unknown node {node!r}; the scenario's nodes are "
                             f"{', '.join(sorted(names)[:8])}{' ...' if len(names) > 8 else ''}")
        lo, hi = _numbers(path, line, AVAILABILITY_COLUMNS[1:], cells[1:])
        if not 0 <= lo < hi:
            raise TraceError(f"{path} line {line}: need 0 <= online_from_s < online_to_s, got {lo:g}, {hi:g}")
        mine = spans.setdefault(node, [])
        if mine and lo < mine[-1][1]:
            raise TraceError(f"{path} line {line}: {node}'s intervals must be in order and not overlap: "
                             f"{lo:g} is before the end of the one before ({mine[-1][1]:g})")
        mine.append((lo, hi))
    return {n: Intervals(s) for n, s in spans.items()}


def markov_on_off(mean_on_s: float, mean_off_s: float, seed: list[int | str]) -> Intervals:
    """Online for Exp(mean_on_s), offline for Exp(mean_off_s), alternating; the first state drawn
    with its long-run probability, and a first span of the full (memoryless) length."""
    rng = np.random.default_rng([ord(c) for c in "/".join(map(str, seed))])
    t = [0.0 if rng.random() < mean_on_s / (mean_on_s + mean_off_s) else rng.exponential(mean_off_s)]

    def span() -> tuple[float, float]:
        lo = t[0]
        hi = lo + rng.exponential(mean_on_s)
        t[0] = hi + rng.exponential(mean_off_s)
        return lo, hi

    return Intervals([], grow=span)


# -- a scenario's traces ----------------------------------------------------------------------
def rate_traces_of(sc, nodes) -> dict[str, RateTrace]:
    """node -> its link trace, for the groups that give link_trace (files read by `parse`)."""
    out: dict[str, RateTrace] = {}
    for g in sc.nodes:
        tr = g.link_trace
        if tr is None:
            continue
        members = [n for n in nodes if n.group == g.group]
        if tr.file is not None:
            out.update(load_rate_trace(tr.file, [n.name for n in members], tr.end, tr.period_s))
            continue
        ge = tr.gilbert_elliott
        for n in members:
            out[n.name] = gilbert_elliott(n.profile.uplink_mbit, n.profile.downlink_mbit, ge.p_good_to_bad,
                                          ge.p_bad_to_good, ge.bad_factor, ge.good_factor, ge.step_s,
                                          [sc.seed, n.name, "link"])
    return out


def availability_of(sc, nodes) -> dict[str, Intervals]:
    """node -> when it is online, for the nodes the availability trace lists or markov covers."""
    av = sc.faults.availability
    if av.trace is not None:
        return load_availability(av.trace, {n.name for n in nodes})
    if av.markov is None:
        return {}
    picked = av.markov.nodes
    covered = [n.name for n in nodes if (not n.remote if picked is None else n.name in picked or n.group in picked)]
    return {n: markov_on_off(av.markov.mean_on_s, av.markov.mean_off_s, [sc.seed, n, "online"]) for n in covered}
