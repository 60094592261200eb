"""Network kernel objects, Mininet-style: a namespace, a bridge, a veth link and its qdiscs.

Each class maps onto one kernel object and knows how to create and delete it. Names carry a
short run tag so `clean` can find leftovers of crashed runs. Addresses come from the run's own
private /24 on its own bridge: traffic never leaves the namespaces the testbed made.
"""
from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass, replace

NS_PREFIX = "fedge-"     # namespaces: fedge-<tag>-<node>
IF_PREFIX = "fe"         # interfaces: fe<tag>b (bridge), fe<tag>h<i> / fe<tag>n<i> (veth ends)
NET_BASE = "10.231"      # runs take 10.231.<k>.0/24, k free on this host


class NetError(RuntimeError):
    pass


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise NetError(f"{' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def run_tag(run_id: str) -> str:
    """The 4-hex tag in names of a run's namespaces and interfaces (IFNAMSIZ leaves no room for more)."""
    last = run_id.rsplit("-", 1)[-1]
    if len(last) >= 4 and all(c in "0123456789abcdef" for c in last[:4]):
        return last[:4]
    import hashlib
    return hashlib.sha1(run_id.encode()).hexdigest()[:4]


def used_subnets() -> set[int]:
    """Third octets of 10.231.k.0/24 already on some interface of this host."""
    out = sh("ip", "-j", "-4", "addr", "show", check=False).stdout or "[]"
    ks = set()
    for link in json.loads(out):
        for a in link.get("addr_info", []):
            parts = a.get("local", "").split(".")
            if ".".join(parts[:2]) == NET_BASE:
                ks.add(int(parts[2]))
    return ks


def pick_subnet(tag: str) -> ipaddress.IPv4Network:
    used = used_subnets()
    start = int(tag, 16) % 250 + 1
    for i in range(250):
        k = (start + i - 1) % 250 + 1
        if k not in used:
            return ipaddress.ip_network(f"{NET_BASE}.{k}.0/24")
    raise NetError(f"no free subnet left in {NET_BASE}.0.0/16")


@dataclass
class Namespace:
    name: str

    def create(self) -> None:
        sh("ip", "netns", "add", self.name)
        sh("ip", "-n", self.name, "link", "set", "lo", "up")

    def delete(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    @property
    def path(self) -> str:
        """The namespace file `ip netns add` made: what setns() opens (a forked node enters it so)."""
        return f"/run/netns/{self.name}"


@dataclass
class Bridge:
    name: str
    address: str  # with prefix, e.g. 10.231.7.1/24

    def create(self) -> None:
        sh("ip", "link", "add", self.name, "type", "bridge")
        cap_gso([], self.name)  # the aggregator's downlink traffic is segmented for the bridge
        sh("ip", "addr", "add", self.address, "dev", self.name)
        sh("ip", "link", "set", self.name, "up")

    def delete(self) -> None:
        sh("ip", "link", "del", self.name, check=False)

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


@dataclass
class Shaping:
    rate_mbit: float   # 0 = unlimited
    delay_ms: float    # applied only where netem exists


class Link:
    """A node's link as two interfaces: `node_if` inside the node's network namespace (reached
    with the command prefix `node_prefix`: `ip netns exec NS`, `nsenter -t PID -n`, or `docker
    exec ID`) and its veth peer `host_if` on this host, where this host can reach it (None: the
    downlink is then left to the node's transport)."""

    def __init__(self, node_if: str, node_prefix: list[str], host_if: str | None = None):
        self.node_if, self.node_prefix, self.host_if = node_if, list(node_prefix), host_if
        self._applied: dict[str, tuple[Shaping, bool]] = {}  # interface -> what shape() put on it

    def shape(self, uplink: Shaping, downlink: Shaping, netem: bool) -> None:
        """Uplink on the node side's egress, downlink on the host side's egress (towards the node).
        A new rate on a shaped interface changes its htb class in place: nothing queued is lost
        and nothing passes unshaped (a rate trace steps the link this way)."""
        self._apply(self.node_prefix, self.node_if, uplink, netem)
        if self.host_if is not None:
            self._apply([], self.host_if, downlink, netem)

    def _apply(self, prefix: list[str], dev: str, s: Shaping, netem: bool) -> None:
        old = self._applied.get(dev)
        if old == (s, netem):
            return
        same_delay = old is not None and old[1] == netem and (not netem or old[0].delay_ms == s.delay_ms)
        changed = same_delay and old[0].rate_mbit > 0 and s.rate_mbit > 0 and sh(
            *prefix, "tc", "class", "change", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
            *_htb_rate(s.rate_mbit), check=False).returncode == 0
        if not changed:  # first shaping, another structure, or the class is gone (a restarted sandbox)
            _shape(prefix, dev, s, netem)
        self._applied[dev] = (replace(s), netem)

    def set_up(self, up: bool) -> None:
        """Carrier on or off: with the host end down nothing crosses the link (a cut cable)."""
        if self.host_if is None:
            raise NetError(f"the host side of {self.node_if} is not reachable from here")
        sh("ip", "link", "set", self.host_if, "up" if up else "down")

    def qdiscs(self) -> dict[str, str]:
        """`tc qdisc show` of both ends, for tests and the manifest."""
        up = sh(*self.node_prefix, "tc", "qdisc", "show", "dev", self.node_if).stdout
        down = sh("tc", "qdisc", "show", "dev", self.host_if).stdout if self.host_if else ""
        return {"uplink": up.strip(), "downlink": down.strip()}


class VethLink(Link):
    """host_if (on the bridge, host side) <-> node_if (inside the node's namespace): made and removed here."""

    def __init__(self, host_if: str, node_if: str, ns: Namespace, address: str):
        super().__init__(node_if, ns.exec_prefix(), host_if)
        self.ns, self.address = ns, address  # node side, with prefix

    def create(self, bridge: Bridge) -> None:
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.node_if, "netns", self.ns.name)
        sh("ip", "link", "set", self.host_if, "master", bridge.name)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "-n", self.ns.name, "addr", "add", self.address, "dev", self.node_if)
        sh("ip", "-n", self.ns.name, "link", "set", self.node_if, "up")

    def delete(self) -> None:
        sh("ip", "link", "del", self.host_if, check=False)  # removes both ends


