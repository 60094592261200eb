"""The cost of a plan on a model of any family, measured on one training step of the real model.

`testbed/costmodel.py` walks a BERT encoder analytically and needs no model. For the other
families the trainer loads (node/arch.py), this module runs the plan's model once on one batch
of the plan's shape and reads off what the analytic walk computes:

- trained parameters and payload: the tensors `node.trainer.trainable_state` returns (float32
  on the wire, the same set each way);
- FLOPs of the forward and backward pass, with torch's FlopCounterMode, on a copy set to eager
  attention: torch's CPU SDPA kernel is not counted by FlopCounterMode when no dropout is active
  (measured: a tiny Llama's forward lost exactly 4·B·T²·d per block), while eager attention's
  matmuls are the same arithmetic; AdamW adds 12 FLOPs per trained parameter, as in costmodel;
- activations autograd saves for the backward (`saved_tensors_hooks`, one count per storage,
  parameters excluded), with the attention the trainer really runs;
- the frozen weights (every parameter and buffer of the base, in its dtype) and the trained
  state: parameters, gradients and AdamW's two moments, in float32.

Each distinct plan is measured once per base model and remembered.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

MB = 2 ** 20
ADAMW_FLOPS = 12  # per trained parameter and step (testbed/costmodel.py)


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

    @property
    def flops_per_step(self) -> int:
        return self.flops_forward + self.flops_backward + self.flops_optimizer

    def memory_mb(self, runtime_mb: float = 0.0) -> float:
        """Weights, trained state and saved activations, over `runtime_mb` (interpreter, libraries,
        data, tokenizer: measured once per host, as costmodel.runtime_mb_from_idle does)."""
        return runtime_mb + (self.weights_bytes + self.state_bytes + self.saved_bytes) / MB


_CACHE: dict[tuple, StepCost] = {}


def measure(base, plan, *, causal: bool = False, vocab_floor: int = 3) -> StepCost:
    """One step of `plan` on `base` (a batch of plan.train.batch_size x plan.train.max_len random
    tokens; labels 0 for classification, the tokens themselves for a causal LM)."""
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
    labels = ids.clone() if causal else torch.zeros(t.batch_size, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _measure(base, plan, causal: bool, vocab_floor: int) -> StepCost:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from node import trainer
    batch = _batch(base, plan, causal, vocab_floor)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = trainer.build_model(base, plan)
        trained = sum(int(v.size) for v in trainer.trainable_state(model).values())  # before the step writes grads
        model.train()
        frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        frozen |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        saved: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in frozen:
                saved[s.data_ptr()] = s.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**batch).loss.backward()
        del model
        counted = trainer.build_model(base, plan)
        counted.train()
        counted.set_attn_implementation("eager")  # countable attention (see the module docstring)
        with FlopCounterMode(display=False) as fwd:
            out = counted(**batch)
        with FlopCounterMode(display=False) as bwd:
            out.loss.backward()
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    weights += sum(b.numel() * b.element_size() for b in base.buffers())
    return StepCost(trained, trained * 4, int(fwd.get_total_flops()), int(bwd.get_total_flops()),
                    ADAMW_FLOPS * trained, sum(saved.values()), int(weights), trained * 4 * 4)
