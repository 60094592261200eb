"""Backends: how nodes become sandboxes. `process` needs nothing; netns and docker need root/engine."""
from .base import RUN_ENV, Backend
from .process import ProcessBackend

BACKENDS: dict[str, type[Backend]] = {"process": ProcessBackend}


def choose(requested: str, caps: dict) -> tuple[str, str]:
    """(backend name, why) for `requested` in auto|process|netns|docker given probed capabilities."""
    if requested == "auto":
        return "process", ("process: the only backend built so far (netns and docker backends come with the "
                           "real-device-emulation work); root=%s, docker=%s" % (caps.get("root"),
                                                                              caps.get("docker", {}).get("available")))
    if requested not in BACKENDS:
        raise ValueError(f"backend {requested!r} is not available in this version; available: {', '.join(BACKENDS)}")
    return requested, "requested"


__all__ = ["BACKENDS", "RUN_ENV", "Backend", "ProcessBackend", "choose"]
