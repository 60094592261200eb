"""Who may talk to the aggregator: ZeroMQ CURVE with one key pair per run and one per node.

Every run generates a server key pair and a key pair for each node. The aggregator's ROUTER is
a CURVE server; a ZAP handler admits only the nodes' public keys and gives each connection its
node's name as User-Id, so a node can say HELLO only under its own name. Emulated nodes get
their secret key in their environment (FEDGE_NODE_KEY) and the server's public key on their
command line, exactly as a real device does with its one-line join command. Refused attempts
are counted and logged (the aggregator's `refused`).

Keys are written to `keys.json` (mode 0600) in the run folder, so remote devices can be given
theirs again; the manifest holds only the server's public key.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from node.agent import NODE_KEY_ENV  # the node's CURVE secret key (z85), read by `python -m node`

log = logging.getLogger("testbed.auth")


def curve_available() -> bool:
    return bool(zmq.has("curve"))


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds secret keys)."""
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


@dataclass
class RunKeys:
    server_public: str
    server_secret: str
    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (public, secret), z85

    @classmethod
    def generate(cls, names) -> "RunKeys":
        pub, sec = zmq.curve_keypair()
        keys = cls(pub.decode(), sec.decode())
        for n in names:
            p, s = zmq.curve_keypair()
            keys.nodes[n] = (p.decode(), s.decode())
        return keys

    def save(self, path: Path) -> None:
        write_private(path, json.dumps({"server_public": self.server_public, "server_secret": self.server_secret,
                                        "nodes": {n: {"public": p, "secret": s} for n, (p, s) in self.nodes.items()}},
                                       indent=1))

    @classmethod
    def load(cls, path: Path) -> "RunKeys":
        d = json.loads(Path(path).read_text())
        return cls(d["server_public"], d["server_secret"],
                   {n: (v["public"], v["secret"]) for n, v in d["nodes"].items()})

    def join_env(self, name: str) -> dict[str, str]:
        return {NODE_KEY_ENV: self.nodes[name][1]}

    def join_args(self) -> list[str]:
        return ["--server-key", self.server_public]


class NodeAuthenticator(ThreadAuthenticator):
    """ZAP handler: admits the run's node keys; the User-Id of a connection is its node's name."""

    def __init__(self, context: zmq.Context, keys: RunKeys):
        super().__init__(context)
        self.names = {pub.encode(): name for name, (pub, _) in keys.nodes.items()}
        self.refused: deque = deque(maxlen=1000)
        self.refused_total = 0

    # called by pyzmq's ZAP loop for every CURVE handshake (credentials provider protocol)
    def callback(self, domain: str, z85_key: bytes) -> bool:
        if z85_key in self.names:
            return True
        self.refused_total += 1
        self.refused.append((time.time(), z85_key.decode(errors="replace")[:12]))
        log.warning("refused a connection: unknown CURVE key %s...", z85_key.decode(errors="replace")[:12])
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names[zmq.utils.z85.encode(client_public_key)]

    def start(self) -> None:
        super().start()
        self.configure_curve_callback("*", credentials_provider=self)
