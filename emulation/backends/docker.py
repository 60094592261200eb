"""The `docker` backend: one container per node, from the image the testbed builds itself.

Per run: one docker bridge network, `internal` (no route off the host: a node reaches only the
aggregator on the network's gateway address and the run's other containers), on a private /24
picked like the netns backend's, named `fedge-<hash>` and labelled `fedge.run=<run id>`; the
aggregator binds on its gateway.
Per node: a container `fedge-<hash>-<node>` of the node image (`emulation.image`, tagged by the
hash of node/ + requirements: `make image` builds it), labelled too, with
- CPU: NanoCpus = cpu_share / dilation (the kernel's CFS quota; the node is told cpu_share 1),
- memory: Memory = MemorySwap = the profile's memory (no swap); an OOM kill is reported as such,
- link: htb on both ends of the container's veth, Mininet-like: the uplink on the container's
  eth0 egress (tc run in its network namespace from the host), the downlink on the host-side
  veth (found from eth0's peer index); netem below htb where the kernel has it, otherwise the
  latency is emulated in the node's transport (--latency-ms), as in the netns backend.
The node starts importing torch (seconds) before its first message, so its link is shaped
before any traffic. Without root (a docker-group user) the host side cannot be shaped: the
uplink is shaped inside the container (`docker exec tc`, NET_ADMIN), the downlink in the
transport, and fidelity() says so.

More engines (scenario `engines:`): a DockerBackend per engine, through the SDK at the engine's
address. An engine on this machine (unix://, tcp://localhost) works as above on its own network.
An engine on another host gets a routed (not internal) network, its nodes dial `connect` (an
address of this host), the uplink is shaped by `tc` inside each container (`docker -H URL exec`),
the downlink and latency in the node's transport; a missing node image is copied over
(`docker save | docker load`, streamed). Every engine used is remembered (engines.json in the
state folder) so that `testbed clean` sweeps it too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .. import netns as N
from ..hostmem import OOM_SCORE_ADJ
from ..launch import Emulate, Launch, Limits
from ..profiles import Profile
from .base import THIS_HOST, Backend, FaultUnsupported

LABEL_RUN = "fedge.run"      # on every container and network the backend makes: `clean` finds them by it
LABEL_NODE = "fedge.node"
LABEL_ENGINE = "fedge.engine"  # the scenario's name of the engine (engines:), on what an engine backend makes
NAME_PREFIX = "fedge-"
MIN_CPUS = 0.01              # docker refuses smaller NanoCpus
STOP_GRACE_S = 3.0
IDLE_NODE_MB = 300           # one interpreter with torch+transformers+peft imported (279-290 MB measured)
log = logging.getLogger("emulation.docker")


STATE_DIR_ENV = "FEDGE_STATE"  # where engines.json is kept (default ~/.local/state/fedge-testbed)


@dataclass(frozen=True)
class Engine:
    """One more docker engine of a run (scenario `engines:`)."""
    name: str
    url: str
    same_host: bool = True
    connect: str | None = None  # the address of this host its containers dial (another host only)
    tls: bool = False

    def client(self, timeout: float = 60):
        import docker
        tls = None
        if self.tls:
            from docker.tls import TLSConfig
            certs = Path(os.environ.get("DOCKER_CERT_PATH", "~/.docker")).expanduser()
            tls = TLSConfig(client_cert=(str(certs / "cert.pem"), str(certs / "key.pem")),
                            ca_cert=str(certs / "ca.pem"), verify=True)
        try:
            c = docker.DockerClient(base_url=self.url, timeout=timeout, tls=tls,
                                    use_ssh_client=self.url.startswith("ssh://"))
            c.ping()
            return c
        except Exception as exc:
            raise RuntimeError(f"engine {self.name} ({self.url}) is not reachable: {type(exc).__name__}: "
                               f"{str(exc)[:200]}") from exc

    def cli(self) -> list[str]:
        """The docker CLI aimed at this engine (for `exec tc`)."""
        return ["docker", "-H", self.url, *(["--tlsverify"] if self.tls else [])]


def engines_file() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or "~/.local/state/fedge-testbed").expanduser() / "engines.json"


def _save_engines(known: dict[str, dict]) -> None:
    f = engines_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=1))
    tmp.replace(f)


def remember_engine(engine: Engine) -> None:
    """Note an engine the testbed put containers on, before it puts any there (for `clean`)."""
    known = known_engines()
    known[engine.url] = {"tls": engine.tls, "name": engine.name, "last_used": time.time()}
    _save_engines(known)


def known_engines() -> dict[str, dict]:
    try:
        known = json.loads(engines_file().read_text())
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def forget_engine(url: str) -> None:
    known = known_engines()
    if known.pop(url, None) is not None:
        _save_engines(known)


def clean_engines(run_id: str | None = None) -> list[str]:
    """`clean` on every engine a run of this testbed used (engines.json); an engine on a unix
    socket that no longer exists is forgotten, an unreachable one is reported and kept."""
    removed = []
    for url, meta in known_engines().items():
        if url.startswith("unix://") and not Path(url[len("unix://"):]).exists():
            forget_engine(url)
            continue
        try:
            client = Engine(str(meta.get("name", "?")), url, tls=bool(meta.get("tls"))).client(timeout=10)
        except RuntimeError as exc:
            log.warning("%s; its containers of %s may remain", exc, f"run {run_id}" if run_id else "any run")
            continue
        removed += [f"{r} on engine {url}" for r in clean(run_id, client)]
    return removed


def run_hash(run_id: str) -> str:
    """8 hex of the run id: in container, network and bridge names (a bridge name has 15 chars at most)."""
    return hashlib.sha1(run_id.encode()).hexdigest()[:8]


def docker_missing(caps: dict) -> list[str]:
    """What this host lacks for the docker backend (empty: it can run). For `choose`."""
    info = caps.get("docker") or {}
    if not info.get("available"):
        return [f"a reachable docker engine ({info.get('reason', 'not probed')}; install docker.io and start dockerd)"]
    if caps.get("root") and not caps.get("qdiscs", {}).get("htb"):
        return ["the htb qdisc (links are shaped with htb)"]
    from .. import image
    try:
        image.require_image(image.client(timeout=10))
    except image.ImageError as exc:
        return [str(exc)]
    return []


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, run_id: str, workdir: Path, caps: dict | None = None, engine: Engine | None = None):
        super().__init__(run_id, workdir, caps)
        from .. import image
        self.engine = engine
        self.volumes: dict[str, dict] = {}  # host folder -> bind, the user's data and checkpoint (prepare)
        self.label = f"engine {engine.name}" if engine else "docker backend"
        here = engine is None or engine.same_host
        if engine is None:
            try:
                self.client = image.client(timeout=60)
                self.image = image.require_image(self.client)
            except image.ImageError as exc:
                raise RuntimeError(f"the docker backend cannot run: {exc}") from exc
        else:
            self.client = engine.client(timeout=600)
            self.image = image.image_tag()  # copied there by prepare() if missing
            remember_engine(engine)
        import docker
        self._errors = docker.errors
        self.netem = bool(self.caps.get("netem")) and here  # another host's kernel is not probed
        self.root = here and os.geteuid() == 0 and bool(shutil.which("nsenter")) and bool(shutil.which("tc"))
        self.exec_tc = not self.root and bool(shutil.which("docker"))  # uplink via `docker exec tc`
        self.memory_mb = int(self.caps.get("memory_mb") or 0)
        self.engine_facts: dict = {}  # what the engine said of itself (for the manifest)
        if engine is not None:
            info = self.client.info()
            self.engine_facts = {"name": engine.name, "url": engine.url, "same_host": engine.same_host,
                                 "id": info.get("ID"), "host": info.get("Name"), "version": info.get("ServerVersion"),
                                 "cores": info.get("NCPU"), "memory_mb": int((info.get("MemTotal") or 0) / 2**20),
                                 "arch": info.get("Architecture")}
            if not engine.same_host:
                self.cores = int(info.get("NCPU") or 1)
                self.memory_mb = self.engine_facts["memory_mb"]
        self.hash = run_hash(run_id)
        self.labels = {LABEL_RUN: run_id, **({LABEL_ENGINE: engine.name} if engine else {})}
        self.network = None
        self.gateway: str | None = None
        self.containers: dict = {}
        self.profiles: dict[str, Profile] = {}
        self.links: dict[str, N.Link] = {}  # the links shaped from here (root) or by `docker exec tc`
        self.logs = self.workdir / "logs"
        self._states: dict[str, str] = {}
        self._states_at = 0.0

    # -- network of the run ----------------------------------------------------------------
    def _ensure_network(self) -> None:
        if self.network is not None:
            return
        from docker.types import IPAMConfig, IPAMPool
        name = bridge = f"{NAME_PREFIX}{self.hash}"
        if self.engine is not None:  # a distinct bridge even when the engine shares this kernel
            name = f"{NAME_PREFIX}{self.hash}-{self.engine.name}"
            bridge = f"fdg-{self.hash}-{hashlib.sha1(self.engine.name.encode()).hexdigest()[:2]}"
        here = self.engine is None or self.engine.same_host
        tag = N.run_tag(self.run_id + (self.engine.name if self.engine else ""))
        last = None
        for _ in range(8):  # another run (or engine) may take the same /24 between pick and create
            subnet = N.pick_subnet(tag)
            gateway = str(next(subnet.hosts()))
            try:  # on another host: routed, so its containers reach this host's `connect` address
                self.network = self.client.networks.create(
                    name, driver="bridge", internal=here, labels=dict(self.labels), check_duplicate=True,
                    ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=str(subnet), gateway=gateway)]),
                    options={"com.docker.network.bridge.name": bridge})
                self.gateway = gateway
                if self.root:
                    N.cap_gso([], bridge)  # as for the netns bridge: no 64 KB bursts through htb
                return
            except self._errors.APIError as exc:
                last = exc
                if "overlap" not in str(exc).lower():
                    raise
                tag = f"{(int(tag, 16) + 1) % 0x10000:04x}"
        raise N.NetError(f"no free subnet for the docker network: {last}")

    def bind_address(self, requested: str) -> str:
        self._ensure_network()
        if self.engine is not None and not self.engine.same_host:
            return self.engine.connect
        return self.gateway

    def prepare(self, spec: dict, data: dict, zygote: bool) -> None:
        from node.data import DataSource
        src = DataSource.from_dict(data)
        files = [Path(f).resolve() for f in (src.path, src.test_path, spec.get("path")) if f]
        if files and self.engine is not None and not self.engine.same_host:
            raise RuntimeError(f"{self.label} ({self.engine.url}) runs on another host: it cannot mount this host's "
                               f"data or model ({', '.join(map(str, files))}); use the built-in ones, or run those "
                               "nodes on an engine of this host")
        # the user's data files and checkpoint folder, read-only at the same path in every container
        folders = {str(f if f.is_dir() else f.parent) for f in files}
        self.volumes = {d: {"bind": d, "mode": "ro"} for d in folders}
        if self.engine is not None:  # the node image of this code, copied from this host's engine if missing
            from .. import image
            try:
                took = image.copy_image(self.client, say=lambda m: self.say(f"{self.label}: {m}"))
            except image.ImageError as exc:
                raise RuntimeError(f"{self.label} ({self.engine.url}): {exc}") from exc
            self.engine_facts["image_copied_s"] = None if took is None else round(took, 1)

    def fidelity(self, profiles: list[Profile], dilation: float) -> list[str]:
        notes, me = [], self.label
        away = self.engine is not None and not self.engine.same_host
        if not self.netem and any(p.latency_ms > 0 for p in profiles):
            why = "another host's kernel is not probed" if away else "no netem in this kernel"
            notes.append(f"{me}: {why}: latency is emulated in the transport, rates by htb")
        if away:
            notes.append(f"{me}: on another host ({self.engine.url}): the uplink is shaped by tc inside each "
                         "container, the downlink in the node's transport; link cuts are not possible there")
        elif not self.root:
            where = "the uplink by tc inside the container, " if self.exec_tc else ""
            notes.append(f"{me}: not root: {where}the "
                         f"{'downlink' if self.exec_tc else 'uplink and downlink'} emulated in the transport")
        fast = sorted({p.name for p in profiles if p.cpu_share / dilation > self.cores})
        if fast:
            notes.append(f"{me}: CPU quota capped at the host's {self.cores} cores for {', '.join(fast)}")
        slow = sorted({p.name for p in profiles if 0 < p.cpu_share / dilation < MIN_CPUS})
        if slow:
            notes.append(f"{me}: CPU quota raised to docker's minimum {MIN_CPUS} for {', '.join(slow)}")
        need = len(profiles) * IDLE_NODE_MB
        host = self.memory_mb
        if host and need > 0.8 * host:
            notes.append(f"{me}: {len(profiles)} containers each run their own interpreter (about "
                         f"{IDLE_NODE_MB} MB before training, nothing shared): about {need // 1024} GB of this "
                         f"host's {host // 1024} GB; fewer nodes or the netns backend may be needed")
        return notes

    def on_this_host(self, name: str) -> bool:
        return self.engine is None or self.engine.same_host

    def core_demands(self, profiles: dict[str, Profile]) -> dict[str, tuple[int, list[float]]]:
        where = THIS_HOST if self.engine is None or self.engine.same_host else self.engine.url
        return {where: (self.cores, [self.cpu_demand(p) for p in profiles.values()])}

    # -- nodes -----------------------------------------------------------------------------
    def emulated(self, name: str) -> Emulate:
        """What the node's transport emulates: the links this backend cannot shape from here."""
        return Emulate(uplink=not self.root and not self.exec_tc, downlink=not self.root, latency=not self.netem)

    def start(self, launch: Launch) -> None:
        self._ensure_network()
        name, lim = launch.name, launch.limits
        cpus = min(float(self.cores), max(MIN_CPUS, lim.cpus))
        mem = f"{lim.memory_mb}m"
        safe = re.sub(r"[^a-zA-Z0-9_.-]", "_", name)
        container = self.client.containers.run(
            self.image, launch.argv(self.emulated(name)), name=f"{NAME_PREFIX}{self.hash}-{safe}",
            hostname=safe[:63], detach=True, init=True, network=self.network.name,
            environment={**launch.env, "PYTHONUNBUFFERED": "1"},
            labels={**self.labels, LABEL_NODE: name}, nano_cpus=int(round(cpus * 1e9)), mem_limit=mem,
            memswap_limit=mem, oom_score_adj=OOM_SCORE_ADJ, cap_add=["NET_ADMIN"], stdin_open=False,
            volumes=self.volumes)
        self.containers[name] = container
        self.profiles[name] = launch.profile
        self._states_at = 0.0
        self._shape(name, container, lim)

    def _shape(self, name: str, container, lim: Limits, force: bool = False) -> None:
        delay = lim.latency_ms if self.netem else 0.0
        up, down = N.Shaping(lim.uplink_mbit, delay), N.Shaping(lim.downlink_mbit, delay)
        if not (up.rate_mbit or down.rate_mbit or delay or force):
            return
        if name not in self.links:
            container.reload()
            pid = container.attrs["State"].get("Pid") or 0
            if not pid:  # died at once: nothing to shape; exit_reason() tells why
                return
            if self.root:
                inside = ["nsenter", "-t", str(pid), "-n"]
                self.links[name] = N.Link("eth0", inside, self._host_veth(inside))
            elif self.exec_tc:  # the uplink only: the host side is out of reach
                cli = self.engine.cli() if self.engine is not None else ["docker"]
                self.links[name] = N.Link("eth0", [*cli, "exec", container.id])
            else:
                return
        self.links[name].shape(up, down, self.netem)

    @staticmethod
    def _host_veth(inside: list[str]) -> str:
        """The host-side veth of the container's eth0: the host interface whose index is eth0's iflink."""
        links = json.loads(N.sh(*inside, "ip", "-j", "link", "show", "dev", "eth0").stdout)
        peer = links[0].get("link_index")
        if peer is None:
            raise N.NetError(f"eth0 of the container shows no veth peer: {links}")
        for link in json.loads(N.sh("ip", "-j", "link", "show").stdout):
            if link.get("ifindex") == peer:
                return link["ifname"]
        raise N.NetError(f"no host interface with index {peer} (the container's veth peer)")

    def limits(self, name: str) -> dict:
        """What the kernel and engine enforce for a node: for tests and the manifest."""
        c = self.containers[name]
        c.reload()
        hc = c.attrs["HostConfig"]
        out = {"container": c.name, "image": self.image, "nano_cpus": hc.get("NanoCpus"), "memory": hc.get("Memory"),
               "memory_swap": hc.get("MemorySwap"), "cap_add": hc.get("CapAdd"), "network": self.network.name}
        pid = c.attrs["State"].get("Pid") or 0
        if self.root and pid:
            out["uplink"] = _tc_show(["nsenter", "-t", str(pid), "-n"], "eth0")
        host_if = self.links[name].host_if if name in self.links else None
        if host_if:
            out["host_if"] = host_if
            out["downlink"] = _tc_show([], host_if)
        return out

    def _refresh(self, max_age: float = 0.5) -> dict[str, str]:
        """Status of every container of the run, one engine call at most every max_age seconds (80+ nodes)."""
        now = time.monotonic()
        if now - self._states_at > max_age:
            found = self.client.api.containers(all=True, filters={"label": f"{LABEL_RUN}={self.run_id}"})
            self._states = {c["Labels"].get(LABEL_NODE, ""): c["State"] for c in found}
            self._states_at = now
        return self._states

    def alive(self, name: str) -> bool:
        if name not in self.containers:
            return False
        try:  # a paused (frozen) container is alive, only not running
            return self._refresh().get(name) in ("running", "paused")
        except Exception:  # engine busy or restarting: the last known state
            return self._states.get(name) in ("running", "paused")

    def _state(self, name: str) -> dict | None:
        c = self.containers.get(name)
        if c is None:
            return None
        try:
            c.reload()
        except self._errors.NotFound:
            return {"Status": "removed"}
        return c.attrs["State"]

    def exit_reason(self, name: str) -> str | None:
        st = self._state(name)
        if st is None or st.get("Status") in ("running", "created", "restarting", "paused"):
            return None
        if st.get("Status") == "removed":
            return "node container was removed"
        oom = self.oom(name)
        if oom:
            return f"out of memory: killed by its {oom['limit_mb']} MB limit (peak {oom['peak_mb']:.0f} MB)"
        err = f" ({st['Error']})" if st.get("Error") else ""
        return f"node container exited with code {st.get('ExitCode')}{err}"

    def oom(self, name: str) -> dict | None:
        """{limit_mb, peak_mb} if the kernel killed the node at its memory limit.

        The container's cgroup is gone once it has exited, so its peak is the limit it was killed at."""
        st = self._state(name)
        if not st or not st.get("OOMKilled"):
            return None
        limit = self.profiles[name].memory_mb
        return {"limit_mb": limit, "peak_mb": float(limit)}

    def nodes(self) -> list[str]:
        return list(self.containers)

    # -- faults ----------------------------------------------------------------------------
    def kill(self, name: str) -> None:
        self.containers[name].kill()
        self._states_at = 0.0

    def pause(self, name: str) -> None:  # the engine's freezer: the container keeps its memory and sockets
        self.containers[name].pause()
        self._states_at = 0.0

    def resume(self, name: str) -> None:
        self.containers[name].unpause()
        self._states_at = 0.0

    def _host_link(self, name: str) -> N.Link:
        link = self.links.get(name)
        if not self.root or link is None or link.host_if is None:
            raise FaultUnsupported(f"{self.label} cuts a link at the container's host-side veth, which needs "
                                   "root (nsenter), an engine on this host and a shaped node")
        return link

    def cut_link(self, name: str) -> None:
        self._host_link(name).set_up(False)

    def restore_link(self, name: str) -> None:
        self._host_link(name).set_up(True)

    def reshape(self, launch: Launch) -> None:
        name = launch.name
        if not (self.root or self.exec_tc) or (not self.root and launch.limits.downlink_mbit > 0):
            raise FaultUnsupported("without root the downlink is emulated in the node's transport and "
                                   "cannot change while it runs")
        if not self.netem and launch.profile.latency_ms != self.profiles[name].latency_ms:
            raise FaultUnsupported("no netem in this kernel: a running node's latency is fixed in its transport")
        self._shape(name, self.containers[name], launch.limits, force=True)

    def _save_log(self, name: str, container) -> None:
        try:
            data = container.logs(stdout=True, stderr=True)
        except Exception:
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as fh:
            fh.write(data)

    def _remove(self, name: str, container) -> None:
        self._save_log(name, container)
        try:
            container.remove(force=True)
        except self._errors.NotFound:
            pass
        except self._errors.APIError as exc:
            if "already in progress" not in str(exc):
                raise
        self.containers.pop(name, None)
        self.links.pop(name, None)
        self._states_at = 0.0

    def stop(self, name: str) -> None:
        c = self.containers.get(name)
        if c is None:
            return
        try:
            c.stop(timeout=int(STOP_GRACE_S))
        except self._errors.NotFound:
            pass
        self._remove(name, c)

    def teardown(self) -> None:
        """Signal every node, give them one grace period in all, remove containers, then the network;
        then sweep whatever still carries this run's label (after a crash of an earlier attempt)."""
        items = list(self.containers.items())
        for _, c in items:
            try:
                c.kill(signal="SIGTERM")
            except self._errors.APIError:  # not running any more, or gone
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        while items and time.monotonic() < deadline:
            try:
                if not any(s == "running" for s in self._refresh(0.0).values()):
                    break
            except Exception:
                break
            time.sleep(0.1)
        for name, c in items:
            self._remove(name, c)
        if self.network is not None:
            try:
                self.network.remove()
            except self._errors.NotFound:
                pass
            except self._errors.APIError as exc:  # still has endpoints: the sweep below retries
                log.warning("removing network %s: %s", self.network.name, exc)
            self.network = None
        clean(self.run_id, self.client, self.engine.name if self.engine else None)


