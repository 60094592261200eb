"""Cost of one training plan on one device: parameters trained, bytes moved, FLOPs, peak memory.

For a BERT-style encoder (`Arch`, read from the HF config) and a plan dict exactly as
`node.trainer` executes it (method "full" | "lora", blocks, train_embeddings, head,
lora {r, alpha, dropout, target_modules, rank_pattern}, local_steps, batch_size, max_len),
`estimate(arch, plan)` gives a `Cost`. No torch, no model: strategies call it to plan rounds.

What comes from the papers (STRATEGIES.md, "known" there) and what is decided here:

- CAFF's reconstructed cost model for the last n of L blocks: memory = weights + grads and
  optimizer state of the trained parameters + activations of the blocks that back-propagate;
  FLOPs per sample = forward of all L blocks + about 2x forward of the back-propagated part;
  upload = bytes of the trained parameters (the last n blocks + head).
- LEGEND's reconstructed round model: compute = steps x (forward of all L blocks + backward
  and LoRA of the top d blocks); traffic = download + upload of the LoRA tensors of the top d
  blocks (+ head here); memory = weights + activations of the top d blocks + LoRA params,
  grads and optimizer state.

Decided here (and checked against the real trainer; see tests/unit/test_costmodel.py and
bench/bench_costmodel.py):

- Parameters: exactly the tensors `node.trainer.trainable_state(build_model(base, plan))`
  returns (`trainable_tensors` gives their names and shapes). LoRA follows peft's matching:
  a target name matches a block's linear module whose path equals it or ends with "." + it
  ("dense" matches attention.output.dense, intermediate.dense and output.dense); the trainer
  turns rank_pattern {block: r} into keys "layer.{b}.attention.self.{target}", so per-block
  ranks apply to query/key/value only and other targets keep the default r.
- Bytes: float32 tensors, payload = params x 4 per direction. The node receives the tensors
  of the plan and sends the same set back, so download == upload for every plan here. The
  wire adds one msgpack header (the tensor specs: name, dtype, shape; computed exactly with
  msgpack) plus the message metadata (estimated, `meta_bytes`); that is what
  `node.protocol.frames_nbytes` counts. ZeroMQ adds 9 bytes per frame on TCP (not included).
- FLOPs: 2 x params x tokens for every linear layer (LoRA A and B included) and 2 x 2 x T^2 x d
  per block for the attention scores and their weighted sum; embeddings, softmax, GELU,
  LayerNorm and dropout count 0. Backward, op by op: an input gradient (1x the forward) only
  where the input depends on a trained parameter, a weight gradient (1x) only where the weight
  trains. So blocks below the lowest trained parameter cost forward only, and in the lowest
  trained block the projections that read the frozen block input compute no input gradient.
  The trainer runs frozen blocks without torch.no_grad, but autograd records nothing for an
  op none of whose inputs requires grad, so this is the same as running them under no_grad
  (as CAFF assumes): no backward and no saved activations there. AdamW adds ~12 FLOPs per
  trained parameter per step (in `breakdown`, included in flops_per_step).
  Tokens per step = batch_size x max_len: the trainer pads every sequence to max_len.
- Memory, in MB = 2^20 bytes (the unit of the node's peak_mem_mb, which is peak RSS):
  runtime_mb (interpreter + torch/transformers/peft + dataset + tokenizer + the frozen base
  model, all loaded once; `runtime_mb_from_idle` and `calibrate_runtime_mb` measure it)
  + the round's deep copy of the model (the trainer copies the base every round, so the
  weights are counted twice; for LoRA also the adapters and peft's copy of pooler/classifier)
  + the received tensors (the node holds the TASK message while it trains)
  + the largest of four phases: load (two transient copies of the trained tensors in
  `load_trainable`), backward (saved activations + gradients + AdamW's two moments + the
  backward's transient buffers, simulated block by block from the top down), optimizer step
  (gradients + moments + two temporaries the size of the largest tensor: torch's
  single-tensor AdamW, which is what runs on CPU) and the end (the result copied out)
  + allocator retention (`alloc_overhead`): glibc keeps freed activation buffers resident in
  its heap during a round; measured here as a fraction of the round's activation memory.
  Saved activations are counted tensor by tensor from what autograd saves in BERT's layers
  in training mode (transformers' sdpa attention runs torch's math kernel on CPU when
  attention dropout > 0; dropout on CPU saves a float32 mask): per block in the backward
  path up to 10 d + 2 d_ff floats per token + 3 floats per attention score (softmax output,
  dropout mask, dropped probabilities), fewer where weights are frozen (a frozen linear saves
  no input). `activation_detail` lists them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MB = 2 ** 20
FLOAT = 4  # bytes of a float32

# Linear modules of one BERT block: path inside the block -> (in, out) as a function of (d, d_ff).
BLOCK_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense")

# Decided here from measurements on this machine (bench/bench_costmodel.py prints them):
DEFAULT_FRAMEWORK_MB = 400.0   # RSS of a node process with torch+transformers+peft, the tokenizer
                               # and the dataset loaded, without the model weights (1 torch thread)
DEFAULT_ALLOC_OVERHEAD = 1.0   # glibc heap retention, as a fraction of the round's activation memory
DEFAULT_CODE_MB = 16.0         # code pages of the training kernels, paged in at the first backward
ADAMW_FLOPS_PER_PARAM = 12


@dataclass(frozen=True)
class Arch:
    """The sizes of a BERT-style encoder with a sequence-classification head."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    max_positions: int
    type_vocab: int
    num_labels: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: float | None = None

    @classmethod
    def from_config(cls, config: Any) -> "Arch":
        """From a transformers config object (`model.config`) or a dict with the same keys."""
        get = (lambda k, default=None: config.get(k, default)) if isinstance(config, dict) else \
              (lambda k, default=None: getattr(config, k, default))
        num_labels = get("num_labels")
        if num_labels is None:
            num_labels = len(get("id2label") or {}) or 2
        return cls(hidden=int(get("hidden_size")), intermediate=int(get("intermediate_size")),
                   layers=int(get("num_hidden_layers")), heads=int(get("num_attention_heads")),
                   vocab=int(get("vocab_size")), max_positions=int(get("max_position_embeddings")),
                   type_vocab=int(get("type_vocab_size", 2)), num_labels=int(num_labels),
                   hidden_dropout=float(get("hidden_dropout_prob", 0.1)),
                   attention_dropout=float(get("attention_probs_dropout_prob", 0.1)),
                   classifier_dropout=get("classifier_dropout"))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shape(self, path: str) -> tuple[int, int]:
        """(in_features, out_features) of a block's linear module."""
        d, f = self.hidden, self.intermediate
        return {"attention.self.query": (d, d), "attention.self.key": (d, d), "attention.self.value": (d, d),
                "attention.output.dense": (d, d), "intermediate.dense": (d, f), "output.dense": (f, d)}[path]

    def embedding_shapes(self) -> dict[str, tuple[int, ...]]:
        d = self.hidden
        return {"bert.embeddings.word_embeddings.weight": (self.vocab, d),
                "bert.embeddings.position_embeddings.weight": (self.max_positions, d),
                "bert.embeddings.token_type_embeddings.weight": (self.type_vocab, d),
                "bert.embeddings.LayerNorm.weight": (d,), "bert.embeddings.LayerNorm.bias": (d,)}

    def block_shapes(self, b: int) -> dict[str, tuple[int, ...]]:
        d, p = self.hidden, f"bert.encoder.layer.{b}."
        out: dict[str, tuple[int, ...]] = {}
        for path in BLOCK_LINEARS[:4]:
            i, o = self.linear_shape(path)
            out[f"{p}{path}.weight"], out[f"{p}{path}.bias"] = (o, i), (o,)
            if path == "attention.output.dense":
                out[f"{p}attention.output.LayerNorm.weight"] = out[f"{p}attention.output.LayerNorm.bias"] = (d,)
        for path in BLOCK_LINEARS[4:]:
            i, o = self.linear_shape(path)
            out[f"{p}{path}.weight"], out[f"{p}{path}.bias"] = (o, i), (o,)
        out[f"{p}output.LayerNorm.weight"] = out[f"{p}output.LayerNorm.bias"] = (d,)
        return out

    def head_shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        d, c = self.hidden, self.num_labels
        return {f"{prefix}bert.pooler.dense.weight": (d, d), f"{prefix}bert.pooler.dense.bias": (d,),
                f"{prefix}classifier.weight": (c, d), f"{prefix}classifier.bias": (c,)}

    @property
    def embedding_params(self) -> int:
        return _numel(self.embedding_shapes())

    @property
    def block_params(self) -> int:
        return _numel(self.block_shapes(0))

    @property
    def head_params(self) -> int:
        return _numel(self.head_shapes())

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.layers * self.block_params + self.head_params

    @property
    def weights_mb(self) -> float:
        return self.total_params * FLOAT / MB


