#!/bin/sh
# Build the docker backend's node image (same as `make image`). Options: --base debootstrap|registry, --force.
# FEDGE_IMAGE_BASE=registry uses FROM python:3.11-slim instead of the offline debootstrap base.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" -m emulation.image build "$@"
