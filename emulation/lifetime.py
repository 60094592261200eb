"""How long the processes we start live: never longer than the one that started them.

Every node (exec'd, forked from the zygote, or the zygote itself) asks the kernel for SIGKILL
when its parent dies (PR_SET_PDEATHSIG), so a runner that crashes or is killed leaves no node
behind, and every node is the first the host's OOM killer takes (`hostmem.kill_me_first`).
"""
from __future__ import annotations

import ctypes
import signal

from .hostmem import kill_me_first

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; a no-op where prctl is missing)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def node_preexec() -> None:
    """In a node before exec: it dies with the runner, and is the first the host's OOM killer takes."""
    die_with_parent()
    kill_me_first()
