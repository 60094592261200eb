"""The cost of a plan on a model of any family, measured on one training step of the real model.

`testbed/costmodel.py` walks a BERT encoder analytically and needs no model. For the other
families the trainer loads (node/arch.py), this module runs the plan's model on batches of the
plan's shape and reads off what the analytic walk computes:

- trained parameters and payload: the tensors `node.trainer.trainable_state` returns (float32
  on the wire, the same set each way);
- FLOPs of the forward and backward pass, with torch's FlopCounterMode, on a copy set to eager
  attention: torch's CPU SDPA kernel is not counted by FlopCounterMode when no dropout is active
  (measured: a tiny Llama's forward lost exactly 4·B·T²·d per block), while eager attention's
  matmuls are the same arithmetic; AdamW adds 12 FLOPs per trained parameter, as in costmodel;
- activations autograd saves for the backward (`saved_tensors_hooks`, one count per storage,
  parameters excluded), with the attention the trainer really runs;
- the frozen weights (every parameter and buffer of the base, in its dtype) and the trained
  state: parameters, gradients and AdamW's two moments, in float32;
- memory over the round, as the node's peak RSS sees it: the training loop of node.trainer
  (build the plan's model, two steps of forward, backward and AdamW, so that the moments
  exist) runs under a dispatch mode that follows every tensor storage an op allocates until it
  is freed; its peak of live bytes, + the received tensors (the node holds the TASK message),
  + the heap glibc keeps (the buffers the forward frees between those autograd keeps, counted
  from the first op that reads a trained tensor; buffers of 32 MiB and more are mmapped and
  returned: costmodel's `glibc` allocator, summed over the model instead of part by part),
  over `runtime_mb` (interpreter, libraries, data, the frozen weights: as costmodel).

`estimate` gives it all as a `costmodel.Cost`, so that planners (LEGEND, CAFF) and the run's
memory check read one shape whatever the family. Each distinct plan is measured once per base
model and remembered. Checked: on BERT, parameters, FLOPs and saved bytes equal the analytic
walk; the memory of a BERT and a Llama model within 20% of the peak a node measures
(tests/integration/test_costmeasure_memory.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from . import costmodel

MB = 2 ** 20
ADAMW_FLOPS = costmodel.ADAMW_FLOPS_PER_PARAM
MEASURED_STEPS = 2  # AdamW allocates its moments at the first step: two show the round's steady state


@dataclass(frozen=True)
class StepCost:
    trained_params: int
    payload_bytes: int      # one direction, float32
    flops_forward: int
    flops_backward: int
    flops_optimizer: int
    saved_bytes: int        # activations kept for the backward
    weights_bytes: int      # the frozen base
    state_bytes: int        # trained parameters + gradients + AdamW moments, float32
    shapes: tuple = ()      # (name, shape) of every trained tensor, as on the wire
    live_peak_bytes: int = 0   # the most bytes the round's own tensors held at once
    retained_bytes: int = 0    # heap glibc keeps after the forward (see the module docstring)

    @property
    def flops_per_step(self) -> int:
        return self.flops_forward + self.flops_backward + self.flops_optimizer

    @property
    def round_bytes(self) -> int:
        """Above the runtime: the received tensors, the live peak and the retained heap."""
        return self.payload_bytes + self.live_peak_bytes + self.retained_bytes

    def memory_mb(self, runtime_mb: float = 0.0) -> float:
        """The round's peak memory over `runtime_mb` (interpreter, libraries, data, tokenizer and
        the frozen weights: measured once per host, as costmodel.runtime_mb_from_idle does)."""
        return runtime_mb + self.round_bytes / MB


def default_runtime_mb(cost: StepCost) -> float:
    """costmodel's default process baseline (measured on this machine) with this model's weights."""
    return costmodel.DEFAULT_FRAMEWORK_MB + costmodel.DEFAULT_CODE_MB + cost.weights_bytes / MB


def runtime_mb_from_idle(cost: StepCost, idle_rss_mb: float, code_mb: float = costmodel.DEFAULT_CODE_MB) -> float:
    """runtime_mb from the RSS of an idle node, as costmodel.runtime_mb_from_idle: the weights
    are paged in by the first round, the training kernels' code by the first backward."""
    return idle_rss_mb + cost.weights_bytes / MB + code_mb


def estimate(base, plan, runtime_mb: float | None = None, *, causal: bool = False,
             meta_bytes: int = 600) -> costmodel.Cost:
    """One round of `plan` on one device, measured on `base` (see the module docstring), in the
    shape costmodel.estimate gives for BERT."""
    c = measure(base, plan, causal=causal)
    if runtime_mb is None:
        runtime_mb = default_runtime_mb(c)
    hdr = costmodel.header_bytes_of(dict(c.shapes), meta_bytes)
    mb = lambda b: b / MB  # noqa: E731
    P = c.trained_params
    breakdown = {
        "flops": {"forward": c.flops_forward, "backward": c.flops_backward, "optimizer": c.flops_optimizer,
                  "tokens_per_step": plan.train.batch_size * plan.train.max_len},
        "memory_mb": {"runtime": runtime_mb, "weights": mb(c.weights_bytes), "received": mb(c.payload_bytes),
                      "activations": mb(c.saved_bytes), "gradients": mb(4 * P), "optimizer": mb(8 * P),
                      "live_peak": mb(c.live_peak_bytes), "retained": mb(c.retained_bytes),
                      "allocator": "glibc", "measured": True},
        "wire": {"header_bytes": hdr, "tensors": len(c.shapes)},
    }
    return costmodel.Cost(trained_params=P, upload_bytes=c.payload_bytes, download_bytes=c.payload_bytes,
                          upload_wire_bytes=c.payload_bytes + hdr, download_wire_bytes=c.payload_bytes + hdr,
                          flops_per_step=c.flops_per_step, flops_per_round=c.flops_per_step * plan.train.local_steps,
                          peak_memory_mb=c.memory_mb(runtime_mb), breakdown=breakdown)


