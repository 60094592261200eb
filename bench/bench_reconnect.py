"""How soon a node gets through once a path that dropped its connection attempts recovers, with and
without a bound on each TCP connect (ZMQ_CONNECT_TIMEOUT). Needs root (a namespace, iptables in it).

A node in its own namespace connects to a ROUTER on the bridge while the answers to its SYNs are
dropped (an iptables rule inside that namespace only) for BLOCK_S; then the rule goes. Without a
bound the kernel's SYN retransmissions back off (on this kernel 1 s apart four times, then 2, 4, 8,
16 s apart), so the connection comes at the next retransmission after the path recovered; with
one, libzmq abandons an attempt after the bound and starts a fresh one. Prints the seconds from
recovery to the first message, for each setting.

    .venv/bin/python bench/bench_reconnect.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_link import build, teardown  # noqa: E402  (one namespace on a bridge, as the netns backend makes it)
from emulation import netns as N  # noqa: E402
from node.agent import CONNECT_TIMEOUT_S  # noqa: E402

BLOCK_S = float(os.environ.get("BLOCK_S", 8))
NODE = """
import sys, time, zmq
s = zmq.Context().socket(zmq.DEALER)
s.setsockopt(zmq.CONNECT_TIMEOUT, int(sys.argv[2]))
s.connect(sys.argv[1]); s.send(b"hello"); time.sleep(150)  # killed once the message is in
"""


def recovery_s(bound_ms: int) -> float:
    created: list = []
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    node = None
    try:
        net = build(uuid.uuid4().hex[:4], created, server_ns=False)  # the aggregator's place: the bridge
        ns, server = net["node"], net["server_ip"]
        port = router.bind_to_random_port(f"tcp://{server}")
        # the answers to its SYNs are lost (a rule on OUTPUT would fail connect() at once: EPERM)
        drop = ["INPUT", "-p", "tcp", "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "DROP"]
        N.sh(*ns.exec_prefix(), "iptables", "-A", *drop)
        node = subprocess.Popen([*ns.exec_prefix(), sys.executable, "-c", NODE, f"tcp://{server}:{port}",
                                 str(bound_ms)])
        time.sleep(BLOCK_S)
        N.sh(*ns.exec_prefix(), "iptables", "-D", *drop)
        recovered = time.monotonic()
        if not router.poll(120_000):
            raise RuntimeError("no message within 120 s of the path's recovery")
        return time.monotonic() - recovered
    finally:
        router.close()
        if node is not None:
            node.kill()
            node.wait()
        teardown(created)  # the namespace goes with its iptables rule


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench_reconnect needs root (a network namespace and iptables inside it)")
    print(f"SYN-ACKs dropped for the first {BLOCK_S:.0f} s; seconds from the path's recovery to the first message:")
    got, bound = {}, int(CONNECT_TIMEOUT_S * 1000)  # the node's setting
    for bound_ms in (0, bound):
        got[bound_ms] = recovery_s(bound_ms)
        print(f"  ZMQ_CONNECT_TIMEOUT {bound_ms / 1000:.0f} s{' (none: the kernel decides)' if not bound_ms else ''}: "
              f"{got[bound_ms]:.2f} s")
    print(f"ratio (bounded / unbounded): {got[bound] / got[0]:.2f}")


if __name__ == "__main__":
    main()
