"""The node's agent loop: register, receive a data shard, execute training plans, report.

One loop, one socket, one thread: ZeroMQ sockets are not thread-safe and a device trains one
plan at a time anyway. The same loop runs in an emulated sandbox and on a real Raspberry Pi.
"""
from __future__ import annotations

import gc
import logging
import os
import platform
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import zmq

from . import protocol as P
from .data import DataError
from .device import CPU_CLOCKS, Emulated, read_release, released_end, stretched  # noqa: F401 (stretched: re-exported)
from .shaping import Link

log = logging.getLogger("node")
NODE_KEY_ENV = "FEDGE_NODE_KEY"  # this node's CURVE secret key (z85), given by the join command


# exit codes of `python -m node`, besides 0 (the aggregator said BYE)
EXIT_FATAL, EXIT_IDLE, EXIT_REFUSED, EXIT_DATA = 2, 3, 4, 5  # a fatal ERROR; --max-idle-s passed; handshake
# refused; this node's data or model differ from the aggregator's
HANDSHAKE_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
HANDSHAKE_RETRIES = 3  # quick failures without detail in a row before the node gives up
HANDSHAKE_TIMEOUT_S = 5.0  # a handshake stalled this long is dropped and tried again (libzmq: 30 s)
# a TCP connect unanswered this long is abandoned for a fresh one: left to the kernel, the SYNs of a
# path that lost them back off to 8 and 16 s apart, and a recovered path waits that long
# (bench/bench_reconnect.py: 3.4 and 7.8 s after 8 and 20 s of loss, against 0.4 and 0.03 s)
CONNECT_TIMEOUT_S = 3.0
RELEASE_POLL_S = 0.05  # how often a waiting node looks whether its round was released (testbed/release.py)


