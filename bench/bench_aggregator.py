#!/usr/bin/env python
"""The aggregator's own overhead per round, as a fraction of the round's wall time.

A real testbed.aggregator.Aggregator listens on 127.0.0.1; N fake nodes (one child process,
one thread, one ZeroMQ DEALER per node) speak the protocol: HELLO, HEARTBEAT "ready" after
WELCOME, and for each TASK an emulated training time (`--train-s`, a sleep) then a RESULT
that echoes the received tensors. Rounds run as testbed/runner.py runs them: a strategy's
configure, Aggregator.run_round with the runner's check_result, then strategy.aggregate.

The aggregator is instrumented from here only (wrappers on the Aggregator instance, its
socket and node.protocol.encode/decode; the project's code is unchanged). Per round:

- wall: run_round + aggregate (what the runner counts as the round's wall_s);
- wait: time blocked in the socket's poll, i.e. waiting for the nodes;
- send: serialize + send of the TASKs (Aggregator.send), encode being part of it;
- recv: recv_multipart + handling of each inbound message (decode, validation);
- check: check_result on each RESULT (names, shapes, all finite);
- aggregate: strategy.aggregate (weighted average in float64);
- overhead = wall - wait: everything the aggregator itself spends time on (on a loaded
  machine this includes time the aggregator was ready but not scheduled);
- cpu: CPU seconds of the whole aggregator process in the round (main thread + ZeroMQ I/O
  and garbage-collector threads), which is less sensitive to other load;
- wall - train: how much longer the round took than the emulated training.

Figures are medians over the measured rounds (after one warm-up round). They depend on
--train-s: the fraction is overhead / wall, and wall >= train-s. Nothing asserts on time.
"""
from __future__ import annotations

import argparse
import heapq
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from node import protocol as P  # noqa: E402

SAMPLES = 100


# -- the fake nodes (child process) ------------------------------------------------------------
def serve_nodes(endpoint: str, names: list[str], train_s: float, max_idle_s: float = 120.0,
                stagger_s: float = 0.0) -> int:
    """Run every named node on one thread: a DEALER each, timers for the emulated training
    (node i trains `train_s + i * stagger_s`: 0 makes them all answer at once)."""
    ctx = zmq.Context()
    socks, runs = [], {}
    poller = zmq.Poller()
    for _ in names:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 1000)
        s.connect(endpoint)
        poller.register(s, zmq.POLLIN)
        socks.append(s)
    index = {s: i for i, s in enumerate(socks)}

    def send(i: int, type_: str, rnd: int = 0, meta: dict | None = None, tensors: dict | None = None) -> None:
        msg = P.Message(type_, run=runs.get(i, ""), round=rnd, meta=meta or {}, tensors=tensors or {})
        socks[i].send_multipart(P.encode(msg), copy=False)

    for i, name in enumerate(names):
        send(i, P.HELLO, meta={"name": name})
    due: list = []            # (time, seq, node index, TASK message)
    seq, live, rc = 0, set(range(len(names))), 0
    last_heard = time.monotonic()
    try:
        while live:
            now = time.monotonic()
            if now - last_heard > max_idle_s:
                print(f"fake nodes: nothing from the aggregator for {max_idle_s:.0f} s, leaving", file=sys.stderr)
                rc = 3
                break
            wait_ms = 500 if not due else max(0, int((due[0][0] - now) * 1000) + 1)
            for s, _ in poller.poll(min(wait_ms, 500)):
                i = index[s]
                frames = s.recv_multipart(copy=False)
                last_heard = time.monotonic()
                try:
                    msg = P.decode(frames)
                except P.ProtocolError as exc:
                    print(f"fake node {names[i]}: bad message: {exc}", file=sys.stderr)
                    continue
                if msg.type == P.WELCOME:
                    runs[i] = msg.run
                    send(i, P.HEARTBEAT, meta={"phase": "ready"})
                elif msg.type == P.TASK:
                    seq += 1
                    heapq.heappush(due, (last_heard + train_s + i * stagger_s, seq, i, msg))
                elif msg.type == P.BYE:
                    live.discard(i)
                elif msg.type == P.ERROR:
                    print(f"fake node {names[i]}: aggregator error: {msg.meta.get('error')}", file=sys.stderr)
                    if msg.meta.get("fatal"):
                        live.discard(i)
                        rc = 2
            while due and due[0][0] <= time.monotonic():
                _, _, i, task = heapq.heappop(due)
                send(i, P.RESULT, task.round, {"samples": SAMPLES, "task_id": task.meta.get("task_id"),
                                               "compute_s": train_s}, task.tensors)
    finally:
        for s in socks:
            s.close()
        ctx.term()
    return rc


