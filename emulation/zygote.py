"""A node zygote: one interpreter imports torch + transformers + peft, loads the frozen base
model and the dataset once, and forks every node of the run copy-on-write.

Why: a separate node interpreter costs about 280 MB of private memory before it trains
(measured here: docs/architecture.md), so 80 of them do not fit a 24 GB host; forked from one interpreter that already
holds the libraries and the weights, a node costs tens of MB until it trains.

What makes the fork safe (measured here; docs/architecture.md): the zygote runs no torch computation
before forking (OpenMP's thread pool does not survive fork), it runs `gc.collect(); gc.freeze()`
so the children's garbage collector never writes the shared objects' pages, every child sets
its torch thread count first (node.agent does) and trims malloc after each round.

Memory honesty: pages the children share stay charged to the zygote, not to a child's cgroup.
`shared_mb` (the zygote's resident size when it is ready) is what every child holds without
paying for it, so a sandboxed child's memory limit is its profile's memory minus `shared_mb`
(the netns backend does that and says so in the manifest).

Wire: the client writes one JSON command per line on the zygote's stdin and reads one JSON
event per line from its stdout: {"ready", "shared_mb", "pid"} once, {"id", "pid"} per spawn once the
child is inside its cgroup and namespace (with "error" if it could not get there), {"exit": pid, "code"} whenever a child ends (code < 0: signal).
Closing stdin ends the zygote and kills its children.
"""
from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .hostmem import kill_me_first
from .lifetime import die_with_parent

CLONE_NEWNET = 0x40000000