class Agent:
    def __init__(self, connect: str, name: str, profile: str | None = None, threads: int | None = None,
                 device: Emulated = Emulated(), heartbeat_s: float = 2.0, max_idle_s: float = 0.0,
                 server_key: str | None = None, secret_key: str | None = None, data_dir: str | None = None,
                 model_dir: str | None = None):
        self.connect, self.name, self.profile = connect, name, profile
        self.threads = threads or os.cpu_count() or 1
        self.data_dir, self.model_dir = data_dir, model_dir
        self.become(device)
        self.heartbeat_s, self.max_idle_s = heartbeat_s, max_idle_s
        self.run_id = ""
        self.failed_handshakes, self.curve = 0, bool(server_key)
        self.base = self.tokenizer = self.data = None
        self.warmed = False  # whether this process has trained once (see on_task)
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_TIMEOUT_S * 1000))
        self.sock.setsockopt(zmq.CONNECT_TIMEOUT, int(CONNECT_TIMEOUT_S * 1000))
        self.connected_at = 0.0
        self.stalled_at: float | None = None  # when the last handshake stalled (for the log)
        if server_key:  # CURVE: encrypted, and the aggregator admits only the run's node keys
            if not secret_key:
                raise ValueError(f"--server-key needs this node's secret key in ${NODE_KEY_ENV} or --key-file")
            self.sock.curve_serverkey = server_key.encode()
            self.sock.curve_secretkey = secret_key.encode()
            self.sock.curve_publickey = zmq.curve_public(secret_key.encode())

    def become(self, device: Emulated) -> None:
        """Emulate `device` from now on (a new CPU share, new transport links)."""
        if device.nice != getattr(getattr(self, "device", None), "nice", 0.0):
            try:  # the virtual clock's CPU weight (node.device.weight_nice); threads started later inherit it
                os.setpriority(os.PRIO_PROCESS, 0, int(device.nice))
            except OSError as exc:  # lowering it again needs privileges
                log.warning("%s: cannot set niceness %d: %s", getattr(self, "name", "node"), int(device.nice), exc)
        self.device = device
        now = time.monotonic()  # a trace's steps count from the task that carries them
        up = [(now + s, u) for s, u, _ in device.rate_steps]
        down = [(now + s, d) for s, _, d in device.rate_steps]
        self.uplink = Link(device.uplink_mbit, device.latency_ms, schedule=up)
        self.downlink = Link(device.downlink_mbit, device.latency_ms, schedule=down)

    # -- messaging -------------------------------------------------------------------------
    def send(self, type_: str, round_: int = 0, meta: dict | None = None, tensors: dict | None = None,
             link: Link | None = None, block: bool = True) -> tuple[int, float]:
        """Send one message; through `link` when given (the shaped uplink). Returns (bytes, seconds).
        With block=False a message that cannot be queued (no connection) raises zmq.Again."""
        frames = P.encode(P.Message(type_, run=self.run_id, round=round_, meta=meta or {}, tensors=tensors or {}))
        nbytes = P.frames_nbytes(frames)
        spent = link.transfer(nbytes) if link else 0.0
        self.sock.send_multipart(frames, copy=False, flags=0 if block else zmq.NOBLOCK)
        return nbytes, spent

    def phase(self, phase: str, round_: int = 0) -> None:
        """A heartbeat never blocks: with no connection to the aggregator (down, or refusing this
        node's key) it is dropped, so the loop still notices --max-idle-s."""
        try:
            self.send(P.HEARTBEAT, round_, {"phase": phase}, block=False)
        except zmq.Again:
            log.debug("%s: heartbeat dropped: no connection to the aggregator", self.name)

    def capabilities(self) -> dict:
        import psutil
        return {"hostname": socket.gethostname(), "machine": platform.machine(), "python": platform.python_version(),
                "cpus": os.cpu_count(), "threads": self.threads, "mem_total_mb": psutil.virtual_memory().total // 2**20,
                "mem_available_mb": psutil.virtual_memory().available // 2**20,
                "pid": os.getpid()}

    # -- handlers --------------------------------------------------------------------------
    def on_welcome(self, msg: P.Message) -> None:
        from . import trainer
        from .data import DataSource, load_dataset
        self.run_id = msg.run
        data = msg.meta["data"]
        source = DataSource.from_dict(data["source"])
        if self.data_dir is not None and source.path is not None:  # a real device's own copy of the files
            source = replace(source, **{k: str(Path(self.data_dir) / Path(getattr(source, k)).name)
                                        for k in ("path", "test_path") if getattr(source, k)})
        ds = load_dataset(source)
        if ds.fingerprint != data["fingerprint"]:
            raise DataMismatch(f"this node's data ({source.path or source.dataset}) differ from the aggregator's: "
                               f"fingerprint {ds.fingerprint}, the run's {data['fingerprint']}")
        spec = trainer.ModelSpec.from_dict(msg.meta["model"])
        if spec.path is not None:  # a local checkpoint: this node's copy must be the aggregator's
            if self.model_dir is not None:
                spec = replace(spec, path=self.model_dir)
            mine, theirs = trainer.checkpoint_fingerprint(spec.path), msg.meta.get("model_fingerprint")
            if mine != theirs:
                raise DataMismatch(f"this node's model ({spec.path}) differs from the aggregator's: "
                                   f"fingerprint {mine}, the run's {theirs}")
        self.base, self.tokenizer = trainer.load_base(spec)
        idx = np.asarray(msg.tensors["shard"], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(ds)):
            raise ValueError(f"shard indices outside dataset {ds.name} of {len(ds)} examples")
        self.data = trainer.examples(self.tokenizer, ds, idx, int(data["max_len"]))
        trainer.import_training()  # before "ready": not inside the first round's compute time
        gc.collect()  # the imports' and the loading's garbage, and no later full collection of
        gc.freeze()   # what lives for the whole run (it cost the first round 0.1 CPU s here)
        log.info("%s: welcome to run %s, %d examples", self.name, self.run_id, len(self.data))
        self.phase("ready")

    def on_task(self, msg: P.Message, received_bytes: int) -> None:
        from . import trainer
        from .plan import Plan
        plan = Plan.from_dict(msg.meta.get("plan"))  # a bad plan: an ERROR reply, before any training
        if "device" in msg.meta:  # the device as it is now (a profile may have changed since the start)
            device = Emulated.from_dict(msg.meta["device"])
            if device != self.device or device.rate_steps:
                if replace(device, rate_steps=()) != replace(self.device, rate_steps=()):  # not every trace step
                    log.info("%s: now emulating %s", self.name, device)
                self.become(device)
        download_s = self.downlink.transfer(received_bytes)
        self.phase("train", msg.round)
        if not self.warmed:  # the process's first training pays one-time costs: not in the device's time
            trainer.warm_up(self.base, plan, dict(msg.tensors), self.data)
            _malloc_trim()
            self.warmed = True
        tensors, metrics = trainer.train(self.base, plan, dict(msg.tensors), self.data)
        end = time.monotonic()
        if self.device.cpu_share != 1 or self.device.cpu_clock != "wall":  # a slower CPU: stretch compute time
            wall = self.device.stretched(metrics["compute_s"], metrics["cpu_s"])
            if self.device.waits:  # the virtual clock's node reports the time and goes on
                end += max(0.0, wall - metrics["compute_s"])
            metrics["measured_compute_s"] = metrics["compute_s"]
            metrics["compute_s"] = wall
            metrics["host_short_s"] = self.device.host_short(metrics["measured_compute_s"], metrics["cpu_s"])
        released_s = self.wait_out(end, msg)
        self.phase("upload", msg.round)
        meta = {**metrics, "download_s": download_s, "task_id": msg.meta.get("task_id")}
        if "release" in msg.meta:
            meta["released_s"] = released_s
        frames = P.encode(P.Message(P.RESULT, run=self.run_id, round=msg.round, meta={**meta, "upload_s": 0.0},
                                    tensors=tensors))
        meta["upload_s"] = self.uplink.delay_for(P.frames_nbytes(frames))
        self.send(P.RESULT, msg.round, meta, tensors, link=self.uplink)
        _malloc_trim()

    def wait_out(self, end: float, msg: P.Message) -> float:
        """Sleep until `end` (time.monotonic()), the end of the device's compute time. In a round
        the aggregator may release (its task names the release file: testbed/release.py), say
        "computed" first, and end sooner once the round is released. Returns the real seconds
        the release took off the wait."""
        path = msg.meta.get("release")
        if not isinstance(path, str):
            time.sleep(max(0.0, end - time.monotonic()))
            return 0.0
        self.phase("computed", msg.round)
        key, stamp, due = str(msg.meta.get("task_id", "")).rsplit("/", 1)[0], None, end
        while (now := time.monotonic()) < end:
            if end == due and (seen := _mtime(path)) != stamp:
                stamp, release = seen, read_release(path, key)
                if release is not None:
                    end = released_end(due, *release)
                    continue
            time.sleep(min(RELEASE_POLL_S, end - now) if end == due else end - now)
        return due - end

    # -- loop ------------------------------------------------------------------------------
    def hello(self) -> bool:
        """Say HELLO without blocking: once a handshake has failed the socket has no peer, and a
        blocking send would wait for ever. False: not queued, to be tried again."""
        try:
            self.send(P.HELLO, meta={"name": self.name, "profile": self.profile, "capabilities": self.capabilities()},
                      block=False)
            return True
        except zmq.Again:
            return False

    def refused(self, event: dict) -> str | None:
        """Why the aggregator will never talk to this node, from a socket-monitor event; None
        while it still might. A handshake that fails without detail soon after connecting is
        retried a few times (that is how a wrong server key shows, but also a connection cut
        mid-handshake); one that stalled (timed out) is only retried."""
        kind = event["event"]
        if kind == zmq.EVENT_CONNECTED:
            self.connected_at = time.monotonic()
            if self.stalled_at is not None:  # where the time after a stall goes: connecting, or a handshake
                log.info("%s: connected again %.1f s after the stalled handshake", self.name,
                         self.connected_at - self.stalled_at)
                self.stalled_at = None
            return None
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.failed_handshakes = 0
            return None
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"the aggregator at {self.connect} refused this node's key (ZAP status {event['value']}): "
                    f"use the {NODE_KEY_ENV} of this node's join line, printed by this run")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            if time.monotonic() - self.connected_at >= HANDSHAKE_TIMEOUT_S / 2:  # stalled, not refused
                log.warning("%s: the handshake with %s stalled; trying again", self.name, self.connect)
                self.stalled_at = time.monotonic()
                return None
            self.failed_handshakes += 1
            if self.failed_handshakes < HANDSHAKE_RETRIES:
                return None
        # a protocol error, or repeated failures: whichever side sees a mechanism mismatch first
        # closes, so the other sees a cut handshake, retried
        if not self.curve:
            return (f"the aggregator at {self.connect} requires CURVE: start this node with the join line the run "
                    f"printed (it carries --server-key and {NODE_KEY_ENV})")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return f"the aggregator at {self.connect} does not speak CURVE: leave out --server-key"
        return (f"{self.failed_handshakes} handshakes with the aggregator at {self.connect} failed: "
                f"is --server-key this run's server key, and does the run use CURVE?")

    def run(self) -> int:
        import torch
        from zmq.utils.monitor import recv_monitor_message
        torch.set_num_threads(self.threads)  # first, before any torch op (OpenMP after fork)
        monitor = self.sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self.sock.connect(self.connect)
        said_hello = self.hello()
        last_heard = time.monotonic()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll(self.heartbeat_s * 1000))
                if monitor in ready:
                    why = self.refused(recv_monitor_message(monitor))
                    if why:
                        log.error("%s: %s; leaving", self.name, why)
                        return EXIT_REFUSED
                if self.sock not in ready:
                    if self.max_idle_s and time.monotonic() - last_heard > self.max_idle_s:
                        log.error("%s: nothing from the aggregator for %.0f s, leaving", self.name, self.max_idle_s)
                        return EXIT_IDLE
                    if not said_hello:
                        said_hello = self.hello()
                    elif monitor not in ready:
                        self.phase("idle" if self.base is not None else "hello")
                    continue
                last_heard = time.monotonic()
                frames = self.sock.recv_multipart(copy=False)
                try:
                    msg = P.decode(frames)
                except Exception as exc:  # ProtocolError, or anything a malformed message provokes
                    log.error("%s: bad message from aggregator: %s", self.name, exc)
                    continue
                if msg.type == P.WELCOME:
                    try:
                        self.on_welcome(msg)
                    except (DataMismatch, DataError, FileNotFoundError, ValueError) as exc:
                        log.error("%s: %s; leaving", self.name, exc)
                        return EXIT_DATA
                elif msg.type == P.TASK:
                    try:
                        self.on_task(msg, P.frames_nbytes(frames))
                    except Exception as exc:  # a plan this node cannot run: say so, stay alive
                        log.exception("%s: task failed", self.name)
                        self.send(P.ERROR, msg.round, {"error": f"{type(exc).__name__}: {exc}",
                                                       "task_id": msg.meta.get("task_id")})
                elif msg.type == P.BYE:
                    log.info("%s: aggregator says bye", self.name)
                    return 0
                elif msg.type == P.ERROR:
                    log.error("%s: aggregator error: %s", self.name, msg.meta.get("error"))
                    if msg.meta.get("fatal"):
                        return EXIT_FATAL
        finally:
            self.sock.disable_monitor()
            monitor.close(linger=0)
            self.sock.close()


