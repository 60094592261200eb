"""`python -m testbed calibrate`: measure a real device and write the profile that emulates it.

A device (a Raspberry Pi, a Jetson, any host) joins with the ordinary node program
(`python -m node --connect ... --name NAME`); the calibrator is a one-node aggregator that sends
it a fixed workload and times it from both ends:

- cpu_share: the reference host (this machine) runs the same LoRA round with ONE torch thread
  in a fresh interpreter; cpu_share = host compute time / device compute time, i.e. the device's
  training throughput (all its threads) in units of one reference-host core, the unit of
  emulation/profiles.py;
- downlink_mbit and latency_ms: two TASKs of different size (head only, and the last blocks in
  full) timed from sending to the device's "train" heartbeat; the slope of time against bytes
  is the rate, the intercept the round trip (latency_ms = intercept / 2, one way);
- uplink_mbit: the large RESULT's bytes over the time between the device's "upload" heartbeat and
  the RESULT's arrival (both cross the same link, so latency cancels);
- memory_mb: the memory the device reports available when it joins (what a run can use);
- threads: the torch threads the device runs with.

Each measurement is repeated and the fastest kept: queueing on a shared network, and on a small
host the device starting up beside the reference, only ever add time.
The result is a YAML file with a `profiles:` entry to paste into a scenario.
"""
from __future__ import annotations

import datetime as dt
import platform
import shlex
import statistics
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import yaml

from node.plan import LoraSpec, Plan, TrainSpec

TRAIN = TrainSpec(local_steps=5, batch_size=16, max_len=32, lr=0.005, seed=0)


def plans(num_blocks: int, steps: int) -> dict[str, Plan]:
    one_step = replace(TRAIN, local_steps=1)
    return {
        "compute": Plan("lora", tuple(range(num_blocks)), lora=LoraSpec(r=8, alpha=16),
                        train=replace(TRAIN, local_steps=steps)),
        "small": Plan("full", (), train=one_step),
        "large": Plan("full", tuple(range(max(0, num_blocks - 2), num_blocks)), train=one_step),
    }


class CalibrationError(RuntimeError):
    pass


def calibrate(name: str, bind: str = "127.0.0.1", port: int = 0, *, model: str = "all-minilm-l6-v2",
              num_layers: int | None = None, steps: int = 5, repeats: int = 2, timeout_s: float = 600.0,
              say=print) -> dict:
    """Run the calibration against the device that joins as `name`; returns the profile dict
    (fields of emulation.profiles.Profile) and the raw measurements."""
    from emulation.launch import option
    from node import trainer
    from node.data import announce, load_dataset

    from . import costmodel
    from .aggregator import Aggregator
    spec = trainer.ModelSpec(model, 2, num_layers, 0)
    base, _ = trainer.load_base(spec)
    L = trainer.num_blocks(base)
    ps = plans(L, steps)
    ds = load_dataset("rotten_tomatoes")
    shard = np.arange(min(256, len(ds)), dtype=np.int32)
    run_id = f"calibrate-{uuid.uuid4().hex[:8]}"

    def welcome(_):
        return {"model": asdict(spec), "data": announce("rotten_tomatoes", 32)}, {"shard": shard}

    agg = Aggregator(run_id, {name: "calibrate"}, welcome, bind=bind, port=port)
    try:
        say(f"start the device: python -m node {shlex.quote(option('connect', agg.endpoint))} "
            f"{shlex.quote(option('name', name))}")
        if agg.wait_ready({name}, timeout_s, lambda _: True) != {name}:
            raise CalibrationError(f"no device joined as {name!r} within {timeout_s:g} s at {agg.endpoint}")
        caps = dict(agg.peers[name].hello.get("capabilities") or {})
        states = {k: trainer.trainable_state(trainer.build_model(base, p)) for k, p in ps.items()}
        rec: dict[str, list] = {k: [] for k in ps}
        rnd = 0
        # compute once more than the transfers: the first round pays one-time costs
        for kind in (*(["compute"] * (repeats + 1)), *(["small", "large"] * repeats)):
            rnd += 1
            out = agg.run_round(rnd, "calibrate", {name: (ps[kind].to_dict(), states[kind])}, timeout_s, lambda _: True,
                                lambda *a: None)
            r = out.records[name]
            if r.status != "ok":
                raise CalibrationError(f"the device failed the {kind} task: {r.reason}")
            rec[kind].append(r)
            say(f"  {kind}: down {r.bytes_down / 1e6:.2f} MB in {r.download_s:.3f} s, up {r.bytes_up / 1e6:.2f} MB "
                f"in {r.upload_s:.3f} s, compute {r.compute_s:.2f} s")
        # the reference once the device is idle: while it starts (imports torch, loads the model)
        # it would share a small host's cores with the reference
        say(f"reference: the same LoRA round ({steps} steps, batch 16, length 32) on this host, one thread ...")
        host_s = float(costmodel.measure_round(ps["compute"], num_layers=num_layers, threads=1, examples=256,
                                               repeats=3)["compute_s"])  # fastest of 3: the first pays one-time costs
    finally:
        agg.close(say_bye=True)
    c = min(rec["compute"], key=lambda r: r.compute_s)
    small = min(rec["small"], key=lambda r: r.download_s)
    large = min(rec["large"], key=lambda r: r.download_s)
    slope = (large.download_s - small.download_s) / max(1, large.bytes_down - small.bytes_down)  # s per byte
    if slope <= 0:
        raise CalibrationError("the larger transfer was not slower than the small one: the link is too fast "
                               "to measure with these payloads (or the network was busy); run again")
    down_mbit = 8 / slope / 1e6
    rtt = max(0.0, small.download_s - small.bytes_down * slope)
    up = min((r for r in rec["large"] if r.upload_s > 0), key=lambda r: r.upload_s / r.bytes_up, default=None)
    up_mbit = 8 * up.bytes_up / up.upload_s / 1e6 if up else 0.0
    share = host_s / c.compute_s if c.compute_s > 0 else 0.0
    mem = int(caps.get("mem_available_mb") or caps.get("mem_total_mb") or 0)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    profile = {
        "cpu_share": round(share, 3), "threads": int(caps.get("threads") or 1), "memory_mb": mem,
        "uplink_mbit": round(up_mbit, 2), "downlink_mbit": round(down_mbit, 2), "latency_ms": round(rtt / 2 * 1e3, 1),
        "source": (f"calibrated {when}: {caps.get('hostname', '?')} ({caps.get('machine', '?')}, {caps.get('cpus', '?')} "
                   f"cpus) against {platform.node()} ({platform.machine()}) one core"),
    }
    raw = {"host_compute_s": host_s,
           "device_compute_s": c.compute_s, "device_compute_runs_s": [r.compute_s for r in rec["compute"]], "device_peak_mem_mb": c.peak_mem_mb,
           "small": {"bytes_down": small.bytes_down, "download_s": small.download_s},
           "large": {"bytes_down": large.bytes_down, "download_s": large.download_s, "bytes_up": large.bytes_up,
                     "upload_s": large.upload_s},
           "all_download_s": {k: [r.download_s for r in v] for k, v in rec.items() if k != "compute"},
           "median_upload_s": statistics.median(r.upload_s for r in rec["large"]),
           "device": caps, "model": asdict(spec), "steps": steps}
    return {"profile": profile, "measurements": raw}


