"""The measured cost path (testbed/costmeasure.py) against the peak a real node measures: each
plan runs one round of node.trainer.train in a fresh interpreter (costmodel.measure_round), and
the estimate, with the runtime taken from that child's idle RSS, must lie within 20% of it.
A BERT-family model (the built-in all-MiniLM-L6-v2) and a Llama-family model (random weights,
4 blocks of width 256, made here: nothing is downloaded)."""
from __future__ import annotations

import dataclasses
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("psutil")

from node import trainer  # noqa: E402
from node.plan import HeadSpec, LoraSpec, Plan, TrainSpec  # noqa: E402
from testbed import costmeasure, costmodel  # noqa: E402
from tests.unit.test_local_checkpoints import tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RSS and the glibc heap are Linux-specific")


def train(B: int, T: int) -> TrainSpec:
    return TrainSpec(local_steps=2, batch_size=B, max_len=T, lr=1e-3, seed=0)


NO_POOLER = HeadSpec(pooler=False)
BERT_PLANS = {
    "lora r8 query/value, all blocks, b16 t32": Plan("lora", None, head=NO_POOLER, lora=LoraSpec(r=8, alpha=16),
                                                     train=train(16, 32)),
    "full last 2 blocks, b32 t64": Plan("full", (4, 5), train=train(32, 64)),
}
LLAMA_PLANS = {
    "lora r8 q/v, all blocks, b16 t64": Plan("lora", None, head=NO_POOLER,
                                             lora=LoraSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
                                             train=train(16, 64)),
    "full last 2 blocks, b16 t64": Plan("full", (2, 3), head=NO_POOLER, train=train(16, 64)),
    "full all blocks, b8 t128": Plan("full", None, head=NO_POOLER, train=train(8, 128)),
}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama") / "llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=8000, hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                                      intermediate_size=688, num_hidden_layers=4, max_position_embeddings=256,
                                      pad_token_id=0)
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    tokenizer(decoder=True).save_pretrained(folder)
    return str(folder)


def check(spec: trainer.ModelSpec | None, plans: dict[str, Plan]) -> None:
    base, _ = trainer.load_base(spec or trainer.ModelSpec())
    model = dataclasses.asdict(spec) if spec else None
    with ThreadPoolExecutor(2) as ex:  # one fresh interpreter per plan, 1 torch thread each
        measured = dict(zip(plans, ex.map(lambda n: costmodel.measure_round(plans[n], examples=64, model=model),
                                          plans)))
    rows, failures = [], []
    for name, plan in plans.items():
        r, step = measured[name], costmeasure.measure(base, plan)
        assert r["trained_params"] == step.trained_params, name
        runtime = costmeasure.runtime_mb_from_idle(step, r["idle_rss_mb"])
        predicted = costmeasure.estimate(base, plan, runtime_mb=runtime).peak_memory_mb
        err = predicted / r["peak_mb"] - 1
        above = (predicted - r["idle_rss_mb"]) / (r["peak_mb"] - r["idle_rss_mb"]) - 1
        rows.append(f"{name:40s} idle {r['idle_rss_mb']:5.0f}  measured {r['peak_mb']:5.0f}  predicted "
                    f"{predicted:5.0f} MB  {err:+.1%}  (above idle {above:+.1%})")
        if abs(err) > 0.20:
            failures.append(name)
    print("\n" + "\n".join(rows))
    assert not failures, "\n".join(rows)


def test_a_bert_models_measured_memory_is_within_20_percent_of_the_nodes_peak():
    check(None, BERT_PLANS)


def test_a_llama_models_measured_memory_is_within_20_percent_of_the_nodes_peak(llama_folder):
    check(trainer.ModelSpec("local", num_labels=2, path=llama_folder), LLAMA_PLANS)


def test_on_bert_the_measured_estimate_equals_the_analytic_one_where_both_count_exactly():
    base, _ = trainer.load_base(trainer.ModelSpec())
    arch = costmodel.Arch.from_config(base.config)
    for name, plan in BERT_PLANS.items():
        measured, analytic = costmeasure.estimate(base, plan), costmodel.estimate(arch, plan)
        assert measured.trained_params == analytic.trained_params, name
        assert measured.flops_per_round == analytic.flops_per_round, name
        assert measured.upload_wire_bytes == analytic.upload_wire_bytes, name
        assert measured.breakdown["memory_mb"]["activations"] == analytic.breakdown["memory_mb"]["activations"], name
