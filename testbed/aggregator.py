"""The aggregator's network side: a ZeroMQ ROUTER that registers nodes and runs rounds.

One socket, one thread, a poll loop. Every inbound message is decoded and validated; a bad
one is logged and answered with ERROR (or dropped when the peer cannot be answered), and the
loop goes on: no input from the network can stop the aggregator.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Callable

import msgpack
import numpy as np
import zmq

from node import protocol as P
from node.plan import block_of

from .spill import tensor_sizes

log = logging.getLogger("testbed.aggregator")
MISSED = "missed the round deadline"  # the reason of a node still out when a round's deadline passed


@dataclass
class Peer:
    name: str
    peer_id: bytes
    phase: str = "hello"
    ready: bool = False
    last_seen: float = 0.0
    hello: dict = field(default_factory=dict)
    error: str | None = None
    phase_at: dict = field(default_factory=dict)   # (round, phase) -> arrival time of that HEARTBEAT


@dataclass
class NodeRecord:
    """One node's part in one round: the `nodes` entries of rounds.jsonl."""
    node: str
    profile: str
    status: str = "dropped"          # ok | dropped | failed | rejected
    compute_s: float = 0.0
    cpu_s: float = 0.0               # host CPU seconds of the training (not dilated), where the node reports them
    upload_s: float = 0.0
    download_s: float = 0.0
    wait_s: float = 0.0
    peak_mem_mb: float = 0.0
    host_short_s: float = 0.0        # compute time the host added by giving less CPU than the share (cpu clock)
    bytes_up: int = 0
    bytes_down: int = 0
    reason: str | None = None


@dataclass
class RoundOutcome:
    results: dict[str, P.Message]
    records: dict[str, NodeRecord]
    wall_real_s: float
    answered: set[str] = field(default_factory=set)  # nodes whose RESULT or ERROR came back
    started_at: float = 0.0                          # time.monotonic() when the first task went out
    done_at: dict[str, float] = field(default_factory=dict)  # when each node left the round (answered or exited)
    released_at: float | None = None                 # when the round was released (testbed/release.py)
    released_s: dict[str, float] = field(default_factory=dict)  # real seconds the release took off each node's wait


