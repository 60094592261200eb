"""Live progress on screen: strategy, round, accuracy, elapsed time, and each node's phase.

On a terminal it is a rich Live table; elsewhere (CI, logs) one plain line per event.
"""
from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

PHASE_STYLE = {"train": "yellow", "computed": "magenta", "upload": "cyan", "download": "cyan", "ready": "green",
               "idle": "green", "ok": "green", "dropped": "red", "failed": "red", "rejected": "red", "welcome": "blue"}


class Progress:
    def __init__(self, nodes: dict[str, str], console: Console | None = None, live: bool | None = None):
        self.console = console or Console(stderr=True)
        self.nodes = nodes                      # name -> profile
        self.phase = {n: "starting" for n in nodes}
        self.strategy, self.round, self.rounds = "-", 0, 0
        self.accuracy: dict[str, float | None] = {}
        self.elapsed: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.live_on = self.console.is_terminal if live is None else live
        self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False) \
            if self.live_on else None

    def __enter__(self):
        if self._live:
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live:
            self._live.update(self._render())
            self._live.__exit__(*exc)

    def _render(self):
        head = Table.grid(padding=(0, 2))
        head.add_row(Text(f"strategy {self.strategy}", style="bold"), f"round {self.round}/{self.rounds}",
                     f"host time {time.monotonic() - self.t0:,.0f} s")
        acc = Table(title="accuracy", title_justify="left", box=None)
        acc.add_column("strategy")
        acc.add_column("accuracy", justify="right")
        acc.add_column("elapsed s", justify="right")
        for s, a in self.accuracy.items():
            acc.add_row(s, "-" if a is None else f"{a:.3f}", f"{self.elapsed.get(s, 0):,.1f}")
        nodes = Table(box=None, title="nodes", title_justify="left")
        for _ in range(min(4, max(1, len(self.nodes)))):
            nodes.add_column("node")
            nodes.add_column("phase")
        cells = [(n, Text(self.phase[n], style=PHASE_STYLE.get(self.phase[n], ""))) for n in self.nodes]
        width = min(4, max(1, len(self.nodes)))
        for i in range(0, len(cells), width):
            row = [x for c in cells[i:i + width] for x in c]
            nodes.add_row(*row, *[""] * (2 * width - len(row)))
        return Group(head, acc, nodes)

    def _refresh(self):
        if self._live:
            self._live.update(self._render())

    def node_phase(self, name: str, phase: str) -> None:
        if name in self.phase:
            self.phase[name] = phase
            self._refresh()

    def start_strategy(self, name: str, rounds: int) -> None:
        self.strategy, self.round, self.rounds = name, 0, rounds
        self.accuracy.setdefault(name, None)
        self.message(f"strategy {name}: {rounds} rounds")

    def round_done(self, row: dict) -> None:
        self.round = row["round"]
        self.accuracy[row["strategy"]] = row["accuracy"]
        self.elapsed[row["strategy"]] = row["elapsed_s"]
        for n in row["nodes"]:
            self.phase[n["node"]] = n["status"]
        if not self._live:
            self.console.print(f"{row['strategy']} round {row['round']}: accuracy {row['accuracy']:.3f} "
                               f"wall {row['wall_s']:.1f} s elapsed {row['elapsed_s']:.1f} s "
                               f"participants {row['participants']} dropped {row['dropped']}", highlight=False,
                               soft_wrap=True)
        self._refresh()

    def message(self, text: str, style: str | None = None) -> None:
        """Plain text, never markup: join commands carry keys with [ and ] in them."""
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)  # one line: copy-paste
        self._refresh()
