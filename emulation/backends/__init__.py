"""Backends: how nodes become sandboxes. `process` needs nothing; `netns` needs root + cgroups;
`docker` needs a docker engine and the node image (`make image`)."""
from .base import RUN_ENV, Backend, FaultUnsupported
from .docker import DockerBackend, docker_missing
from .netns import NetnsBackend
from .process import ProcessBackend

BACKENDS: dict[str, type[Backend]] = {"process": ProcessBackend, "netns": NetnsBackend, "docker": DockerBackend}


def netns_missing(caps: dict) -> list[str]:
    """What this host lacks for the netns backend (empty: it can run)."""
    missing = []
    if not caps.get("root"):
        missing.append("root")
    if not caps.get("netns"):
        missing.append("ip netns (iproute2)")
    if caps.get("cgroup", {}).get("version") is None:
        missing.append("writable cpu+memory cgroup controllers")
    if not any(caps.get("qdiscs", {}).get(q) for q in ("htb", "tbf")):
        missing.append("an htb or tbf qdisc")
    return missing


def choose(requested: str, caps: dict) -> tuple[str, str]:
    """(backend name, why) for `requested` in auto|process|netns|docker given probed capabilities."""
    missing = netns_missing(caps)
    if requested == "auto":
        if not missing:
            cg = caps["cgroup"]["version"]
            return "netns", (f"auto: root, network namespaces, cgroup v{cg} cpu+memory and tc "
                             f"{'+netem' if caps.get('netem') else '(no netem)'} are available; the same kernel "
                             "limits as docker with less start-up cost per node")
        lacking = docker_missing(caps)
        if not lacking:
            return "docker", f"auto: the netns backend needs {', '.join(missing)}; a docker engine and the node image are here"
        return "process", (f"auto: the netns backend needs {', '.join(missing)}; docker: {'; '.join(lacking)}; "
                           "falling back to unprivileged processes (limits emulated, not enforced)")
    if requested == "netns" and missing:
        raise ValueError(f"backend netns cannot run here: missing {', '.join(missing)}; use --backend process")
    if requested == "docker":
        lacking = docker_missing(caps)
        if lacking:
            raise ValueError(f"backend docker cannot run here: {'; '.join(lacking)}; "
                             "use --backend netns or --backend process")
        return "docker", f"requested: docker engine {caps['docker'].get('version')} and the node image are available"
    if requested not in BACKENDS:
        raise ValueError(f"backend {requested!r} is not available in this version; available: {', '.join(BACKENDS)}")
    return requested, "requested"


__all__ = ["BACKENDS", "RUN_ENV", "Backend", "FaultUnsupported", "DockerBackend", "NetnsBackend", "ProcessBackend", "choose",
           "docker_missing", "netns_missing"]