# all-MiniLM-L6-v2 (the model this testbed ships), so callers can estimate without loading it.
MINILM_L6 = Arch(hidden=384, intermediate=1536, layers=6, heads=12, vocab=30522, max_positions=512, type_vocab=2)


def _numel(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


# ----------------------------------------------------------------------------------------------
# The plan, read the way node.trainer.build_model reads it
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    method: str
    blocks: tuple[int, ...]
    head: bool
    train_embeddings: bool
    lora: dict[int, dict[str, int]]   # block -> {module path: rank}
    lora_dropout: float
    batch_size: int
    max_len: int
    local_steps: int


def _lora_ranks(arch: Arch, blocks: list[int], lo: dict) -> dict[int, dict[str, int]]:
    targets = list(lo.get("target_modules") or ["query", "value"])
    r = int(lo["r"])
    pattern = {int(b): int(v) for b, v in (lo.get("rank_pattern") or {}).items()}
    out: dict[int, dict[str, int]] = {}
    matched = set()
    for b in blocks:
        ranks = {}
        for path in BLOCK_LINEARS:
            hits = [t for t in targets if path == t or path.endswith("." + t)]
            if not hits:
                continue
            matched.update(hits)
            # trainer: rank_pattern key f"layer.{b}.attention.self.{t}" -> only attention.self.* modules
            special = any(path == f"attention.self.{t}" for t in hits) and b in pattern
            ranks[path] = pattern[b] if special else r
        out[b] = ranks
    missing = [t for t in targets if t not in matched]
    if missing:
        raise ValueError(f"lora target_modules {missing} match no linear module of a block "
                         f"({', '.join(BLOCK_LINEARS)})")
    return out


def _read_plan(arch: Arch, plan: dict) -> _Plan:
    n = arch.layers
    blocks = plan.get("blocks")
    blocks = list(range(n)) if blocks is None else sorted({int(b) for b in blocks})
    if any(b < 0 or b >= n for b in blocks):
        raise ValueError(f"plan names blocks {blocks} but the model has blocks 0..{n - 1}")
    method = plan["method"]
    head = bool(plan.get("head", True))
    common = dict(batch_size=int(plan.get("batch_size", 32)), max_len=int(plan.get("max_len", 64)),
                  local_steps=int(plan.get("local_steps", 1)), head=head, blocks=tuple(blocks))
    if method == "full":
        return _Plan(method=method, train_embeddings=bool(plan.get("train_embeddings", False)), lora={},
                     lora_dropout=0.0, **common)
    if method == "lora":
        if not blocks:
            raise ValueError("a lora plan needs at least one block (the trainer refuses an empty one)")
        lo = plan["lora"]
        return _Plan(method=method, train_embeddings=False, lora=_lora_ranks(arch, blocks, lo),
                     lora_dropout=float(lo.get("dropout", 0.0) or 0.0), **common)
    raise ValueError(f"plan method {method!r} is not one of: full, lora")


# ----------------------------------------------------------------------------------------------
# Parameters and bytes
# ----------------------------------------------------------------------------------------------
LORA_PREFIX = "base_model.model."


def trainable_tensors(arch: Arch, plan: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors `node.trainer.trainable_state` returns for this plan."""
    p = _read_plan(arch, plan)
    out: dict[str, tuple[int, ...]] = {}
    if p.method == "full":
        if p.train_embeddings:
            out.update(arch.embedding_shapes())
        for b in p.blocks:
            out.update(arch.block_shapes(b))
        if p.head:
            out.update(arch.head_shapes())
        return out
    for b in p.blocks:
        for path, r in p.lora[b].items():
            i, o = arch.linear_shape(path)
            name = f"{LORA_PREFIX}bert.encoder.layer.{b}.{path}"
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = (r, i), (o, r)
    if p.head:
        out.update(arch.head_shapes(LORA_PREFIX))
    return out


def trained_params(arch: Arch, plan: dict) -> int:
    return _numel(trainable_tensors(arch, plan))


def header_bytes(arch: Arch, plan: dict, meta_bytes: int = 600) -> int:
    """Size of the msgpack header of a TASK/RESULT message carrying the plan's tensors.

    The tensor specs are packed exactly as node.protocol.encode packs them; `meta_bytes`
    stands for the message metadata (the plan on the way down, metrics on the way up, a
    few hundred bytes)."""
    import msgpack
    specs = [[name, "float32", list(shape)] for name, shape in trainable_tensors(arch, plan).items()]
    header = {"type": "RESULT", "version": 1, "run": "r" * 12, "round": 0, "meta": {}, "tensors": specs}
    return len(msgpack.packb(header, use_bin_type=True)) + int(meta_bytes)


# ----------------------------------------------------------------------------------------------
# FLOPs and saved activations: one walk over the ops, tracking which tensors require grad
# ----------------------------------------------------------------------------------------------
@dataclass
class _Walk:
    """Accumulates FLOPs and bytes autograd saves for backward, in forward order."""
    B: int
    T: int
    fwd: float = 0.0
    bwd: float = 0.0
    saved: float = 0.0                                        # bytes
    items: list = field(default_factory=list)                 # (where, what, bytes)
    _seen: set = field(default_factory=set)
    where: Any = ""
    _n: int = 0

    def fresh(self, what: str) -> str:
        """A key for a tensor that is a storage of its own."""
        self._n += 1
        return f"{what}#{self._n}"

    @property
    def N(self) -> int:
        return self.B * self.T

    def save(self, key: str, nbytes: float) -> None:
        """Count a saved tensor once per storage (`key` names the storage in this block)."""
        k = (self.where, key)
        if k not in self._seen:
            self._seen.add(k)
            self.saved += nbytes
            self.items.append((self.where, key, nbytes))

    def linear(self, x: str, x_rg: bool, fin: int, fout: int, w_trains: bool, rank: int = 0,
               lora_dropout: float = 0.0, tokens: int | None = None, pinned: float | None = None) -> bool:
        """y = x W^T (+ LoRA B A x): FLOPs, saves; returns whether y requires grad."""
        n = self.N if tokens is None else tokens
        self.fwd += 2 * n * fin * fout
        if x_rg:
            self.bwd += 2 * n * fin * fout          # grad of the input
        if w_trains:
            self.bwd += 2 * n * fin * fout          # grad of the weight
            self.save(x, pinned if pinned is not None else n * fin * FLOAT)
        if rank:
            self.fwd += 2 * n * rank * (fin + fout)
            self.bwd += 2 * n * rank * fout * 2     # B: weight grad and input grad (A trains)
            self.bwd += 2 * n * fin * rank          # A: weight grad
            if x_rg:
                self.bwd += 2 * n * fin * rank      # A: input grad
            if lora_dropout > 0:
                self.save(self.fresh(f"lora-dropout({x})"), n * fin * FLOAT)   # dropped copy, saved by A
                if x_rg:
                    self.save(self.fresh(f"lora-dropout-mask({x})"), n * fin * FLOAT)
            else:
                self.save(x, n * fin * FLOAT)
            self.save(self.fresh("lora-h"), n * rank * FLOAT)                  # A's output, saved by B
        return x_rg or w_trains or bool(rank)


def _block(w: _Walk, arch: Arch, x_rg: bool, trains: bool, ranks: dict[str, int], lora_dropout: float) -> bool:
    """One BERT layer in training mode; returns whether its output requires grad."""
    d, f, H, N = arch.hidden, arch.intermediate, arch.heads, w.N
    B, T = w.B, w.T
    r = ranks.get
    q = w.linear("x", x_rg, d, d, trains, r("attention.self.query", 0), lora_dropout)
    k = w.linear("x", x_rg, d, d, trains, r("attention.self.key", 0), lora_dropout)
    v = w.linear("x", x_rg, d, d, trains, r("attention.self.value", 0), lora_dropout)
    # torch's math sdpa: (q*s) @ (k^T*s) -> +mask -> softmax -> dropout -> @ v
    scores = B * H * T * T
    w.fwd += 2 * 2 * B * T * T * d
    if q:
        w.bwd += 2 * B * T * T * d
        w.save("k-copy", N * d * FLOAT)
    if k:
        w.bwd += 2 * B * T * T * d
        w.save("q-copy", N * d * FLOAT)
    s_rg = q or k
    if s_rg:
        w.save("softmax", scores * FLOAT)
        if arch.attention_dropout > 0:
            w.save("attn-dropout-mask", scores * FLOAT)
    if v:
        w.bwd += 2 * B * T * T * d                  # grad of the probabilities
        w.save("attn-probs-dropped" if arch.attention_dropout > 0 else "softmax", scores * FLOAT)
    if s_rg:
        w.bwd += 2 * B * T * T * d                  # grad of v
        w.save("v-copy", N * d * FLOAT)
    ctx = s_rg or v
    o = w.linear("ctx", ctx, d, d, trains, r("attention.output.dense", 0), lora_dropout)
    if o and arch.hidden_dropout > 0:
        w.save("dropout1-mask", N * d * FLOAT)
    ln1 = o or x_rg or trains
    if ln1:
        w.save("ln1-input", N * d * FLOAT)
        w.save("ln1-stats", 2 * N * FLOAT)
    i = w.linear("ln1-out", ln1, d, f, trains, r("intermediate.dense", 0), lora_dropout)
    if i:
        w.save("gelu-input", N * f * FLOAT)
    o2 = w.linear("gelu-out", i, f, d, trains, r("output.dense", 0), lora_dropout)
    if o2 and arch.hidden_dropout > 0:
        w.save("dropout2-mask", N * d * FLOAT)
    ln2 = o2 or ln1 or trains
    if ln2:
        w.save("ln2-input", N * d * FLOAT)
        w.save("ln2-stats", 2 * N * FLOAT)
    return ln2


@dataclass
class _Pass:
    fwd: float
    bwd: float
    saved_by_part: dict           # "embeddings" | block index | "head" -> bytes
    items: list
    lowest: int | None            # lowest block that back-propagates (None: none)


def _walk(arch: Arch, p: _Plan) -> _Pass:
    w = _Walk(p.batch_size, p.max_len)
    by_part: dict = {}
    w.where = "embeddings"
    rg = p.method == "full" and p.train_embeddings
    if rg:  # embedding backward keeps the token ids; LayerNorm and dropout keep theirs
        w.save("input-ids", w.N * 8)
        w.save("position-ids", w.T * 8)
        w.save("token-type-ids", arch.max_positions * 8)   # the model's buffer, expanded
        w.save("ln-input", w.N * arch.hidden * FLOAT)
        w.save("ln-stats", 2 * w.N * FLOAT)
        if arch.hidden_dropout > 0:
            w.save("dropout-mask", w.N * arch.hidden * FLOAT)
    by_part["embeddings"] = w.saved
    lowest = 0 if rg else None
    for b in range(arch.layers):
        w.where = b
        before = w.saved
        trains = p.method == "full" and b in p.blocks
        ranks = p.lora.get(b, {}) if p.method == "lora" else {}
        if lowest is None and (trains or ranks):
            lowest = b
        rg = _block(w, arch, rg, trains, ranks, p.lora_dropout)
        by_part[b] = w.saved - before
    w.where = "head"
    before = w.saved
    d, B = arch.hidden, w.B
    head = p.head
    # pooler: dense(hidden[:, 0]) -> tanh; the saved first-token view pins the whole last hidden state
    x = w.linear("last-hidden", rg, d, d, head, tokens=B, pinned=w.N * d * FLOAT)
    if x:
        w.save("tanh-out", B * d * FLOAT)
        if (arch.classifier_dropout if arch.classifier_dropout is not None else arch.hidden_dropout) > 0:
            w.save("dropout-mask", B * d * FLOAT)
    y = w.linear("pooled", x, d, arch.num_labels, head, tokens=B)
    if y:
        w.save("log-softmax", B * arch.num_labels * FLOAT)
        w.save("labels", B * 8)
        w.save("loss-weight", FLOAT)
    by_part["head"] = w.saved - before
    if lowest is None and head:
        lowest = arch.layers
    return _Pass(w.fwd, w.bwd, by_part, w.items, lowest)


def activation_detail(arch: Arch, plan: dict) -> list[tuple[Any, str, int]]:
    """What autograd keeps for backward: (embeddings | block index | head, tensor, bytes)."""
    return [(a, b, int(c)) for a, b, c in _walk(arch, _read_plan(arch, plan)).items]


# ----------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------
@dataclass
class Cost:
    trained_params: int
    upload_bytes: int           # tensor payload node -> aggregator (float32)
    download_bytes: int         # tensor payload aggregator -> node
    upload_wire_bytes: int      # + the msgpack header (what node.protocol.frames_nbytes counts)
    download_wire_bytes: int
    flops_per_step: float
    flops_per_round: float
    peak_memory_mb: float
    breakdown: dict = field(default_factory=dict)


def runtime_mb_from_idle(arch: Arch, idle_rss_mb: float, weights_resident: bool = False,
                         code_mb: float = DEFAULT_CODE_MB) -> float:
    """runtime_mb from the RSS of an idle node (model loaded, data tokenized, nothing trained).

    transformers maps the safetensors file and pages the frozen weights in lazily, so right
    after loading they are mostly not resident (False); the round's deep copy reads them all,
    after which they stay resident (as clean file pages). The first backward also pages in
    the code of the training kernels (`code_mb`)."""
    return idle_rss_mb + (0.0 if weights_resident else arch.weights_mb) + code_mb


def estimate(arch: Arch, plan: dict, runtime_mb: float | None = None, *,
             alloc_overhead: float = DEFAULT_ALLOC_OVERHEAD, meta_bytes: int = 600) -> Cost:
    """Cost of one round of `plan` on one device.

    runtime_mb: the process baseline (see the module docstring); None = DEFAULT_FRAMEWORK_MB +
    DEFAULT_CODE_MB + the base model's weights. alloc_overhead: heap retention as a fraction of
    the activation memory (0 = a perfect allocator; see DEFAULT_ALLOC_OVERHEAD)."""
    p = _read_plan(arch, plan)
    shapes = trainable_tensors(arch, plan)
    P = _numel(shapes)
    payload = P * FLOAT
    hdr = header_bytes(arch, plan, meta_bytes)
    ps = _walk(arch, p)
    opt_flops = ADAMW_FLOPS_PER_PARAM * P
    flops_step = ps.fwd + ps.bwd + opt_flops

    # -- memory (bytes) ---------------------------------------------------------------------
    if runtime_mb is None:
        runtime_mb = DEFAULT_FRAMEWORK_MB + DEFAULT_CODE_MB + arch.weights_mb
    copy = arch.total_params * FLOAT
    if p.method == "lora":  # the adapters, and peft's trainable copies of pooler and classifier
        copy += payload
    received = payload
    grads = payload
    moments = 2 * payload
    largest = max((math.prod(s) for s in shapes.values()), default=0) * FLOAT
    N, d, f = p.batch_size * p.max_len, arch.hidden, arch.intermediate
    scores = p.batch_size * arch.heads * p.max_len ** 2
    transient = max(2 * N * f + 2 * N * d, 3 * scores + 2 * N * d) * FLOAT if ps.lowest is not None else 0
    # gradient bytes of each part, to walk the backward from the top down
    grad_by_part: dict = {}
    for name, s in shapes.items():
        part = "embeddings" if ".embeddings." in name else ("head" if ("pooler" in name or "classifier" in name)
                                                             else int(name.split(".layer.")[1].split(".")[0]))
        grad_by_part[part] = grad_by_part.get(part, 0) + math.prod(s) * FLOAT
    order = ["head"] + list(range(arch.layers - 1, -1, -1)) + ["embeddings"]
    act_total = sum(ps.saved_by_part.values())
    moments_live = moments if p.local_steps >= 2 else 0   # AdamW allocates its moments at the first step
    live_act, live_grad, backward_peak = act_total, 0, act_total + transient
    for part in order:  # backward frees a part's activations after computing its gradients
        live_grad += grad_by_part.get(part, 0)
        backward_peak = max(backward_peak, live_act + live_grad + transient)
        live_act -= ps.saved_by_part.get(part, 0)
    phases = {
        "load": 2 * payload,
        "backward": backward_peak + moments_live,
        "step": grads + moments + 2 * largest,
        "end": moments + payload,
    }
    if ps.lowest is None:
        phases["backward"] = phases["step"] = 0
    phase = max(phases, key=phases.get)
    alloc = alloc_overhead * act_total
    peak_bytes = copy + received + phases[phase] + alloc
    peak_mb = runtime_mb + peak_bytes / MB
    breakdown = {
        "flops": {"forward": ps.fwd, "backward": ps.bwd, "optimizer": opt_flops,
                  "tokens_per_step": N, "lowest_backprop_block": ps.lowest},
        "memory_mb": {"runtime": runtime_mb, "model_copy": copy / MB, "received": received / MB,
                      "activations": act_total / MB, "gradients": grads / MB, "optimizer": moments / MB,
                      "transient": transient / MB, "alloc_overhead": alloc / MB,
                      "phases": {k: v / MB for k, v in phases.items()}, "peak_phase": phase,
                      "activations_by_part": {k: v / MB for k, v in ps.saved_by_part.items()}},
        "wire": {"header_bytes": hdr, "tensors": len(shapes)},
    }
    return Cost(trained_params=P, upload_bytes=payload, download_bytes=payload,
                upload_wire_bytes=payload + hdr, download_wire_bytes=payload + hdr,
                flops_per_step=flops_step, flops_per_round=flops_step * p.local_steps,
                peak_memory_mb=peak_mb, breakdown=breakdown)


def calibrate_runtime_mb(arch: Arch, plan: dict, measured_peak_mb: float, **kw) -> float:
    """The runtime_mb that makes estimate(arch, plan).peak_memory_mb equal a measured peak."""
    return measured_peak_mb - (estimate(arch, plan, runtime_mb=0.0, **kw).peak_memory_mb)


# ----------------------------------------------------------------------------------------------
# Measuring a round in a fresh process (for calibration, tests and bench/bench_costmodel.py)
# ----------------------------------------------------------------------------------------------
_CHILD = r'''
import ctypes, gc, json, sys
import numpy as np
import psutil
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(int(args["threads"]))
from node import trainer
from node.data import load_dataset
from testbed import costmodel as cm
proc = psutil.Process()
def rss():
    return proc.memory_info().rss / 2 ** 20
def trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
base, tok = trainer.load_base(trainer.ModelSpec(num_layers=args["num_layers"]))
ds = load_dataset(args["dataset"])
n = int(args["examples"])
plan = args["plan"]
data = trainer.Tokenized(tok, ds.texts[:n], ds.labels[:n], int(plan["max_len"]))
trim()
out = {"idle_rss_mb": rss()}
# what the aggregator would send: the plan's tensors (names and shapes from the cost model;
# load_trainable refuses unknown names and wrong shapes), values from the base model, LoRA A
# small random and B zero as peft initialises them
arch = cm.Arch.from_config(base.config)
state = {k: v for k, v in base.state_dict().items()}
rng = np.random.default_rng(0)
tensors = {}
for name, shape in cm.trainable_tensors(arch, plan).items():
    key = name[len(cm.LORA_PREFIX):] if name.startswith(cm.LORA_PREFIX) else name
    if "lora_A" in name:
        tensors[name] = (rng.standard_normal(shape) * 0.01).astype(np.float32)
    elif "lora_B" in name:
        tensors[name] = np.zeros(shape, np.float32)
    else:
        tensors[name] = state[key].detach().numpy().copy()
del state
trim()
out["received_rss_mb"] = rss()
_, metrics = trainer.train(base, plan, tensors, data)
out.update(peak_mb=metrics["peak_mem_mb"], compute_s=metrics["compute_s"],
           trained_params=metrics["trained_params"], loss=metrics["loss"])
print("RESULT " + json.dumps(out))
'''


def measure_round(plan: dict, *, num_layers: int | None = None, threads: int = 1, examples: int = 256,
                  dataset: str = "rotten_tomatoes", env: dict | None = None, timeout: float = 300) -> dict:
    """Run one round of `plan` with node.trainer.train in a fresh interpreter and return
    {idle_rss_mb (model loaded, data tokenized, nothing else), received_rss_mb (+ the plan's
    tensors), peak_mb (the node's peak_mem_mb), compute_s, trained_params, loss}.

    A fresh process, so that nothing this process allocated before pollutes the peak. Needs
    torch and the model package (it runs the node's own code)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    args = {"plan": plan, "num_layers": num_layers, "threads": threads, "examples": examples, "dataset": dataset}
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
                 **(env or {})}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], cwd=root, env=child_env,
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"measuring child failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
