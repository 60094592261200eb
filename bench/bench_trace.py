#!/usr/bin/env python
"""Rate-trace fidelity: the rate a link delivers in each step of a trace against the step's rate.

One trace (default: 20, 5, 10, 2, 8 Mbit/s, 3 s per step) is replayed on the two ways the
testbed shapes a link, while a sender keeps the link full:

- **netns** (needs root): the netns backend's shaping, exactly as it steps a traced node: the
  node's `emulation.netns.VethLink` is shaped with `shape(Shaping(R, 0), Shaping(R, 0))` at each
  step, which changes the htb class in place. The topology is bench_link.py's (a bridge on a free
  10.231.k.0/24, the receiver at the bridge address in the host, where the aggregator runs). A
  TCP sender in the node namespace (uplink) or in the host (downlink) writes as fast as it can;
  the receiver counts bytes per 50 ms by CLOCK_MONOTONIC (one clock for every namespace).
- **process**: the node's transport, `node.shaping.Link` with the trace as its schedule (as a
  traced node's tasks carry it), sending 16 KiB messages over a socket pair; the receiver counts
  bytes as above.

For each step this prints the set rate, the rate delivered from `--settle` seconds after the step
to its end (TCP needs a moment to grow into a faster step), their ratio and, for netns, the ratio
to the TCP/IP ceiling at MTU 1500 (rate x 1448/1514: what TCP can carry at best). Nothing asserts;
everything made here (namespaces, interfaces, processes) is removed at the end, on error and on
Ctrl-C. Traffic stays on the bridge and in the namespace made here.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

CEILING = 1448 / 1514
PORT = 5301
BUCKET_S = 0.05
CHUNK = 16 * 1024


# -- the two ends, as separate processes (one may sit in the namespace) -------------------------
def peer(args) -> int:
    if args.peer == "send":
        s = socket.create_connection((args.addr, args.port), timeout=10)
        buf = bytes(65536)
        try:
            while True:
                s.sendall(buf)
        except (BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
            return 0
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.addr, args.port))
    srv.listen(1)
    print("listening", flush=True)
    conn, _ = srv.accept()
    print(json.dumps(count(conn, args.seconds)), flush=True)
    return 0


def count(conn, seconds: float) -> dict:
    """Bytes received per BUCKET_S of CLOCK_MONOTONIC, for `seconds`."""
    buckets: dict[int, int] = {}
    end = time.monotonic() + seconds
    conn.settimeout(0.5)
    while time.monotonic() < end:
        try:
            n = len(conn.recv(1 << 20))
        except socket.timeout:
            continue
        if not n:
            break
        k = int(time.monotonic() / BUCKET_S)
        buckets[k] = buckets.get(k, 0) + n
    return {str(k): v for k, v in buckets.items()}


def per_step(buckets: dict, t0: float, steps: list[tuple[float, float]], step_s: float, settle_s: float):
    """(set rate, delivered Mbit/s) per step, from settle_s after its start to its end."""
    out = []
    for i, (at, rate) in enumerate(steps):
        lo, hi = t0 + at + settle_s, t0 + at + step_s
        got = sum(v for k, v in buckets.items() if lo <= int(k) * BUCKET_S and (int(k) + 1) * BUCKET_S <= hi)
        span = (int(hi / BUCKET_S) - int(lo / BUCKET_S + 0.999999)) * BUCKET_S
        out.append((rate, got * 8 / span / 1e6))
    return out


def show(title: str, rows, ceiling: bool) -> None:
    print(title)
    head = f"  {'step':>4} {'set Mbit/s':>11} {'delivered':>10} {'x/set':>7}" + (f" {'x/(set*0.956)':>14}" if ceiling else "")
    print(head)
    for i, (rate, got) in enumerate(rows):
        line = f"  {i:>4} {rate:>11.2f} {got:>10.3f} {got / rate:>7.3f}"
        print(line + (f" {got / (rate * CEILING):>14.3f}" if ceiling else ""))
    worst = max(abs((got / (rate * CEILING) if ceiling else got / rate) - 1) for rate, got in rows)
    print(f"  largest deviation per step: {worst * 100:.1f}% (of {'the TCP ceiling' if ceiling else 'the set rate'})")


# -- process: the node's transport ---------------------------------------------------------------
def bench_process(steps, step_s: float, settle_s: float) -> None:
    from node.shaping import Link
    a, b = socket.socketpair()
    t0 = time.monotonic() + 0.2
    link = Link(steps[0][1], 0.0, schedule=[(t0 + at, r) for at, r in steps])
    total = len(steps) * step_s
    result = {}
    rx = threading.Thread(target=lambda: result.update(count(b, total + 0.5)))
    rx.start()
    while time.monotonic() < t0:
        time.sleep(0.01)
    buf = bytes(CHUNK)
    while time.monotonic() < t0 + total:
        link.transfer(CHUNK)
        a.sendall(buf)
    rx.join()
    a.close()
    b.close()
    show("process backend: node.shaping.Link with the trace as its schedule (16 KiB messages)",
         per_step(result, t0, steps, step_s, settle_s), ceiling=False)


# -- netns: htb stepped in place ----------------------------------------------------------------
def bench_netns(steps, step_s: float, settle_s: float, downlink: bool) -> None:
    import subprocess

    from bench_link import Procs, build, teardown
    from emulation import netns as N
    tag = secrets.token_hex(2)
    created, procs = [], Procs()
    try:
        net = build(tag, created, server_ns=False)
        link = net["link"]
        link.shape(N.Shaping(steps[0][1], 0), N.Shaping(steps[0][1], 0), netem=False)
        total = len(steps) * step_s
        me = [sys.executable, str(Path(__file__).resolve())]
        here, there = ([], net["node"].exec_prefix())
        rx_prefix, tx_prefix = (there, here) if downlink else (here, there)
        rx_addr = net["node_ip"] if downlink else net["server_ip"]
        rx = procs.start([*rx_prefix, *me, "--peer", "recv", "--addr", rx_addr, "--port", str(PORT),
                          "--seconds", f"{total + 1.5:g}"], stdout=subprocess.PIPE, text=True)
        if rx.stdout.readline().strip() != "listening":
            raise RuntimeError("the receiver did not start")
        tx = procs.start([*tx_prefix, *me, "--peer", "send", "--addr", rx_addr, "--port", str(PORT)])
        t0 = time.monotonic() + 1.0  # the connection is up and full by then
        for at, rate in steps:
            while time.monotonic() < t0 + at:
                time.sleep(0.002)
            link.shape(N.Shaping(rate, 0), N.Shaping(rate, 0), netem=False)
        out, _ = rx.communicate(timeout=total + 30)
        procs.stop(tx)
        rows = per_step(json.loads(out.strip().splitlines()[-1]), t0, steps, step_s, settle_s)
        show(f"netns backend, {'downlink (host -> node)' if downlink else 'uplink (node -> host)'}: htb class "
             "changed in place at each step (TCP goodput)", rows, ceiling=True)
    finally:
        procs.stop_all()
        teardown(created)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="20,5,10,2,8", help="Mbit/s of the trace's steps")
    ap.add_argument("--step-s", type=float, default=3.0, help="seconds per step")
    ap.add_argument("--settle-s", type=float, default=0.5, help="left out at the start of each step")
    ap.add_argument("--quick", action="store_true", help="2 s per step, uplink only")
    ap.add_argument("--peer", choices=["send", "recv"], help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=PORT, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer:
        return peer(args)
    step_s = 2.0 if args.quick else args.step_s
    steps = [(i * step_s, float(r)) for i, r in enumerate(args.rates.split(","))]
    print(f"trace: {', '.join(f'{r:g}' for _, r in steps)} Mbit/s, {step_s:g} s per step; "
          f"each step measured from {args.settle_s:g} s after its start")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bench_process(steps, step_s, args.settle_s)
    if os.geteuid() != 0:
        print("netns: not run (needs root for namespaces and tc)")
        return 0
    for downlink in ((False,) if args.quick else (False, True)):
        bench_netns(steps, step_s, args.settle_s, downlink)
    return 0


if __name__ == "__main__":
    sys.exit(main())