def write(path: Path, name: str, result: dict) -> None:
    head = ["# Written by `python -m testbed calibrate`. Paste the profiles: entry into a scenario and use",
            f"# `profile: {name}` in a node group. Raw measurements follow as comments.", ""]
    body = yaml.safe_dump({"profiles": {name: result["profile"]}}, sort_keys=False)
    raw = yaml.safe_dump(result["measurements"], sort_keys=False).splitlines()
    Path(path).write_text("\n".join(head) + body + "\n" + "\n".join(f"# {ln}" for ln in raw) + "\n")


def measured_power(idle_w: float | None, load_w: float | None, tx_w: float | None = None,
                   rx_w: float | None = None) -> dict | None:
    """The profile's power model from a power meter's readings (emulation.profiles.Power): idle and
    under training load, and while sending and receiving if measured (else the radio counts as
    idle: nothing above it). None without readings; ValueError for half a pair or an impossible one."""
    from emulation.profiles import Power
    if idle_w is None and load_w is None:
        if tx_w is not None or rx_w is not None:
            raise ValueError("--tx-w and --rx-w need --idle-w and --load-w")
        return None
    if idle_w is None or load_w is None:
        raise ValueError("give both --idle-w and --load-w (watts at idle and while training)")
    if (tx_w is None) != (rx_w is None):
        raise ValueError("give both --tx-w and --rx-w, or neither")
    radio = "measured" if tx_w is not None else "not measured: counted at idle"
    power = Power(idle_w, load_w, idle_w if tx_w is None else tx_w, idle_w if rx_w is None else rx_w,
                  source=f"power meter readings given to calibrate; radio {radio}")
    return {k: v for k, v in asdict(power).items() if v is not None}


def cmd(args) -> int:
    import sys
    try:
        power = measured_power(args.idle_w, args.load_w, args.tx_w, args.rx_w)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = calibrate(args.name, args.bind, args.port, model=args.model, num_layers=args.num_layers,
                           steps=args.steps, repeats=args.repeats, timeout_s=args.timeout,
                           say=lambda s: print(s, flush=True))
    except CalibrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if power:
        result["profile"]["power"] = power
    out = Path(args.out or f"{args.name}.profile.yaml")
    write(out, args.name, result)
    p = result["profile"]
    print(f"{args.name}: cpu_share {p['cpu_share']}, threads {p['threads']}, memory {p['memory_mb']} MB, "
          f"up {p['uplink_mbit']} Mbit/s, down {p['downlink_mbit']} Mbit/s, latency {p['latency_ms']} ms -> {out}")
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="measure a real device that joins and write a profile for it")
    c.add_argument("--name", required=True, help="the device's node name (and the profile's name)")
    c.add_argument("--bind", default="127.0.0.1", help="address to listen on (a LAN address for a real device)")
    c.add_argument("--port", type=int, default=0, help="port (default: any free port; the join command says it)")
    c.add_argument("--model", default="all-minilm-l6-v2")
    c.add_argument("--num-layers", type=int, default=None, help="blocks of the model (default: all)")
    c.add_argument("--steps", type=int, default=5, help="local steps of the compute round")
    c.add_argument("--repeats", type=int, default=2, help="repetitions of each transfer, and of the compute round plus one (the fastest is kept)")
    c.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the device and for each task")
    c.add_argument("--out", help="profile file to write (default NAME.profile.yaml)")
    c.add_argument("--idle-w", type=float, help="the device's power at idle, read from a power meter (W)")
    c.add_argument("--load-w", type=float, help="its power while training, e.g. during the calibration's compute round (W)")
    c.add_argument("--tx-w", type=float, help="its power while sending (W; default: counted at idle)")
    c.add_argument("--rx-w", type=float, help="its power while receiving (W; default: counted at idle)")
    c.set_defaults(fn=cmd)