class Aggregator:
    def __init__(self, run_id: str, expected: dict[str, str], welcome: Callable[[str], tuple[dict, dict]],
                 bind: str = "127.0.0.1", port: int = 0, keys=None, max_frame_bytes: int = P.MAX_FRAME_BYTES):
        """`expected`: node name -> profile name; `welcome(name)` gives that node's WELCOME (meta, tensors);
        `keys` (testbed.auth.RunKeys): admit only CURVE clients with the run's node keys;
        a peer that sends a frame larger than `max_frame_bytes` is disconnected by ZeroMQ before
        the frame is buffered."""
        self.run_id, self.expected, self.welcome = run_id, expected, welcome
        self.keys, self.authenticator = keys, None
        if keys is not None:  # its own context: one ZAP handler per context
            from .auth import NodeAuthenticator
            self.ctx = zmq.Context()
            self.authenticator = NodeAuthenticator(self.ctx, keys)
            self.authenticator.start()
        else:
            self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, int(max_frame_bytes))
        self.monitor = None
        self.handshake_failures = 0  # CURVE handshakes that failed before any key check (no or bad CURVE)
        if keys is not None:
            self.sock.curve_server = True
            self.sock.curve_secretkey = keys.server_secret.encode()
            self.sock.curve_publickey = keys.server_public.encode()
            self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                                        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        if port:
            self.sock.bind(f"tcp://{bind}:{port}")
        else:
            port = self.sock.bind_to_random_port(f"tcp://{bind}")
        self.bind, self.port = bind, port
        self.extra_endpoints: list[str] = []
        self.peers: dict[str, Peer] = {}
        self.by_id: dict[bytes, str] = {}
        self.traffic: Counter = Counter()       # (node, "up"|"down") -> bytes, all message types
        self.rejected: deque = deque(maxlen=1000)
        self.rejected_total = 0
        self.on_phase: Callable[[str, str], None] | None = None
        self.busy: set[str] = set()  # nodes with a TASK out and no RESULT/ERROR back yet (any round)
        self.gone: set[bytes] = set()  # connections of forgotten (restarted) nodes

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.bind}:{self.port}"

    def listen_also(self, bind: str, port: int = 0) -> str:
        """Listen on a second address too (e.g. the sandboxes' bridge and a LAN for real devices)."""
        if port:
            self.sock.bind(f"tcp://{bind}:{port}")
        else:
            port = self.sock.bind_to_random_port(f"tcp://{bind}")
        ep = f"tcp://{bind}:{port}"
        self.extra_endpoints.append(ep)
        return ep

    # -- sending ---------------------------------------------------------------------------
    def _send_raw(self, peer_id: bytes, msg: P.Message) -> int:
        frames = P.encode(msg)
        try:
            self.sock.send_multipart([peer_id, *frames], copy=False)
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or queue full
            log.warning("cannot send %s to %r: %s", msg.type, peer_id, exc)
            return 0
        return P.frames_nbytes(frames)

    def send(self, name: str, type_: str, rnd: int = 0, meta: dict | None = None, tensors: dict | None = None) -> int:
        peer = self.peers[name]
        n = self._send_raw(peer.peer_id, P.Message(type_, run=self.run_id, round=rnd, meta=meta or {},
                                                   tensors=tensors or {}))
        self.traffic[(name, "down")] += n
        if type_ == P.TASK and n:
            self.busy.add(name)
        return n

    def forget(self, name: str) -> None:
        """Drop a node's registration (it is being restarted): not ready until it says HELLO again."""
        peer = self.peers.pop(name, None)
        if peer is not None:
            self.by_id.pop(peer.peer_id, None)
            self.gone.add(peer.peer_id)  # what the old process still had in flight is dropped quietly
        self.busy.discard(name)

    def _reject(self, peer_id: bytes, reason: str, answer: bool = True, fatal: bool = False) -> None:
        self.rejected_total += 1
        self.rejected.append((time.time(), peer_id.hex()[:16], reason))
        log.warning("rejected message from peer %s: %s", peer_id.hex()[:16], reason)
        if answer:
            self._send_raw(peer_id, P.Message(P.ERROR, run=self.run_id, meta={"error": reason, "fatal": fatal}))

    # -- receiving -------------------------------------------------------------------------
    def poll(self, timeout_s: float) -> list[tuple[str, P.Message, int]]:
        """Handle what arrives within `timeout_s`; returns (node, message, bytes) for RESULT and ERROR."""
        out = []
        deadline = time.monotonic() + max(0.0, timeout_s)
        self._drain_monitor()
        while True:
            remaining = deadline - time.monotonic()
            if not self.sock.poll(max(0, int(remaining * 1000)) if not out else 0):
                break
            frames = self.sock.recv_multipart(copy=False)
            try:
                item = self._handle(frames)
            except Exception as exc:  # last line of defence: nothing from the network stops the loop
                log.exception("message handling failed")
                self.rejected_total += 1
                self.rejected.append((time.time(), "?", f"{type(exc).__name__}: {exc}"))
                item = None
            if item:
                out.append(item)
            if time.monotonic() >= deadline:
                break
        return out

    def _handle(self, frames: list) -> tuple[str, P.Message, int] | None:
        peer_id, body = frames[0].bytes, frames[1:]
        nbytes = P.frames_nbytes(body)
        try:
            msg = P.decode(body)
        except P.ProtocolError as exc:
            fatal = "protocol version" in str(exc)
            self._reject(peer_id, str(exc), answer=len(body) > 0, fatal=fatal)
            return None
        name = self.by_id.get(peer_id)
        if msg.type == P.HELLO:
            self._hello(peer_id, msg, nbytes, body[0].get("User-Id") if self.keys is not None and body else None)
            return None
        if name is None and peer_id in self.gone:
            return None
        if name is None:
            self._reject(peer_id, f"{msg.type} before HELLO: say HELLO with your node name first")
            return None
        if msg.run != self.run_id:
            if msg.type == P.HEARTBEAT and msg.run == "":  # sent before our WELCOME reached the node
                return None
            self._reject(peer_id, f"message for run {msg.run!r}, this is run {self.run_id!r}")
            return None
        peer = self.peers[name]
        peer.last_seen = time.monotonic()
        self.traffic[(name, "up")] += nbytes
        if msg.type == P.HEARTBEAT:
            phase = msg.meta.get("phase")
            if not isinstance(phase, str):
                self._reject(peer_id, "HEARTBEAT needs meta.phase (a string)")
                return None
            peer.phase = phase
            peer.phase_at[(msg.round, phase)] = time.monotonic()
            if phase == "ready":
                peer.ready = True
            if self.on_phase:
                self.on_phase(name, phase)
            return None
        if msg.type == P.BYE:
            peer.ready, peer.phase = False, "left"
            return None
        if msg.type in (P.RESULT, P.ERROR):
            self.busy.discard(name)
            return name, msg, nbytes
        self._reject(peer_id, f"a node may not send {msg.type}")
        return None

    def _hello(self, peer_id: bytes, msg: P.Message, nbytes: int, user_id: str | None = None) -> None:
        name = msg.meta.get("name")
        if not isinstance(name, str) or name not in self.expected:
            self._reject(peer_id, f"unknown node name {name!r}; this run expects: {', '.join(sorted(self.expected))}",
                         fatal=True)
            return
        if self.keys is not None and user_id != name:  # a node's key admits it under its own name only
            self._reject(peer_id, f"this connection's key belongs to node {user_id!r}, not {name!r}", fatal=True)
            return
        current = self.by_id.get(peer_id)
        if current is not None and current != name:  # one connection speaks for one node
            self._reject(peer_id, f"this connection is registered as node {current!r}, not {name!r}", fatal=True)
            return
        old = self.peers.get(name)
        if old is not None and old.peer_id != peer_id:
            log.info("node %s re-registered from a new connection", name)
            self.by_id.pop(old.peer_id, None)
        peer = Peer(name, peer_id, last_seen=time.monotonic(), hello=dict(msg.meta))
        self.gone.discard(peer_id)
        self.busy.discard(name)
        self.peers[name], self.by_id[peer_id] = peer, name
        self.traffic[(name, "up")] += nbytes
        meta, tensors = self.welcome(name)
        self.send(name, P.WELCOME, 0, meta, tensors)
        if self.on_phase:
            self.on_phase(name, "welcome")

    # -- registration and rounds -----------------------------------------------------------
    def ready(self) -> set[str]:
        return {n for n, p in self.peers.items() if p.ready}

    def wait_ready(self, names: set[str], timeout_s: float, alive: Callable[[str], bool]) -> set[str]:
        """Block until all `names` are ready, one has died, or time is up; returns the ready ones."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll(0.2)
            if names <= self.ready():
                break
            dead = [n for n in names - self.ready() if not alive(n)]
            if dead:
                log.error("node(s) exited before registering: %s", ", ".join(sorted(dead)))
                break
        return self.ready() & names

    def run_round(self, rnd: int, tag: str, tasks: dict[str, tuple[dict, dict]], deadline_real_s: float,
                  alive: Callable[[str], bool], check: Callable[[str, dict, P.Message], str | None],
                  tick: Callable[[], float | None] | None = None, devices: dict[str, dict] | None = None,
                  parallel: int | None = None, keep: Callable[[str, dict], Mapping] | None = None,
                  release=None) -> RoundOutcome:
        """Send each node its TASK, collect RESULTs until all are in or the deadline passes.

        `parallel`: at most this many tasks out at once, the next sent as one comes back (the
        virtual clock: its times do not depend on when a task runs).
        `devices`: for an emulated node, the device it emulates itself now (node/device.py),
        sent with its task so a profile changed since its start reaches it without a restart.
        `check(node, sent_tensors, result)` returns a reason to reject a result, or None.
        `keep(node, tensors)`: where an accepted result's tensors go (testbed/spill.py writes
        them to a file and gives them back as a mapping that reads them), so the round does not
        hold every result in memory.
        `release` (testbed.release.ReleaseFile): the tasks name its file, and once every node
        still out has said "computed" the round is released there, once.
        `tick()` runs between polls (at least every 0.25 s): the runner injects faults there. It
        returns the wall seconds until its next fault is due (or None), and the poll wakes by then.
        """
        t0 = time.monotonic()
        records = {n: NodeRecord(n, self.expected[n]) for n in tasks}
        task_ids = {n: f"{tag}/{rnd}/{n}" for n in tasks}
        pending: set[str] = set()
        sent_at: dict[str, float] = {}
        waiting = list(tasks)

        def send_more():
            while waiting and (parallel is None or len(pending) < parallel):
                n = waiting.pop(0)
                plan, tensors = tasks[n]
                sent_at[n] = self.send_task(n, rnd, task_ids[n], plan, tensors, (devices or {}).get(n), records[n],
                                            release)
                if sent_at[n]:
                    pending.add(n)

        send_more()
        results: dict[str, P.Message] = {}
        answered: set[str] = set()
        done_at: dict[str, float] = {}
        released_s: dict[str, float] = {}
        released_at = None
        last_done = t0
        while pending and time.monotonic() - t0 < deadline_real_s:
            due = tick() if tick is not None else None
            wait = min(0.25, deadline_real_s - (time.monotonic() - t0), 0.25 if due is None else due)
            for n, msg, nbytes in self.poll(max(0.0, wait)):
                if n not in pending or msg.meta.get("task_id") != task_ids[n] or msg.round != rnd:
                    log.info("discarding stale %s from %s (round %d)", msg.type, n, msg.round)
                    continue
                pending.discard(n)
                answered.add(n)
                last_done = done_at[n] = time.monotonic()
                cut = msg.meta.get("released_s")
                if isinstance(cut, (int, float)) and np.isfinite(cut) and cut > 0:
                    released_s[n] = float(cut)
                if self.take_result(n, rnd, msg, nbytes, records[n], sent_at[n],
                                    lambda m, n=n: check(n, tasks[n][1], m)):
                    results[n] = msg if keep is None else replace(msg, tensors=keep(n, msg.tensors))
            for n in [n for n in pending if not alive(n)]:
                pending.discard(n)
                done_at[n] = time.monotonic()
                records[n].status, records[n].reason = "failed", "node process exited"
            send_more()
            if release is not None and released_at is None and pending and not waiting \
                    and all(self.computed(n, rnd) for n in pending):
                released_at = release.announce(f"{tag}/{rnd}")
        for n in [*pending, *waiting]:
            records[n].reason = MISSED
        wall = (time.monotonic() if pending else last_done) - t0
        return RoundOutcome(results, records, wall, answered, t0, done_at, released_at, released_s)

    def computed(self, n: str, rnd: int) -> bool:
        """Whether node `n` has done the CPU work of its task of round `rnd` (it said so, or is uploading)."""
        times = self.peers[n].phase_at
        return (rnd, "computed") in times or (rnd, "upload") in times

    def send_task(self, n: str, rnd: int, task_id: str, plan: dict, tensors: dict, device: dict | None,
                  rec: NodeRecord, release=None) -> float:
        """Send node `n` its TASK (with the device it emulates itself, and the release file, if
        given); `rec` gets the task's bytes, less that emulation control. Returns when it was
        sent (0: unreachable)."""
        self.peers[n].phase_at.clear()
        sent_at = time.monotonic()
        meta = {"plan": plan, "task_id": task_id}
        control = -len(msgpack.packb(meta))
        if device is not None:  # emulation control, not the device's traffic: left out of bytes_down
            meta["device"] = device
        if release is not None:
            meta["release"] = str(release.path)
        control += len(msgpack.packb(meta))
        sent = self.send(n, P.TASK, rnd, meta, tensors)
        rec.bytes_down = max(0, sent - control) if sent else 0
        if not sent:
            rec.status, rec.reason = "failed", "unreachable"
            return 0.0
        return sent_at

    def take_result(self, n: str, rnd: int, msg: P.Message, nbytes: int, rec: NodeRecord, sent_at: float,
                    check: Callable[[P.Message], str | None]) -> bool:
        """Fill `rec` from the node's RESULT or ERROR for its task of round `rnd`; True if accepted."""
        rec.bytes_up = nbytes
        if msg.type == P.ERROR:
            rec.status, rec.reason = "failed", str(msg.meta.get("error"))[:500]
            return False
        reason = check(msg)
        if reason:
            rec.status, rec.reason = "rejected", reason
            self.rejected_total += 1
            log.warning("rejected result of %s in round %d: %s", n, rnd, reason)
            return False
        rec.status = "ok"
        for k in ("compute_s", "cpu_s", "upload_s", "download_s", "peak_mem_mb", "host_short_s"):
            v = msg.meta.get(k)
            if isinstance(v, (int, float)) and np.isfinite(v) and v >= 0:
                setattr(rec, k, float(v))
        # Link times as the aggregator sees them, whatever shapes the link (tc, the transport,
        # a real WiFi): TASK sent -> "train" heartbeat back; "upload" heartbeat -> RESULT in.
        times = self.peers[n].phase_at
        if (rnd, "train") in times:
            rec.download_s = times[(rnd, "train")] - sent_at
        if (rnd, "upload") in times:
            rec.upload_s = time.monotonic() - times[(rnd, "upload")]
        return True

    def _drain_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message
        while self.monitor is not None and self.monitor.poll(0):
            ev = recv_monitor_message(self.monitor)
            self.handshake_failures += 1
            log.warning("refused a connection on %s: CURVE handshake failed (%s; a client without the run's "
                        "keys?)", ev.get("endpoint", b"?").decode(errors="replace"), ev.get("event"))

    @property
    def refused_total(self) -> int:
        """Connections refused: unknown CURVE key, or no valid CURVE handshake at all. They never
        reach the socket as messages."""
        self._drain_monitor()
        return self.handshake_failures + (self.authenticator.refused_total if self.authenticator is not None else 0)

    def close(self, say_bye: bool = True) -> None:
        if say_bye:
            for name in list(self.peers):
                self.send(name, P.BYE)
        if self.monitor is not None:
            self._drain_monitor()
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.sock.close(linger=0)
        if self.authenticator is not None and self.authenticator.thread is not None:
            self.authenticator.stop()
            self.ctx.term()