GSO_MAX = "1514"  # one Ethernet frame


def cap_gso(prefix: list[str], dev: str) -> None:
    """Stop the stack from handing `dev` 64 KB GSO super-packets: htb sends one whole and charges it
    afterwards, a burst of about 0.5 s at 1 Mbit/s (measured 1.07x the rate; 1.00x with this cap)."""
    sh(*prefix, "ip", "link", "set", "dev", dev, "gso_max_size", GSO_MAX, check=False)


def _shape(prefix: list[str], dev: str, s: Shaping, netem: bool) -> None:
    """htb class at the rate (burst sized for the rate), netem below it for delay where available."""
    tc = [*prefix, "tc"]
    sh(*tc, "qdisc", "del", "dev", dev, "root", check=False)
    if s.rate_mbit > 0:
        cap_gso(prefix, dev)
        sh(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
        sh(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", *_htb_rate(s.rate_mbit))
        if netem and s.delay_ms > 0:
            sh(*tc, "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", "netem", "delay", f"{s.delay_ms}ms",
               "limit", "10000")
    elif netem and s.delay_ms > 0:
        sh(*tc, "qdisc", "add", "dev", dev, "root", "netem", "delay", f"{s.delay_ms}ms", "limit", "10000")


def _htb_rate(rate_mbit: float) -> list[str]:
    """htb class arguments for a rate: burst about 10 ms of traffic, at least 2 MTU."""
    kbit = max(8, int(rate_mbit * 1000))
    burst = str(max(3028, int(rate_mbit * 1e6 / 8 / 100)))
    return ["rate", f"{kbit}kbit", "ceil", f"{kbit}kbit", "burst", burst, "cburst", burst]


def leftovers(tag: str | None = None) -> dict[str, list[str]]:
    """Namespaces and interfaces of the testbed on this host (of one run tag, or all)."""
    ns = [line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = [l["ifname"] for l in json.loads(sh("ip", "-j", "link", "show", check=False).stdout or "[]")]
    pre_ns, pre_if = NS_PREFIX + (f"{tag}-" if tag else ""), IF_PREFIX + (tag or "")
    return {"namespaces": [n for n in ns if n.startswith(pre_ns)],
            "interfaces": [i.split("@")[0] for i in links if i.startswith(pre_if) and (tag or _is_ours(i))]}


def _is_ours(ifname: str) -> bool:
    """fe + 4 hex tag + b|h|n (+ index): the only interface names this module makes."""
    name = ifname.split("@")[0]
    return len(name) >= 7 and all(c in "0123456789abcdef" for c in name[2:6]) and name[6] in "bhn"