# -- instrumentation (this process only) ------------------------------------------------------
class Timers:
    def __init__(self):
        self.t: dict[str, float] = {}
        self.n: dict[str, int] = {}

    def reset(self) -> None:
        self.t.clear()
        self.n.clear()

    def add(self, key: str, dt: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + dt
        self.n[key] = self.n.get(key, 0) + 1

    def wrap(self, key: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(key, time.perf_counter() - t0)
        return timed

    def __getitem__(self, key: str) -> float:
        return self.t.get(key, 0.0)


class TimedSocket:
    """Stands in for the aggregator's socket: times poll (waiting) and recv_multipart."""

    def __init__(self, sock, timers: Timers):
        self._sock, self._timers = sock, timers
        self.poll = timers.wrap("wait", sock.poll)
        self.recv_multipart = timers.wrap("recv_zmq", sock.recv_multipart)
        self.send_multipart = timers.wrap("send_zmq", sock.send_multipart)

    def __getattr__(self, name):
        return getattr(self._sock, name)


# -- the benchmark -----------------------------------------------------------------------------
def payload_state(kind: str) -> dict[str, np.ndarray]:
    from bench_wire import full_shapes, lora_shapes, make_state
    return make_state(lora_shapes() if kind == "lora-r8" else full_shapes())


def strategy_for(kind: str):
    from testbed.scenario import TrainingConfig
    from testbed.strategies import Context, FedLoRA, Full
    ctx = Context(training=TrainingConfig(), max_len=32, num_blocks=6, seed=0)
    return FedLoRA({"rank": 8}, ctx) if kind == "lora-r8" else Full({"last_blocks": 2}, ctx)


def run_n(n_nodes: int, kinds: list[str], rounds: int, warmup: int, train_s: float) -> list[dict]:
    from testbed.aggregator import Aggregator
    from testbed.strategies import NodeInfo, Update

    names = [f"node-{i:03d}" for i in range(n_nodes)]
    welcome = lambda name: ({"model": {}, "data": {}}, {"shard": np.arange(10, dtype=np.int32)})  # noqa: E731
    agg = Aggregator("bench-agg", {n: "bench" for n in names}, welcome, bind="127.0.0.1")
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-nodes", agg.endpoint,
                              "--names", ",".join(names), "--train-s", str(train_s)])
    alive = lambda name: child.poll() is None  # noqa: E731
    timers = Timers()
    real_encode, real_decode = P.encode, P.decode
    rows = []
    try:
        from testbed.rounds import check_result  # the round loop's real check (slow import: overlaps node start)
        ready = agg.wait_ready(set(names), 60.0, alive)
        if ready != set(names):
            raise RuntimeError(f"only {len(ready)} of {n_nodes} fake nodes registered")
        # instrument: module functions the aggregator calls through `P.`, its socket, its methods
        P.encode, P.decode = timers.wrap("encode", real_encode), timers.wrap("decode", real_decode)
        agg.sock = TimedSocket(agg.sock, timers)
        agg.send = timers.wrap("send", agg.send)
        agg._handle = timers.wrap("handle", agg._handle)
        check = timers.wrap("check", lambda n, sent, msg: check_result(sent, msg))
        rnd = 0
        for kind in kinds:
            strat, state = strategy_for(kind), payload_state(kind)
            mb = sum(v.nbytes for v in state.values()) / 1e6
            per = []
            for r in range(warmup + rounds):
                rnd += 1
                tasks = strat.configure(rnd, [NodeInfo(n, None, SAMPLES) for n in names], state)
                timers.reset()
                c0, t0 = time.process_time(), time.perf_counter()
                out = agg.run_round(rnd, strat.name, {n: (t.plan.to_dict(), t.tensors) for n, t in tasks.items()},
                                    120.0, alive, check)
                t1 = time.perf_counter()
                updates = [Update(n, tasks[n].plan, dict(m.tensors), int(m.meta["samples"]), dict(m.meta))
                           for n, m in out.results.items()]
                state, _ = strat.aggregate(rnd, updates, state)
                t2, c2 = time.perf_counter(), time.process_time()
                if len(updates) != n_nodes:
                    bad = {k: (v.status, v.reason) for k, v in out.records.items() if v.status != "ok"}
                    raise RuntimeError(f"round {rnd}: {len(updates)} of {n_nodes} results; {list(bad.items())[:3]}")
                if r < warmup:
                    continue
                wall = t2 - t0
                per.append({"wall": wall, "wait": timers["wait"], "send": timers["send"], "encode": timers["encode"],
                            "recv": timers["recv_zmq"] + timers["handle"], "decode": timers["decode"],
                            "check": timers["check"], "aggregate": t2 - t1, "overhead": wall - timers["wait"],
                            "cpu": c2 - c0})
            med = {k: statistics.median(p[k] for p in per) for k in per[0]}
            rows.append({"nodes": n_nodes, "payload": kind, "mb": mb, "rounds": len(per), **med})
            print_row(rows[-1], train_s)
    finally:
        P.encode, P.decode = real_encode, real_decode
        close(agg, child)
    return rows


