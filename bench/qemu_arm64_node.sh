#!/bin/sh
# An arm64 device without a Pi: a Debian bookworm arm64 root (debootstrap) run under qemu-user,
# the node installed in it by node/install.sh alone, joining a run as a `backend: remote` device.
# Prints what it took: install time, venv size, and the device's own round times.
#
#     sudo sh bench/qemu_arm64_node.sh [DIR]      (default /var/tmp/fedge-arm64; reused when there)
#
# Needs root, Debian's qemu-user-static, binfmt-support and debootstrap (installed if missing), and
# 6 GB in DIR. TORCH_INDEX is passed to node/install.sh (TORCH_INDEX=pypi: PyPI's CUDA build of torch).
# Under emulation training is about 600x slower than on this host (measured: a round of 2 LoRA steps,
# 252 s against 0.4 s): this checks the path (install, join, train, results), not the speed.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "qemu_arm64_node.sh: needs root (debootstrap, chroot, binfmt)" >&2; exit 1; }
DIR=${1:-/var/tmp/fedge-arm64}
DIR=$(mkdir -p "$DIR" && cd "$DIR" && pwd)
R=$DIR/root
PY=${PYTHON:-$REPO/.venv/bin/python}
cd "$REPO"

for pkg in qemu-user-static binfmt-support debootstrap; do
  dpkg -s "$pkg" >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null
done
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "qemu_arm64_node.sh: no binfmt entry for aarch64" >&2; exit 1; }

if [ ! -x "$R/usr/bin/python3" ]; then
  MIRROR=$("$PY" -c 'from emulation.image import apt_mirror; print(apt_mirror())')
  echo "debootstrap arm64 into $R from $MIRROR"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$R" "$MIRROR" > "$DIR/debootstrap.log" 2>&1
fi

RUN=
cleanup() {
  [ -n "$RUN" ] && kill "$RUN" 2>/dev/null || true
  for m in dev proc; do mountpoint -q "$R/$m" && umount -l "$R/$m"; done
  return 0
}
trap cleanup EXIT INT TERM
# no /sys: torch's cpuinfo then reads this host's x86 CPU files as an arm64 CPU's and crashes
# under qemu (seen: signal 11); without them it warns and goes on
for m in proc dev; do mountpoint -q "$R/$m" || mount --bind "/$m" "$R/$m"; done
# pip in the device trusts what this host trusts (e.g. a TLS-inspecting proxy's CA)
cp /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$R/etc/resolv.conf"
rm -rf "$R/opt/fedge/node" "$R/opt/fedge/docker"
mkdir -p "$R/opt/fedge"
cp -r "$REPO/node" "$REPO/docker" "$R/opt/fedge/"
find "$R/opt/fedge" -name __pycache__ -prune -exec rm -rf {} +

start=$(date +%s)
env -u PIP_FIND_LINKS -u PIP_CONSTRAINT ${TORCH_INDEX:+TORCH_INDEX=$TORCH_INDEX} \
  chroot "$R" sh /opt/fedge/node/install.sh 2>&1 | grep -v -e 'cpuinfo' -e 'MIDR_EL1' | tail -3
echo "install: $(( $(date +%s) - start )) s, $(du -sh "$R/opt/fedge/.venv-node" | cut -f1) in .venv-node"

# a run with one emulated node and this device, as a hand-started remote node on loopback
OUT=$DIR/run
rm -rf "$OUT"
cat > "$DIR/scenario.yaml" <<'EOF'
name: qemu-arm64
seed: 3
backend: process
dilation: off
model: {name: all-minilm-l6-v2, num_layers: 2}
data: {dataset: rotten_tomatoes, test_size: 40, train_size: 300, max_len: 16, partition: {kind: iid}}
training: {rounds: 2, local_steps: 2, batch_size: 8, lr: 0.001, target_accuracy: 0.99, round_deadline_s: 1800}
nodes:
  - {group: emu, count: 1, profile: host}
  - {group: pi, count: 1, profile: rpi4, backend: remote}
strategies:
  baseline: fedlora
  run: [{name: fedlora, params: {rank: 2}}]
aggregator: {bind: 127.0.0.1, register_timeout_s: 1800}
EOF
CI=true "$PY" -m testbed run "$DIR/scenario.yaml" --out "$OUT" > "$DIR/run.log" 2>&1 &
RUN=$!  # SIGTERM ends it cleanly (cleanup below)
i=0
until [ -s "$OUT/join.sh" ]; do
  sleep 1; i=$((i + 1))
  [ $i -lt 300 ] || { echo "the run printed no join command: see $DIR/run.log" >&2; exit 1; }
done
# the join line as the operator would paste it on the device (it holds the device's key: 0600)
(umask 077 && { echo 'cd /opt/fedge && PATH=/opt/fedge/.venv-node/bin:$PATH'
                echo "$(grep -- '--name pi-0' "$OUT/join.sh") --threads 1"; } > "$R/tmp/join.sh")
start=$(date +%s)
if ! chroot "$R" sh /tmp/join.sh > "$DIR/node.log" 2>&1; then
  rm -f "$R/tmp/join.sh"
  echo "the device's node failed: see $DIR/node.log" >&2
  exit 1
fi
rm -f "$R/tmp/join.sh"
wait "$RUN"
RUN=
echo "run: $(( $(date +%s) - start )) s from the device's start to the run's end; $(tail -1 "$DIR/run.log")"
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
dev = {n["name"]: n for n in json.loads((out / "manifest.json").read_text())["nodes"]}["pi-0"]["device"]
print(f"device: {dev.get('machine')}, {dev.get('cpus')} cpus, Python {dev.get('python')}")
for line in (out / "rounds.jsonl").read_text().splitlines():
    row = json.loads(line)
    for n in row["nodes"]:
        print(f"round {row['round']} {n['node']}: {n['status']}, compute {n['compute_s']:.1f} s, "
              f"upload {n['upload_s']:.2f} s, download {n['download_s']:.2f} s, peak {n['peak_mem_mb']:.0f} MB")
PY