class DataMismatch(ValueError):
    """This node's data or model are not the aggregator's (another file, another version)."""


def parser():
    """The node's command line. Every value may start with '-' when given as --option=value
    (the testbed always passes it so; z85 keys contain '-')."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m node", description="A federated fine-tuning node (emulated or a real device).")
    ap.add_argument("--connect", required=True, help="aggregator address, e.g. tcp://192.168.1.10:5555")
    ap.add_argument("--name", required=True, help="this node's name in the scenario")
    ap.add_argument("--profile", default=None, help="device profile name to report")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--uplink-mbit", type=float, default=0.0, help="in-transport uplink rate (0 = unshaped)")
    ap.add_argument("--downlink-mbit", type=float, default=0.0, help="in-transport downlink rate (0 = unshaped)")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="in-transport one-way latency")
    ap.add_argument("--cpu-share", type=float, default=1.0, help="stretch compute time to emulate a slower CPU (wall clock: at most 1)")
    ap.add_argument("--cpu-clock", choices=CPU_CLOCKS, default="wall",
                    help="stretch the compute phase's wall time, or its CPU seconds (cores shared by weight)")
    ap.add_argument("--data-dir", default=None, help="where this device keeps the run's data files (same names); "
                    "default: the path the aggregator announces")
    ap.add_argument("--model-dir", default=None, help="where this device keeps the run's local checkpoint; "
                    "default: the path the aggregator announces")
    ap.add_argument("--max-idle-s", type=float, default=0.0, help="leave after this long without a message (0 = never)")
    ap.add_argument("--server-key", default=None, help="the aggregator's CURVE public key (from the join command)")
    ap.add_argument("--key-file", default=None, help=f"file holding this node's CURVE secret key (else ${NODE_KEY_ENV})")
    ap.add_argument("--log-level", default="INFO")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    secret = os.environ.get(NODE_KEY_ENV)
    if a.key_file:
        with open(a.key_file) as fh:
            secret = fh.read().strip()
    logging.basicConfig(level=a.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        device = Emulated(a.cpu_share, a.cpu_clock, a.uplink_mbit, a.downlink_mbit, a.latency_ms)
    except ValueError as exc:
        parser().error(str(exc))
    agent = Agent(a.connect, a.name, a.profile, a.threads, device, max_idle_s=a.max_idle_s,
                  server_key=a.server_key, secret_key=secret, data_dir=a.data_dir, model_dir=a.model_dir)
    return agent.run()


def _mtime(path: str) -> tuple[int, int] | None:
    """The file's identity and change time: a new release replaces the file (a new inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _malloc_trim() -> None:
    """Give the round's freed model copy back to the OS, so idle nodes stay small (glibc only).

    (MALLOC_MMAP_THRESHOLD_ would do it per allocation, but measured 50% slower training.)"""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