# ---------------------------------------------------------------------------------------------
# the zygote process
# ---------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _preload(spec: dict, data: dict) -> None:
    """Everything a node needs that does not depend on which node it is."""
    import torch
    torch.set_num_threads(1)  # loading runs inline: no OpenMP pool exists to be broken by fork
    import peft  # noqa: F401
    import zmq  # noqa: F401
    from node import agent, trainer  # noqa: F401
    from node.data import DataSource, load_dataset
    trainer.preload(trainer.ModelSpec.from_dict(spec))
    load_dataset(DataSource.from_dict(data))
    # transformers maps the weights file and pages it in lazily; page it in now (one element per
    # 4 KB page, with numpy: no torch kernel runs before fork) so shared_mb counts the weights
    import numpy as np
    (base, _), = trainer._PRELOADED.values()
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for t in [*base.parameters(), *base.buffers()]:
        t = t.detach()
        try:
            a = t.numpy().reshape(-1)
        except TypeError:  # a type numpy has not (bfloat16): the same bytes as integers
            a = t.view(ints[t.element_size()]).numpy().reshape(-1)
        if a.size:
            np.add.reduce(a[::max(1, 4096 // a.itemsize)].astype(np.float64))


def _child(cmd: dict, control: int, entered: int) -> None:
    """In the forked child: enter the sandbox, tell the zygote on `entered`, become the node.
    Never returns."""
    code = 1
    try:
        os.close(control)
        os.setsid()  # own process group: the backend signals the node's group, as with Popen
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        die_with_parent()
        kill_me_first()  # a node, not the zygote that holds them all, goes when the host runs out
        for procs in cmd.get("cgroup_procs") or []:  # before anything allocates: all of it is limited
            with open(procs, "w") as fh:
                fh.write(str(os.getpid()))
        if cmd.get("netns"):
            fd = os.open(cmd["netns"], os.O_RDONLY)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns({cmd['netns']})")
            os.close(fd)
        os.write(entered, b"ok")
        os.close(entered)
        entered = -1
        log = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the zygote's command stream
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        os.environ.update(cmd.get("env") or {})
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        from node.agent import main
        sys.argv = ["node", *cmd["argv"]]
        code = main(cmd["argv"]) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001  (a child must never return into the zygote's loop)
        if entered >= 0:  # could not enter its sandbox: the zygote reports why
            os.write(entered, f"{type(exc).__name__}: {exc}".encode()[:4000])
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(spec: dict, data: dict) -> int:
    """The zygote's loop: preload, then fork on request and report exits, until stdin closes."""
    die_with_parent()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to the zygote's log, not the control stream
    _preload(spec, data)
    import gc
    gc.collect()
    gc.freeze()

    def emit(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")

    emit({"ready": True, "shared_mb": round(_rss_mb(), 1), "pid": os.getpid()})
    children: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    buf = b""
    try:
        while True:
            if sel.select(timeout=0.2):
                chunk = os.read(0, 65536)
                if not chunk:
                    return 0
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = json.loads(line)
                    r, w = os.pipe()
                    try:
                        pid = os.fork()
                    except OSError as exc:
                        os.close(r)
                        os.close(w)
                        emit({"id": cmd["id"], "error": f"fork failed: {exc}"})
                        continue
                    if pid == 0:
                        os.close(r)
                        _child(cmd, out.fileno(), w)
                    os.close(w)
                    children.add(pid)
                    # reply once the child is inside its cgroup and namespace (or could not get there)
                    ready = selectors.DefaultSelector()
                    ready.register(r, selectors.EVENT_READ)
                    word = os.read(r, 4096) if ready.select(timeout=30) else b"timeout entering the sandbox"
                    ready.close()
                    os.close(r)
                    if word == b"ok":
                        emit({"id": cmd["id"], "pid": pid})
                    else:
                        emit({"id": cmd["id"], "pid": pid, "error": (word or b"exited at once").decode(errors="replace")})
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                children.discard(pid)
                emit({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
    finally:
        for pid in children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# the client the backends use
# ---------------------------------------------------------------------------------------------
class ZygoteError(RuntimeError):
    pass


class Child:
    """A forked node, with the part of subprocess.Popen's interface the backends use."""

    def __init__(self, zygote: "Zygote", pid: int):
        self.zygote, self.pid = zygote, pid

    @property
    def returncode(self) -> int | None:
        return self.zygote.exits.get(self.pid)

    def poll(self) -> int | None:
        if self.pid not in self.zygote.exits and not self.zygote.running():
            self.zygote.exits[self.pid] = -signal.SIGKILL  # the zygote died: so did its children
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"node pid {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode


class Zygote:
    """Start the zygote for one run (model spec + dataset) and fork nodes from it.

    The constructor only starts the process: it imports torch and loads the model while the
    run goes on with its own loading (two cores' worth of start-up at once). The first use
    (`spawn`, `shared_mb`) waits until it is ready."""

    def __init__(self, spec: dict, data: dict, env: dict, log: Path, timeout_s: float = 300.0):
        self.exits: dict[int, int] = {}
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._next = 0
        self._timeout_s, self._shared_mb = timeout_s, None
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "emulation.zygote", json.dumps(spec), json.dumps(data)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fh, env=env,
                                         start_new_session=True, preexec_fn=die_with_parent)
        self.pid = self.proc.pid
        self.log = Path(log)

    def ready(self) -> None:
        """Wait until the zygote has loaded everything (once); ZygoteError if it could not."""
        if self._shared_mb is not None:
            return
        first = self._read_line(self._timeout_s)
        if not first or not first.get("ready"):
            self.close()
            raise ZygoteError(f"the node zygote did not start (see {self.log}): {self._tail()}")
        self._shared_mb = float(first["shared_mb"])
        self._reader = threading.Thread(target=self._read_events, name="zygote-events", daemon=True)
        self._reader.start()

    @property
    def shared_mb(self) -> float:
        """Memory the forked nodes share with the zygote (charged to it, not to them)."""
        self.ready()
        return self._shared_mb

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def _read_line(self, timeout_s: float) -> dict | None:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def _read_events(self) -> None:
        for line in self.proc.stdout:
            ev = json.loads(line)
            with self._cond:
                if "exit" in ev:
                    self.exits[int(ev["exit"])] = int(ev["code"])
                else:
                    self._replies[int(ev["id"])] = ev
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def running(self) -> bool:
        return self.proc.poll() is None

    def spawn(self, argv: list[str], env: dict, log: Path, cgroup_procs: list[str] = (),
              netns: str | None = None, timeout_s: float = 30.0) -> Child:
        """Fork a node running `python -m node ARGV` with `env` added, output appended to `log`,
        first moved into `cgroup_procs` (cgroup.procs files) and the network namespace file `netns`."""
        self.ready()
        with self._cond:
            self._next += 1
            rid = self._next
        cmd = {"id": rid, "argv": list(argv), "env": env, "log": str(log), "cgroup_procs": list(cgroup_procs),
               "netns": netns}
        try:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise ZygoteError(f"the node zygote is gone (see {self.log}): {exc}") from None
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while rid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or not self.running():
                    raise ZygoteError(f"the node zygote did not fork (see {self.log}): {self._tail()}")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(rid)
        if "error" in reply:
            if reply.get("pid"):
                try:
                    os.killpg(int(reply["pid"]), signal.SIGKILL)
                except OSError:
                    pass
            raise ZygoteError(f"node could not enter its sandbox: {reply['error']}")
        return Child(self, int(reply["pid"]))

    def close(self, grace_s: float = 3.0) -> None:
        """End the zygote; it kills any child still running."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return serve(json.loads(argv[0]), json.loads(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
