#!/usr/bin/env python
"""Step time and peak memory of one round, measured and predicted, for each model family.

For BERT, RoBERTa, DistilBERT, Llama, Qwen2 and GPT-2, a small random checkpoint is made here
(4 blocks of width 256, a word-level tokenizer; nothing is downloaded) and saved to a temporary
folder. Two plans run on each, one round each in a fresh interpreter with one torch thread
(testbed.costmodel.measure_round: the node's own trainer, Rotten Tomatoes texts):

- LoRA r8 on peft's default targets of the architecture, every block, with the head;
- full fine-tuning of the last 2 blocks with the head.

Printed per row: the trained parameters; the measured round time (fastest of 2) and the
predicted one, FLOPs (testbed/costmeasure.py) / the host's FLOP rate; the node's peak RSS
and the predicted peak (costmeasure, runtime from the child's idle RSS). The FLOP rate is
calibrated once, on the built-in all-MiniLM-L6-v2's LoRA plan in the same run, so every other
row is a prediction. Nothing asserts; this prints figures only (about 2 minutes here).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from node.plan import HeadSpec, LoraSpec, Plan, TrainSpec  # noqa: E402

WIDTH, BLOCKS, FFN, HEADS, VOCAB = 256, 4, 1024, 4, 8000
TRAIN = TrainSpec(local_steps=3, batch_size=16, max_len=64, lr=1e-3, seed=0)


def configs():
    import transformers as t
    common = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=FFN,
                  num_hidden_layers=BLOCKS, max_position_embeddings=128)
    return {
        "bert": t.BertConfig(**common),
        "roberta": t.RobertaConfig(pad_token_id=1, **common),
        "distilbert": t.DistilBertConfig(vocab_size=VOCAB, dim=WIDTH, n_heads=HEADS, hidden_dim=FFN, n_layers=BLOCKS,
                                         max_position_embeddings=128),
        "llama": t.LlamaConfig(num_key_value_heads=HEADS, pad_token_id=0, **common),
        "qwen2": t.Qwen2Config(num_key_value_heads=HEADS, pad_token_id=0, **common),
        "gpt2": t.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_head=HEADS, n_inner=FFN, n_layer=BLOCKS,
                             n_positions=128, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    }


def save(folder: Path, family: str, config) -> str:
    import torch
    import transformers
    from tests.unit.test_local_checkpoints import DECODERS, tokenizer
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(folder / family)
    tokenizer(family in DECODERS).save_pretrained(folder / family)
    return str(folder / family)


def plans(family: str) -> dict[str, Plan]:
    from node.arch import default_lora_targets
    targets = ("q_lin", "v_lin") if family == "distilbert" else default_lora_targets(family)
    head = HeadSpec(pooler=family == "bert")
    return {"lora r8, all blocks": Plan("lora", None, head=head, lora=LoraSpec(r=8, alpha=16, target_modules=targets),
                                        train=TRAIN),
            "full, last 2 blocks": Plan("full", (BLOCKS - 2, BLOCKS - 1), head=head, train=TRAIN)}


def row(spec, plan: Plan, flops_per_s: float | None):
    from node import trainer
    from testbed import costmeasure, costmodel
    r = costmodel.measure_round(plan, examples=64, repeats=2, model=dataclasses.asdict(spec) if spec.path else None,
                                num_layers=spec.num_layers)
    base, _ = trainer.load_base(spec)
    step = costmeasure.measure(base, plan)
    cost = costmeasure.estimate(base, plan, runtime_mb=costmeasure.runtime_mb_from_idle(step, r["idle_rss_mb"]))
    return r, cost, (cost.flops_per_round / flops_per_s if flops_per_s else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(configs()), help="comma-separated (default: all six)")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from node import trainer
    minilm = trainer.ModelSpec()
    calib = Plan("lora", None, lora=LoraSpec(r=8, alpha=16), train=TRAIN)
    r, cost, _ = row(minilm, calib, None)
    rate = cost.flops_per_round / r["compute_s"]
    print(f"host FLOP rate, calibrated on all-MiniLM-L6-v2 LoRA r8 (batch 16, length 64, 3 steps): "
          f"{rate / 1e9:.2f} GFLOP/s ({cost.flops_per_round / 1e9:.1f} GFLOP in {r['compute_s']:.2f} s)\n")
    print(f"{'family':10s} {'plan':20s} {'params':>9s} {'GFLOP':>6s} {'time s':>7s} {'pred s':>7s} {'err':>6s}"
          f" {'idle MB':>7s} {'peak MB':>7s} {'pred MB':>7s} {'err':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for family in a.families.split(","):
            spec = trainer.ModelSpec("local", num_labels=2, path=save(Path(tmp), family, configs()[family]))
            for name, plan in plans(family).items():
                r, cost, pred_s = row(spec, plan, rate)
                print(f"{family:10s} {name:20s} {cost.trained_params:9d} {cost.flops_per_round / 1e9:6.2f} "
                      f"{r['compute_s']:7.3f} {pred_s:7.3f} {pred_s / r['compute_s'] - 1:+6.0%} "
                      f"{r['idle_rss_mb']:7.0f} {r['peak_mb']:7.0f} {cost.peak_memory_mb:7.0f} "
                      f"{cost.peak_memory_mb / r['peak_mb'] - 1:+6.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
