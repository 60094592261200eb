#!/bin/sh
# Install the node program on a device (Raspberry Pi OS / Debian bookworm, arm64 or x86_64, Python 3.11):
#
#     git clone <this repository> fedge && sh fedge/node/install.sh
#
# It makes fedge/.venv-node with only what the node needs (CPU torch, transformers, peft, pyzmq,
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
# torch: PyPI's Linux wheels of torch 2.13.0 are CUDA builds on aarch64 as on x86_64 (measured on
# arm64 under qemu-user: 4.8 GB with the nvidia libraries, which it cannot import without). The CPU
# build comes from PyTorch's own CPU index; TORCH_INDEX=pypi takes PyPI's (e.g. behind a mirror of
# PyPI only), TORCH_INDEX=URL another index.
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH=$(grep '^torch==' docker/requirements.txt)
if [ "$TORCH_INDEX" = pypi ]; then
  echo "node/install.sh: $TORCH from PyPI: a CUDA build (several GB of nvidia libraries, unused on a Pi)" >&2
else
  "$VENV/bin/python" -m pip install -q --index-url "$TORCH_INDEX" "$TORCH" \
    || { echo "node/install.sh: cannot install $TORCH from $TORCH_INDEX; set TORCH_INDEX=pypi for PyPI's CUDA build" >&2; exit 1; }
fi
# the rest, with torch pinned in the same command (already there: nothing more of it is fetched)
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
