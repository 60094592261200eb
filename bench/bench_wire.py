#!/usr/bin/env python
"""Wire-format throughput: node.protocol.encode/decode against a plain memory copy.

For payloads shaped like the real ones (LoRA r=8 on the 6 blocks of MiniLM + head, full
fine-tuning of the last 2 blocks + head, one 64 MB tensor) this prints, per payload:

- encode / decode GB/s: payload bytes / time of one P.encode(msg) / P.decode(frames);
- memcpy GB/s: the same tensors copied into preallocated arrays (np.copyto), the cost of
  touching every byte once;
- (enc+dec)/memcpy: time of encode + decode over time of that one copy (below 1: the wire
  format costs less than copying the payload once, i.e. it is zero-copy);
- zmq wire / zmq raw GB/s: one message DEALER -> ROUTER over tcp://127.0.0.1 (encode,
  send_multipart copy=False, recv_multipart copy=False, decode) against one raw frame of the
  same total size over the same sockets, and their ratio (1.0 = the format costs nothing on
  the wire);
- zmq frames GB/s: the already encoded frames (header + one frame per tensor) sent and
  received the same way but not encoded/decoded: wire/frames is the format's own cost,
  frames/raw the cost of one frame per tensor.

Every figure is the best of N timed batches (each batch long enough to time), with the
compared operations interleaved batch by batch so that machine noise hits them alike.
Nothing asserts on time: this prints figures only. `--quick` finishes in a few seconds.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from node import protocol as P  # noqa: E402

HIDDEN, INTERMEDIATE, BLOCKS = 384, 1536, 6   # all-MiniLM-L6-v2


# -- payloads (names and shapes as node.trainer.trainable_state gives them) --------------------
def lora_shapes(rank: int = 8, blocks: int = BLOCKS) -> dict[str, tuple[int, ...]]:
    """FedLoRA: A/B of query and value on every block, pooler and classifier in full."""
    out: dict[str, tuple[int, ...]] = {}
    for i in range(blocks):
        for t in ("query", "value"):
            pre = f"base_model.model.bert.encoder.layer.{i}.attention.self.{t}"
            out[f"{pre}.lora_A.weight"] = (rank, HIDDEN)
            out[f"{pre}.lora_B.weight"] = (HIDDEN, rank)
    out["base_model.model.bert.pooler.dense.weight"] = (HIDDEN, HIDDEN)
    out["base_model.model.bert.pooler.dense.bias"] = (HIDDEN,)
    out["base_model.model.classifier.weight"] = (2, HIDDEN)
    out["base_model.model.classifier.bias"] = (2,)
    return out


def full_shapes(last: int = 2, blocks: int = BLOCKS) -> dict[str, tuple[int, ...]]:
    """Full fine-tuning of the last `last` BERT blocks, pooler and classifier."""
    h, f = HIDDEN, INTERMEDIATE
    out: dict[str, tuple[int, ...]] = {}
    for i in range(blocks - last, blocks):
        pre = f"bert.encoder.layer.{i}"
        for t in ("query", "key", "value"):
            out[f"{pre}.attention.self.{t}.weight"] = (h, h)
            out[f"{pre}.attention.self.{t}.bias"] = (h,)
        out[f"{pre}.attention.output.dense.weight"] = (h, h)
        out[f"{pre}.attention.output.dense.bias"] = (h,)
        out[f"{pre}.attention.output.LayerNorm.weight"] = (h,)
        out[f"{pre}.attention.output.LayerNorm.bias"] = (h,)
        out[f"{pre}.intermediate.dense.weight"] = (f, h)
        out[f"{pre}.intermediate.dense.bias"] = (f,)
        out[f"{pre}.output.dense.weight"] = (h, f)
        out[f"{pre}.output.dense.bias"] = (h,)
        out[f"{pre}.output.LayerNorm.weight"] = (h,)
        out[f"{pre}.output.LayerNorm.bias"] = (h,)
    out["bert.pooler.dense.weight"] = (h, h)
    out["bert.pooler.dense.bias"] = (h,)
    out["classifier.weight"] = (2, h)
    out["classifier.bias"] = (2,)
    return out


def big_shapes() -> dict[str, tuple[int, ...]]:
    return {"big": (4096, 4096)}   # 64 MiB of float32


PAYLOADS = {"lora-r8": lora_shapes, "full-last2": full_shapes, "one-64MB": big_shapes}


def make_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in shapes.items()}


def nbytes(state: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for v in state.values())


# -- timing ------------------------------------------------------------------------------------
def _batch(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t


def best_of(fns: dict[str, callable], repeats: int, min_batch_s: float) -> dict[str, float]:
    """Best seconds per call of each fn: calibrate a batch size, then `repeats` interleaved batches."""
    sizes = {}
    for k, fn in fns.items():
        fn()  # warm up
        n = 1
        while True:
            dt = _batch(fn, n)
            if dt >= min_batch_s or n >= 1 << 20:
                break
            n = max(n * 2, int(n * min_batch_s / max(dt, 1e-9) * 1.2))
        sizes[k] = n
    best = {k: float("inf") for k in fns}
    gc.collect()
    for _ in range(repeats):
        for k, fn in fns.items():
            best[k] = min(best[k], _batch(fn, sizes[k]) / sizes[k])
    return best


# -- the measurements --------------------------------------------------------------------------
def memory(state: dict[str, np.ndarray], repeats: int, min_batch_s: float) -> dict[str, float]:
    from node.plan import LoraSpec, Plan
    meta = {"plan": Plan("lora", tuple(range(BLOCKS)), lora=LoraSpec(r=8, alpha=16)).to_dict(),
            "task_id": "fedlora/1/node-000"}
    msg = P.Message(P.TASK, run="bench", round=1, meta=meta, tensors=state)
    frames = P.encode(msg)
    back = P.decode(frames)
    assert all(np.array_equal(back.tensors[k], v) for k, v in state.items())
    dst = {k: np.empty_like(v) for k, v in state.items()}
    pairs = [(dst[k], v) for k, v in state.items()]

    def memcpy():
        for d, s in pairs:
            np.copyto(d, s)

    return best_of({"encode": lambda: P.encode(msg), "decode": lambda: P.decode(frames), "memcpy": memcpy},
                   repeats, min_batch_s)


def over_zmq(state: dict[str, np.ndarray], repeats: int, min_batch_s: float) -> dict[str, float]:
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        for s in (router, dealer):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, 30_000)   # never hang the benchmark
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        msg = P.Message(P.RESULT, run="bench", round=1, meta={"samples": 100, "task_id": "fedlora/1/node-000"},
                        tensors=state)
        size = P.frames_nbytes(P.encode(msg))
        raw = np.ones(size, dtype=np.uint8)

        def wire():
            dealer.send_multipart(P.encode(msg), copy=False)
            got = router.recv_multipart(copy=False)
            P.decode(got[1:])

        def plain():
            dealer.send(raw, copy=False)
            got = router.recv_multipart(copy=False)
            assert len(got[1]) == size

        frames = P.encode(msg)   # the same frames sent again without encode/decode: multipart cost only

        def multipart():
            dealer.send_multipart(frames, copy=False)
            got = router.recv_multipart(copy=False)
            assert len(got) == len(frames) + 1

        dealer.send(b"hi")   # establish the connection outside the timed part
        router.recv_multipart()
        out = best_of({"zmq_wire": wire, "zmq_raw": plain, "zmq_frames": multipart}, repeats, min_batch_s)
        out["zmq_bytes"] = size
        return out
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter repeats (a few seconds)")
    ap.add_argument("--repeats", type=int, default=None, help="timed batches per figure (best is kept)")
    a = ap.parse_args(argv)
    repeats = a.repeats or (3 if a.quick else 9)
    min_batch = 0.01 if a.quick else 0.05
    t_start = time.perf_counter()
    print(f"bench_wire: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}, pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), "
          f"best of {repeats} batches of >= {min_batch * 1000:.0f} ms{' (quick)' if a.quick else ''}")
    head = (f"{'payload':<11} {'tensors':>7} {'MB':>7} {'encode GB/s':>11} {'decode GB/s':>11} {'memcpy GB/s':>11} "
            f"{'(enc+dec)/memcpy':>16} {'zmq wire GB/s':>13} {'zmq raw GB/s':>12} {'wire/raw':>8} {'zmq frames GB/s':>15}")
    print(head)
    print("-" * len(head))
    for name, shapes in PAYLOADS.items():
        state = make_state(shapes())
        size = nbytes(state)
        m = memory(state, repeats, min_batch)
        z = over_zmq(state, repeats, min_batch)
        gbs = lambda s, n=size: n / s / 1e9  # noqa: E731
        ratio = (m["encode"] + m["decode"]) / m["memcpy"]
        wire, raw = gbs(z["zmq_wire"], z["zmq_bytes"]), gbs(z["zmq_raw"], z["zmq_bytes"])
        multi = gbs(z["zmq_frames"], z["zmq_bytes"])
        print(f"{name:<11} {len(state):>7} {size / 1e6:>7.2f} {gbs(m['encode']):>11.1f} {gbs(m['decode']):>11.1f} "
              f"{gbs(m['memcpy']):>11.1f} {ratio:>16.3f} {wire:>13.2f} {raw:>12.2f} {wire / raw:>8.2f} {multi:>15.2f}",
              flush=True)
        print(f"{'':<11} {'':>7} {'':>7} {m['encode'] * 1e6:>9.1f}us {m['decode'] * 1e6:>9.1f}us "
              f"{m['memcpy'] * 1e6:>9.1f}us {'':>16} {z['zmq_wire'] * 1e3:>11.2f}ms {z['zmq_raw'] * 1e3:>10.2f}ms "
              f"{'':>8} {z['zmq_frames'] * 1e3:>13.2f}ms",
              flush=True)
        del state
        gc.collect()
    print(f"(MB = 1e6 bytes of tensor data; GB/s = 1e9 bytes/s; second line per payload: best time per call; "
          f"ran {time.perf_counter() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