def close(agg, child: subprocess.Popen) -> None:
    """Say BYE to the fake nodes and wait for their process to leave (killed after 15 s)."""
    try:
        agg.close(say_bye=True)
    finally:
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


HEAD = (f"{'nodes':>5} {'payload':<10} {'MB/node':>7} {'rounds':>6} {'wall s':>7} {'send s':>7} {'recv s':>7} "
        f"{'check s':>7} {'aggr s':>7} {'overhead s':>10} {'overhead':>8} {'cpu s':>6} {'wall-train s':>12}")


def print_row(r: dict, train_s: float) -> None:
    print(f"{r['nodes']:>5} {r['payload']:<10} {r['mb']:>7.2f} {r['rounds']:>6} {r['wall']:>7.3f} {r['send']:>7.3f} "
          f"{r['recv']:>7.3f} {r['check']:>7.3f} {r['aggregate']:>7.3f} {r['overhead']:>10.3f} "
          f"{r['overhead'] / r['wall']:>8.1%} {r['cpu']:>6.3f} {r['wall'] - train_s:>12.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 and 16 nodes, 1 measured round, no warm-up")
    ap.add_argument("--nodes", default=None, help="comma-separated node counts (default 4,16,64; quick 4,16)")
    ap.add_argument("--train-s", type=float, default=0.5, help="emulated training time per task (sleep)")
    ap.add_argument("--rounds", type=int, default=None, help="measured rounds per case (default 3; quick 1)")
    ap.add_argument("--serve-nodes", metavar="ENDPOINT", help=argparse.SUPPRESS)
    ap.add_argument("--names", default="", help=argparse.SUPPRESS)
    ap.add_argument("--stagger-s", type=float, default=0.0, help=argparse.SUPPRESS)  # bench_aggregator_memory
    a = ap.parse_args(argv)
    if a.serve_nodes:
        return serve_nodes(a.serve_nodes, a.names.split(","), a.train_s, stagger_s=a.stagger_s)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    counts = [int(x) for x in a.nodes.split(",")] if a.nodes else ([4, 16] if a.quick else [4, 16, 64])
    rounds = a.rounds or (1 if a.quick else 3)
    warmup = 0 if a.quick else 1
    t_start = time.perf_counter()
    print(f"bench_aggregator: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, numpy {np.__version__}, pyzmq {zmq.__version__}; "
          f"train {a.train_s} s per task, median of {rounds} round(s) after {warmup} warm-up"
          f"{' (quick)' if a.quick else ''}")
    print(HEAD)
    print("-" * len(HEAD))
    try:
        for n in counts:
            run_n(n, ["lora-r8", "full-last2"], rounds, warmup, a.train_s)
    finally:
        zmq.Context.instance().term()
    print("(wall = run_round + aggregate; overhead = wall - time blocked waiting for nodes, of which send/recv/"
          "check/aggr are parts; cpu = aggregator process CPU s in the round; "
          f"ran {time.perf_counter() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