def _tc_show(prefix: list[str], dev: str) -> str:
    """`tc qdisc show` + `tc class show` of a device (where the rates are)."""
    return "\n".join(N.sh(*prefix, "tc", what, "show", "dev", dev, check=False).stdout.strip()
                     for what in ("qdisc", "class")).strip()


def clean(run_id: str | None = None, client=None, engine: str | None = None) -> list[str]:
    """Remove containers, then networks, labelled fedge.run (of one run, or of all; only those of
    one scenario engine if `engine`); [] without docker."""
    if client is None:
        try:
            import docker
            client = docker.from_env(timeout=10)
            client.ping()
        except Exception:  # no SDK, no engine: nothing of ours can exist there
            return []
    selector = {"label": [LABEL_RUN if run_id is None else f"{LABEL_RUN}={run_id}",
                          *([f"{LABEL_ENGINE}={engine}"] if engine else [])]}
    removed = []
    for kind, listing in (("container", client.containers), ("docker network", client.networks)):
        try:
            found = listing.list(all=True, filters=selector) if kind == "container" else listing.list(filters=selector)
        except Exception as exc:
            log.warning("cannot list %ss: %s", kind, exc)
            continue
        for obj in found:
            try:
                if kind == "container":
                    obj.remove(force=True)
                else:
                    obj.remove()
                labels = obj.labels if kind == "container" else (obj.attrs.get("Labels") or {})
                removed.append(f"{kind} {obj.name} of run {labels.get(LABEL_RUN)}")
            except Exception as exc:
                log.warning("cannot remove %s %s: %s", kind, obj.name, exc)
    return removed


__all__ = ["DockerBackend", "Engine", "LABEL_RUN", "clean", "clean_engines", "docker_missing", "known_engines"]