_CACHE: dict[tuple, StepCost] = {}


def measure(base, plan, *, causal: bool = False, vocab_floor: int = 3) -> StepCost:
    """Steps of `plan` on `base` (batches of plan.train.batch_size x plan.train.max_len random
    tokens, the last quarter padding as the trainer pads; labels 0 for classification, the
    tokens themselves for a causal LM)."""
    key = (id(base), json.dumps(plan.to_dict(), sort_keys=True, default=str), causal)
    if key not in _CACHE:
        _CACHE[key] = _measure(base, plan, causal, vocab_floor)
    return _CACHE[key]


def _batch(base, plan, causal: bool, vocab_floor: int):
    import torch
    t = plan.train
    g = torch.Generator().manual_seed(0)
    vocab = int(base.get_input_embeddings().num_embeddings)
    ids = torch.randint(vocab_floor, vocab, (t.batch_size, t.max_len), generator=g)
    mask = torch.ones_like(ids)
    mask[:, t.max_len - t.max_len // 4:] = 0  # an attention mask exists, as with the trainer's padding
    if causal:
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.zeros(t.batch_size, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _live_tracker():
    """A dispatch mode that follows the storage of every tensor an op allocates until it is freed."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.counting = False      # the forward from the first op on a trained tensor
            self.counted_small = 0     # heap-sized bytes allocated while counting
            self.counted: WeakIdKeyDictionary = WeakIdKeyDictionary()
            self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

        def _free(self, n: int) -> None:
            self.live -= n

        def _track(self, t) -> None:
            st = t.untyped_storage()
            if st in self._seen:
                return
            n = st.nbytes()
            self._seen[st] = n
            weakref.finalize(st, self._free, n)
            self.live += n
            self.peak = max(self.peak, self.live)
            if self.counting:
                self.counted[st] = n
                if n < costmodel.MMAP_MAX:
                    self.counted_small += n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.in_forward and not self.counting:
                flat, _ = tree_flatten((args, kwargs))
                self.counting = any(isinstance(a, torch.Tensor) and a.requires_grad for a in flat)
            out = func(*args, **(kwargs or {}))
            flat, _ = tree_flatten(out)
            for t in flat:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self._track(t)
            return out

        in_forward = False

    return Live()


def _steps(model, batch, steps: int, lr: float, live, saved: dict) -> None:
    """node.trainer.train's loop; the first forward records what autograd saves."""
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    model.train()
    for step in range(steps):
        def pack(t):
            s = t.untyped_storage()
            if step == 0 and s.data_ptr() not in weights:
                saved[s.data_ptr()] = (s.nbytes(), s in live.counted)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            live.in_forward = step == 0
            loss = model(**batch).loss
            live.in_forward, live.counting = False, False
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _measure(base, plan, causal: bool, vocab_floor: int) -> StepCost:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from node import trainer
    batch = _batch(base, plan, causal, vocab_floor)
    saved: dict[int, tuple[int, bool]] = {}
    live = _live_tracker()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        with live:  # the node holds the received tensors too: the payload, added in round_bytes
            model = trainer.build_model(base, plan)
            _steps(model, batch, MEASURED_STEPS, plan.train.lr, live, saved)
            del model
        counted = trainer.build_model(base, plan)
        shapes = tuple((n, tuple(v.shape)) for n, v in trainer.trainable_state(counted).items())
        counted.train()
        counted.set_attn_implementation("eager")  # countable attention (see the module docstring)
        with FlopCounterMode(display=False) as fwd:
            out = counted(**batch)
        with FlopCounterMode(display=False) as bwd:
            out.loss.backward()
    trained = sum(int(torch.Size(s).numel()) for _, s in shapes)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    weights += sum(b.numel() * b.element_size() for b in base.buffers())
    saved_small = sum(n for n, in_counted in saved.values() if in_counted and n < costmodel.MMAP_MAX)
    return StepCost(trained, trained * 4, int(fwd.get_total_flops()), int(bwd.get_total_flops()),
                    ADAMW_FLOPS * trained, sum(n for n, _ in saved.values()), int(weights), trained * 4 * 4,
                    shapes=shapes, live_peak_bytes=live.peak, retained_bytes=max(0, live.counted_small - saved_small))


class Measured:
    """plan -> costmodel.Cost for the model `spec` (a node.trainer.ModelSpec), measured on the
    model itself, loaded on first use (strategies.Context.cost_of for a non-BERT family)."""

    def __init__(self, spec):
        self.spec = spec
        self._base = None

    def __call__(self, plan) -> costmodel.Cost:
        if self._base is None:
            from node import trainer
            self._base, _ = trainer.load_base(self.spec)
        return estimate(self._base, plan, causal=self.spec.task == "causal_lm")
