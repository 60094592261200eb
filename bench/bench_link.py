#!/usr/bin/env python
"""Link fidelity: goodput through the testbed's own shaped links against the rate that was set.

Needs root (network namespaces, veth, tc). Builds, with the project's own classes
(emulation.netns: pick_subnet, Bridge, Namespace, VethLink, Shaping), one bridge on a free
10.231.k.0/24 and a node namespace attached to it by a shaped veth; the server end is the
bridge address in the host, where the netns backend puts the aggregator (default), or with
`--server ns` a second namespace on an unshaped veth of the same bridge:

    server: host 10.231.k.1 on bridge fe<tag>b  [or fedge-<tag>-server, unshaped veth]
        --  (shaped veth fe<tag>h<i> / fe<tag>n<i>)  --  fedge-<tag>-node

(`--server ns` needs the bridge to forward between its ports: with br_netfilter loaded and an
iptables FORWARD policy of DROP, which dockerd sets, that traffic is dropped; the script then
says so and stops.) The shaped devices and the bridge have GSO capped at one frame, as the
testbed's own shaping does (emulation.netns.cap_gso): without it htb releases whole 64 KB GSO
packets and a 1 Mbit/s link ran 7% fast.

The node's veth is shaped exactly as the netns backend shapes a device:
`VethLink.shape(Shaping(R, 0), Shaping(R, 0), netem=False)` (htb, uplink on the node side,
downlink on the host side). For each rate R and direction (uplink = node -> server, downlink =
server -> node) this prints:

- iperf3 Mbit/s: TCP goodput of `iperf3 -c ... -J` (`-R` for downlink), as received;
- protocol Mbit/s: one RESULT-like message (node.protocol.encode of one float32 tensor of
  about 2 s of traffic at R, at least 1 MB) from a ZeroMQ DEALER to a ROUTER (uplink) or from
  the ROUTER to the DEALER (downlink); both are this script re-run with `--peer`, the DEALER in
  the node namespace (`ip netns exec`), the ROUTER at the server end: message bytes x 8 /
  (time from just before encode on the
  sender until the receiver has received and decoded all of it; both ends read the same
  CLOCK_MONOTONIC), after a HELLO/WELCOME exchange that opened the connection;
- each against the rate (x/rate) and against the TCP/IP header ceiling at MTU 1500,
  rate x 1448/1514 = rate x 0.956 (x/(rate*0.956); 1.0 = as good as TCP can be).

Then latency: if the kernel has netem (emulation.probe.qdiscs()), the node's link is reshaped
with a netem delay of 20 ms each way and ping (or, without ping, nothing) measures the RTT
against 40 ms. Without netem the testbed emulates latency in the transport (node/shaping.py),
so the fidelity of `node.shaping.Link(0, 20).transfer(100)` against 20 ms is reported instead.

Every namespace, interface and process made here is removed at the end, also on error and on
Ctrl-C / SIGTERM. Traffic stays on the bridge and in the namespaces made here. Nothing asserts
on time.
`--quick`: 5 and 20 Mbit/s, uplink only, short runs (< 30 s).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CEILING = 1448 / 1514          # TCP payload per Ethernet frame at MTU 1500 (timestamps on)
IPERF_PORT = 5201
ZMQ_PORT = 5555
HANDSHAKE_S = 10.0             # no connection within this: the bridge does not forward (see --server)


# =====================================================================================
# peer role: runs inside a namespace, one end of the ZeroMQ transfer
# =====================================================================================
def peer(args) -> int:
    import numpy as np
    import zmq
    from node import protocol as P

    ctx = zmq.Context()
    if args.peer == "router":
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(f"tcp://{args.addr}:{args.port}")
    else:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(f"tcp://{args.addr}:{args.port}")
    sock.setsockopt(zmq.LINGER, 0)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)

    def recv(timeout_s=args.timeout):
        if not poller.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"{args.peer}: nothing received within {timeout_s:.0f} s")
        frames = sock.recv_multipart(copy=False)
        if args.peer == "router":
            return frames[0].bytes, frames[1:]
        return None, frames

    def send(ident, frames):
        sock.send_multipart(([ident] if ident is not None else []) + frames, copy=False)

    try:
        # handshake: opens the TCP connection (and gives the ROUTER the DEALER's identity)
        if args.peer == "dealer":
            send(None, P.encode(P.Message(P.HELLO, meta={"name": "bench"})))
            _, frames = recv(HANDSHAKE_S)
            assert P.decode(frames).type == P.WELCOME
            ident = None
        else:
            ident, frames = recv(HANDSHAKE_S)
            assert P.decode(frames).type == P.HELLO
            send(ident, P.encode(P.Message(P.WELCOME, run="bench")))
        if args.role == "send":
            payload = np.random.default_rng(0).standard_normal(args.nbytes // 4, dtype=np.float32)
            time.sleep(0.2)  # the receiver is polling by now
            t0 = time.monotonic()
            frames = P.encode(P.Message(P.RESULT if args.peer == "dealer" else P.TASK, run="bench", round=1,
                                        meta={"samples": 100}, tensors={"payload": payload}))
            nbytes = P.frames_nbytes(frames)
            send(ident, frames)
            _, ack = recv()
            msg = P.decode(ack)
            print(json.dumps({"t0": t0, "t1": msg.meta["t1"], "bytes": nbytes, "recv_bytes": msg.meta["bytes"]}))
        else:
            _, frames = recv()
            msg = P.decode(frames)
            t1 = time.monotonic()
            nbytes = P.frames_nbytes(frames)
            assert msg.tensors["payload"].size * 4 == nbytes - len(frames[0].bytes)
            send(ident, P.encode(P.Message(P.BYE, run="bench", meta={"t1": t1, "bytes": nbytes})))
            time.sleep(0.5)  # let the ack leave before the socket closes (LINGER 0)
    finally:
        sock.close(0)
        ctx.term()
    return 0


# =====================================================================================
# orchestration (root)
# =====================================================================================
class Procs:
    """Every process started here, to be killed on the way out."""

    def __init__(self):
        self.items: list[subprocess.Popen] = []

    def start(self, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        self.items.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        if p in self.items:
            self.items.remove(p)

    def stop_all(self) -> None:
        for p in list(self.items):
            self.stop(p)


def iperf3(net, procs: Procs, rate: float, downlink: bool, seconds: float) -> float | None:
    cmd = [*net["node"].exec_prefix(), "iperf3", "-c", net["server_ip"], "-p", str(IPERF_PORT),
           "-t", f"{seconds:g}", "-J", "--connect-timeout", "5000"] + (["-R"] if downlink else [])
    p = procs.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=seconds + 30)
    finally:
        procs.stop(p)
    try:
        res = json.loads(out)
        if "error" in res:
            raise ValueError(res["error"])
        return res["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError, TypeError) as exc:
        print(f"  iperf3 at {rate:g} Mbit/s {'down' if downlink else 'up'}: failed: {exc} {err.strip()[:200]}")
        return None


def protocol(net, procs: Procs, rate: float, downlink: bool, nbytes: int) -> float | None:
    """Send one encoded message across the shaped link; Mbit/s of message bytes."""
    expected = nbytes * 8 / (rate * 1e6 * CEILING)
    timeout = expected * 4 + 20
    me = [sys.executable, str(Path(__file__).resolve()), "--timeout", f"{timeout:.0f}", "--nbytes", str(nbytes)]
    router = [*net["server_prefix"], *me, "--peer", "router", "--addr", net["server_ip"],
              "--port", str(ZMQ_PORT), "--role", "send" if downlink else "recv"]
    dealer = [*net["node"].exec_prefix(), *me, "--peer", "dealer", "--addr", net["server_ip"],
              "--port", str(ZMQ_PORT), "--role", "recv" if downlink else "send"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pr = procs.start(router, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pd = procs.start(dealer, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sender = pr if downlink else pd
    try:
        outs = {}
        for name, p in (("router", pr), ("dealer", pd)):
            outs[name] = p.communicate(timeout=timeout + 10)
            if p.returncode != 0:
                raise RuntimeError(f"{name} exited with {p.returncode}: "
                                   f"{(outs[name][1].strip().splitlines() or [''])[-1][:300]}")
        res = json.loads(outs["router" if sender is pr else "dealer"][0].strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 - report and go on with the other rows
        print(f"  protocol at {rate:g} Mbit/s {'down' if downlink else 'up'}: failed: {type(exc).__name__}: {exc}")
        return None
    finally:
        procs.stop(pr)
        procs.stop(pd)
    return res["bytes"] * 8 / (res["t1"] - res["t0"]) / 1e6


def ping_rtt(net, count: int) -> list[float] | None:
    if not shutil.which("ping"):
        return None
    r = subprocess.run([*net["node"].exec_prefix(), "ping", "-n", "-c", str(count), "-i", "0.2", net["server_ip"]],
                       capture_output=True, text=True, timeout=count + 20)
    rtts = [float(tok.split("=")[1]) for line in r.stdout.splitlines() for tok in line.split() if tok.startswith("time=")]
    return rtts or None


def latency(net, netem: bool, quick: bool) -> None:
    from emulation import netns as N
    from node.shaping import Link
    delay = 20.0
    print()
    if netem:
        print(f"netem is available: node link reshaped with a netem delay of {delay:g} ms each way "
              f"(Shaping(0, {delay:g}) up and down), RTT measured with ping against {2 * delay:g} ms")
        base = ping_rtt(net, 5)
        try:
            net["link"].shape(N.Shaping(0, delay), N.Shaping(0, delay), netem=True)
        except N.NetError as exc:
            print(f"  could not add netem: {exc}")
            return
        rtts = ping_rtt(net, 5 if quick else 20)
        if rtts is None:
            print("  ping is not installed (apt-get install -y iputils-ping): latency not measured")
            return
        med = statistics.median(rtts)
        print(f"  unshaped RTT median {statistics.median(base):.3f} ms" if base else "")
        print(f"  RTT ms: median {med:.3f}  min {min(rtts):.3f}  max {max(rtts):.3f}  (n={len(rtts)})  "
              f"median/{2 * delay:g} ms = {med / (2 * delay):.4f}")
        return
    print("netem is NOT available in this kernel: latency is emulated in the transport (node/shaping.py),")
    print(f"so what is measured is node.shaping.Link(0, {delay:g}).transfer(100) against {delay:g} ms "
          "(a fresh Link per call)")
    n = 10 if quick else 50
    spent = []
    for _ in range(n):
        t0 = time.monotonic()
        Link(0, delay).transfer(100)
        spent.append((time.monotonic() - t0) * 1e3)
    med = statistics.median(spent)
    print(f"  transfer ms: median {med:.3f}  min {min(spent):.3f}  max {max(spent):.3f}  (n={n})  "
          f"median/{delay:g} ms = {med / delay:.4f}  max/{delay:g} ms = {max(spent) / delay:.4f}")


def build(tag: str, created: list, server_ns: bool):
    """Bridge, node namespace (and server namespace); everything made is appended to `created`.

    The server is the bridge address in the host's namespace (as the netns backend places the
    aggregator) or, with `server_ns`, a second namespace on an unshaped veth of the same bridge.
    """
    from emulation import netns as N
    subnet = N.pick_subnet(tag)
    hosts = list(subnet.hosts())
    plen = subnet.prefixlen
    bridge = N.Bridge(f"{N.IF_PREFIX}{tag}b", f"{hosts[0]}/{plen}")
    created.append(bridge)  # before create(): a half-made object is deleted too (delete() tolerates absence)
    bridge.create()
    net = {"bridge": bridge, "subnet": str(subnet), "server_prefix": [], "server_ip": bridge.ip,
           "server_desc": f"host (bridge address {bridge.ip})"}
    for i, role in enumerate(("server", "node") if server_ns else ("node",)):
        ns = N.Namespace(f"{N.NS_PREFIX}{tag}-{role}")
        created.append(ns)
        ns.create()
        link = N.VethLink(f"{N.IF_PREFIX}{tag}h{i}", f"{N.IF_PREFIX}{tag}n{i}", ns, f"{hosts[1 + i]}/{plen}")
        created.append(link)
        link.create(bridge)
        if role == "node":
            net.update(node=ns, node_ip=str(hosts[1 + i]), link=link)
        else:
            net.update(server_prefix=ns.exec_prefix(), server_ip=str(hosts[1 + i]), server_link=link,
                       server_desc=f"namespace {ns.name} {hosts[1 + i]} (unshaped veth)")
    return net


def bridge_filter_warning() -> str | None:
    """br_netfilter + iptables FORWARD policy DROP (what dockerd sets) drops namespace-to-namespace traffic on a bridge."""
    try:
        if Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip() != "1":
            return None
        r = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if "-P FORWARD DROP" in r.stdout:
        return ("bridge-nf-call-iptables=1 and iptables FORWARD policy DROP (dockerd sets both): traffic between two "
                "namespaces on the bridge is dropped; use the default --server host")
    return None


def teardown(created: list) -> None:
    for obj in reversed(created):
        try:
            obj.delete()
        except Exception as exc:  # noqa: BLE001 - keep removing the rest
            print(f"cleanup: {obj}: {exc}", file=sys.stderr)
    created.clear()


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 and 20 Mbit/s, uplink only, short runs (< 30 s)")
    ap.add_argument("--rates", default=None, help="comma-separated Mbit/s (default 1,5,20,100; quick 5,20)")
    ap.add_argument("--seconds", type=float, default=None, help="iperf3 duration (default 5; quick 3)")
    ap.add_argument("--server", choices=["host", "ns"], default="host",
                    help="where the server end runs: the bridge address in the host (default, as the netns backend "
                         "places the aggregator) or a second, unshaped namespace on the bridge")
    # peer mode (internal: runs inside a namespace)
    ap.add_argument("--peer", choices=["router", "dealer"], help=argparse.SUPPRESS)
    ap.add_argument("--role", choices=["send", "recv"], help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=ZMQ_PORT, help=argparse.SUPPRESS)
    ap.add_argument("--nbytes", type=int, default=1 << 20, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=60, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer:
        return peer(args)

    if os.geteuid() != 0:
        print("bench_link.py needs root (network namespaces, veth, tc); run it as root.")
        return 2
    from emulation import netns as N
    from emulation.probe import qdiscs

    rates = [float(r) for r in args.rates.split(",")] if args.rates else ([5.0, 20.0] if args.quick else [1.0, 5.0, 20.0, 100.0])
    directions = [False] if args.quick else [False, True]
    seconds = args.seconds or (3.0 if args.quick else 5.0)
    have_iperf = shutil.which("iperf3") is not None

    t_start = time.monotonic()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} on {os.cpu_count()} cores")
    q = qdiscs()
    print("tc qdiscs: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in q.items()))
    print(f"netem available: {'yes' if q.get('netem') else 'no'}")
    if not have_iperf:
        print("iperf3 is NOT installed: the iperf3 columns are skipped (install it with `apt-get install -y iperf3`)")

    tag = secrets.token_hex(2)
    created: list = []
    procs = Procs()
    old_term = signal.signal(signal.SIGTERM, _sigterm)
    rows = []
    try:
        net = build(tag, created, args.server == "ns")
        print(f"bridge {net['bridge'].name} {net['subnet']}: server = {net['server_desc']}, "
              f"node = namespace {net['node'].name} {net['node_ip']} "
              "(htb: VethLink.shape(Shaping(R, 0), Shaping(R, 0), netem=False))")
        if args.server == "ns" and (w := bridge_filter_warning()):
            print(f"cannot measure: {w}")
            return 2
        if "server_link" in net:  # the sender's own device sets the size of what it hands to the bridge
            N.cap_gso(net["server_link"].ns.exec_prefix(), net["server_link"].node_if)
        if have_iperf:
            srv = procs.start([*net["server_prefix"], "iperf3", "-s", "-B", net["server_ip"], "-p", str(IPERF_PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            if srv.poll() is not None:
                print("iperf3 server did not start: iperf3 columns skipped")
                have_iperf = False
        print()
        hdr = (f"{'direction':9} {'rate Mbit/s':>11} {'iperf3 Mbit/s':>13} {'iperf3/rate':>11} {'iperf3/(rate*0.956)':>19} "
               f"{'protocol Mbit/s':>15} {'protocol/rate':>13} {'protocol/(rate*0.956)':>21} {'MB sent':>7}")
        print(hdr)
        print("-" * len(hdr))
        for downlink in directions:
            for rate in rates:
                net["link"].shape(N.Shaping(rate, 0), N.Shaping(rate, 0), netem=False)
                ip = iperf3(net, procs, rate, downlink, seconds) if have_iperf else None
                nbytes = int(max(1e6, rate * 1e6 / 8 * 2)) // 4 * 4
                pm = protocol(net, procs, rate, downlink, nbytes)
                f = lambda v, w, d=3: f"{v:>{w}.{d}f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
                row = (f"{'downlink' if downlink else 'uplink':9} {rate:>11g} {f(ip, 13, 2)} "
                       f"{f(ip / rate if ip else None, 11)} {f(ip / (rate * CEILING) if ip else None, 19)} "
                       f"{f(pm, 15, 2)} {f(pm / rate if pm else None, 13)} {f(pm / (rate * CEILING) if pm else None, 21)} "
                       f"{nbytes / 1e6:>7.2f}")
                print(row, flush=True)
                rows.append(row)
        latency(net, bool(q.get("netem")), args.quick)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        teardown(created)
        signal.signal(signal.SIGTERM, old_term)
        left = N.leftovers(tag)
        if left["namespaces"] or left["interfaces"]:
            print(f"WARNING: left behind: {left}", file=sys.stderr)
    print(f"\ntotal {time.monotonic() - t_start:.1f} s; load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
