#!/bin/sh
# Install the node program on a device (Raspberry Pi OS / Debian bookworm, arm64 or x86_64, Python 3.11):
#
#     git clone <this repository> fedge && sh fedge/node/install.sh
#
# It makes fedge/.venv-node with only what the node needs (torch CPU, transformers, peft, pyzmq,
# msgpack, psutil, numpy, and the model and text packages), pinned as in the node image
# (docker/requirements*.txt). Nothing of testbed/ or emulation/ is used on the device.
# Then join a run with the line the testbed printed for this device (also in the run's join.sh):
#
#     FEDGE_NODE_KEY=... .venv-node/bin/python -m node --connect tcp://AGGREGATOR:PORT --name NAME --server-key ...
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
  || { echo "node/install.sh: needs Python 3.11 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2; exit 1; }
VENV=${VENV:-.venv-node}
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch pinned in the same command as the rest: on x86_64 an unpinned torch would pull a CUDA build;
# PyPI's aarch64 torch wheels are CPU builds
"$VENV/bin/python" -m pip install -q -r docker/requirements.txt
"$VENV/bin/python" -m pip install -q --no-deps -r docker/requirements-nodeps.txt
"$VENV/bin/python" -m node --help >/dev/null
"$VENV/bin/python" - <<'PY'
import platform, torch
from node import trainer
trainer.load_base(trainer.ModelSpec(num_layers=1))
print(f"node ready on {platform.machine()}: torch {torch.__version__}, {torch.get_num_threads()} threads, model loads")
PY
echo "join a run with: $VENV/bin/python -m node --connect tcp://AGGREGATOR:PORT --name NAME (the testbed prints the full line)"