def check_result(sent: dict, msg: P.Message) -> str | None:
    """A result must carry exactly the tensors the node was sent, same shapes, all finite."""
    got = msg.tensors
    if set(got) != set(sent):
        missing, extra = sorted(set(sent) - set(got)), sorted(set(got) - set(sent))
        return f"tensor names differ from the task (missing {missing[:3]}, unexpected {extra[:3]})"
    for k, v in got.items():
        if v.shape != np.shape(sent[k]):
            return f"tensor {k}: shape {v.shape} != {np.shape(sent[k])}"
        if v.dtype != np.asarray(sent[k]).dtype:
            return f"tensor {k}: dtype {v.dtype} != {np.asarray(sent[k]).dtype} (as sent)"
        if v.dtype.kind != "f" or not np.isfinite(v).all():
            return f"tensor {k}: not finite floats"
    ns = msg.meta.get("samples")
    if not isinstance(ns, int) or isinstance(ns, bool) or ns < 0:
        return "meta.samples must be a non-negative integer"
    return None


PAYLOAD_PARTS = ("blocks_down", "head_down", "blocks_up", "head_up")


def add_payload(out: dict[str, int], tensors: dict, way: str) -> None:
    """Add the tensor bytes of a task (`way` down) or a result (up) to `out`, split into the
    blocks (LoRA adapters or whole blocks) and the head (anything outside the blocks)."""
    for name, size in tensor_sizes(tensors).items():
        out[f"{'head' if block_of(name) is None else 'blocks'}_{way}"] += size
