"""Cost of one training plan on one device: parameters trained, bytes moved, FLOPs, peak memory.

For a BERT-style encoder (`Arch`, read from the HF config) and a `node.plan.Plan` exactly as
`node.trainer` executes it, `estimate(arch, plan)` gives a `Cost`. No torch, no model:
strategies call it to plan rounds.

What comes from the papers (docs/strategies.md) and what is decided here:

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
  ("dense" matches attention.output.dense, intermediate.dense and output.dense); per-block
  ranks reach query/key/value only and other targets keep the default r (`node.plan.pattern_key`,
  `LoraSpec.rank_at`).
- Bottleneck adapters (plan method `adapter`, node/adapters.py): per adapted sublayer a down
  (d -> m) and an up (m -> d) linear with biases on the output of its projection, + the
  sublayer's LayerNorm when it trains; in the walk an adapter is two trained linears and a
  nonlinearity (ReLU keeps its output, GELU and SiLU their input). Its output requires grad,
  so every op above it back-propagates; its own input gradient is computed only where the
  projection's output requires grad (i.e. above the lowest trained part).
- (IA)^3 (plan method `ia3`, peft): one vector per targeted projection, of its output size
  (or input size for a feed-forward one); the product x * l keeps x, and the vector only where
  x needs a gradient; its FLOPs count 0 (elementwise), but everything above the lowest vector
  back-propagates through the frozen projections (input gradients only).
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
  Tokens per step = batch_size x max_len: the trainer pads every sequence to max_len (and
  takes min(batch_size, shard size) examples: pass a plan with the smaller batch_size for a
  node whose shard is smaller than a batch). Other plan fields (lr, alpha, alpha_pattern,
  seed) do not change the cost.
- Memory, in MB = 2^20 bytes (the unit of the node's peak_mem_mb, which is the peak RSS of
  the node process), the sum of:
  * runtime_mb: interpreter + torch/transformers/peft + dataset + tokenizer + the frozen base
    model, all loaded once, + the code pages of the training kernels (DEFAULT_CODE_MB, paged
    in by the first backward). `runtime_mb_from_idle` derives it from the RSS of an idle node
    (transformers memory-maps the safetensors file, so the frozen weights become resident
    only when the first round reads them); `calibrate_runtime_mb` fits it to one
    measured peak instead. Default: DEFAULT_FRAMEWORK_MB + DEFAULT_CODE_MB + the weights.
  * the round's model: the trainer shares every frozen weight with the base and copies only
    what trains (full), or the trained head modules, the adapters and peft's trainable copies
    of those head modules (LoRA); and the received tensors (the node holds the TASK message).
  * the largest of four phases, simulated in order: load (load_trainable's two transient
    copies of the trained tensors), backward (saved activations + gradients + AdamW's two
    moments from the second step on + the backward's transient buffers; walked part by part
    from the head down, a part's gradients appearing before its activations are freed),
    optimizer step (gradients + moments + two temporaries the size of the largest tensor:
    torch's single-tensor AdamW, what runs on CPU) and end (moments + the result copy).
  * heap retention (allocator="glibc", the default, which is how the node runs): glibc
    serves buffers under its mmap threshold (raised dynamically up to 32 MiB) from the heap,
    and the buffers the forward pass frees between the ones autograd keeps stay resident for
    the rest of the round. Counted as the bytes the forward of each back-propagating part
    allocates minus what it keeps (buffers of 32 MiB and more are mmapped and returned;
    heap memory never shrinks within the round). allocator="returning" drops this term: a
    node started with MALLOC_MMAP_THRESHOLD_=131072 returns every large buffer at free.
  Saved activations are counted tensor by tensor from what autograd saves in transformers'
  BertLayer in training mode (sdpa attention runs torch's math kernel on CPU when attention
  dropout > 0; dropout on CPU saves a float32 mask): per block in the backward path up to
  10 d + 2 d_ff floats per token (c1 = 10, c2 = 2) + 3 floats per attention score (softmax
  output, dropout mask, dropped probabilities: B x heads x T^2 each), fewer where weights
  are frozen (a frozen linear keeps no input: a LoRA q/v block keeps 8 d + d_ff + 2 r). A
  pooler that trains keeps a view of the first token, which pins the whole last hidden state
  (B T d); a frozen one keeps nothing.
  The classifier's logits are B x num_labels (negligible). Without attention dropout torch
  picks its CPU flash kernel instead (no T^2 tensors kept; modelled too). Assumed: the batch
  has padding, so an attention mask exists (B T^2 floats per block; the trainer pads to
  max_len, so only a batch of texts all at least max_len tokens long has none).
  `activation_detail` lists it all.
  Checked: saved activations equal autograd's byte for byte and FLOPs equal torch's
  FlopCounterMode exactly (tests); peak RSS within 10% of the node's over 12 plans
  (bench/bench_costmodel.py; within 3.3% with allocator="returning" and the malloc setting).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from node.plan import BLOCK_LINEARS, LoraSpec, Plan, block_of, renumber

MB = 2 ** 20
FLOAT = 4  # bytes of a float32


# Measured on this machine (Debian bookworm, torch 2.13 CPU, 1 torch thread; bench_costmodel.py):
DEFAULT_FRAMEWORK_MB = 400.0   # RSS of an idle node: torch+transformers+peft imported, model loaded
                               # (weights not yet paged in), Rotten Tomatoes loaded and tokenized
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

    def head_shapes(self, prefix: str = "", pooler: bool = True) -> dict[str, tuple[int, ...]]:
        """The classifier's tensors, and the pooler's unless `pooler` is false."""
        d, c = self.hidden, self.num_labels
        out = {f"{prefix}bert.pooler.dense.weight": (d, d), f"{prefix}bert.pooler.dense.bias": (d,)} if pooler else {}
        return {**out, f"{prefix}classifier.weight": (c, d), f"{prefix}classifier.bias": (c,)}

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
    """A Plan resolved against the model: its blocks, and the rank of every LoRA module."""
    method: str
    blocks: tuple[int, ...]
    head: bool                        # the classifier trains
    pooler: bool                      # the pooler trains too
    train_embeddings: bool
    lora: dict[int, dict[str, int]]   # block -> {module path: rank}
    lora_dropout: float
    adapters: tuple[str, ...]         # sublayer output modules with an adapter, in every planned block
    adapter_size: int
    adapter_activation: str
    adapter_norms: bool               # the adapted sublayers' LayerNorms train
    ia3: dict[str, str]               # (IA)^3: linear path -> "out" (scales its output) | "in" (its input)
    batch_size: int
    max_len: int
    local_steps: int


def _lora_ranks(blocks: list[int], lo: LoraSpec) -> dict[int, dict[str, int]]:
    """peft's matching: a target matches a block's linear module whose path equals it or ends with "." + it."""
    out: dict[int, dict[str, int]] = {}
    matched = set()
    for b in blocks:
        ranks = {}
        for path in BLOCK_LINEARS:
            hits = [t for t in lo.target_modules if path == t or path.endswith("." + t)]
            if hits:
                matched.update(hits)
                ranks[path] = lo.rank_at(b, path)
        out[b] = ranks
    missing = [t for t in lo.target_modules if t not in matched]
    if missing:
        raise ValueError(f"lora target_modules {missing} match no linear module of a block "
                         f"({', '.join(BLOCK_LINEARS)})")
    return out


def _read_plan(arch: Arch, plan: Plan) -> _Plan:
    blocks = plan.block_list(arch.layers)
    t = plan.train
    lora = _lora_ranks(blocks, plan.lora) if plan.method == "lora" else {}
    ad = plan.adapter
    return _Plan(method=plan.method, blocks=tuple(blocks), head=plan.head.train, pooler=plan.head.trains_pooler,
                 train_embeddings=plan.train_embeddings,
                 lora=lora, lora_dropout=plan.lora.dropout if plan.lora else 0.0,
                 adapters=ad.places if ad else (), adapter_size=ad.size if ad else 0,
                 adapter_activation=ad.activation if ad else "", adapter_norms=bool(ad and ad.train_layer_norm),
                 ia3={t: "in" if t in plan.ia3.feedforward else "out" for t in plan.ia3.targets} if plan.ia3 else {},
                 batch_size=t.batch_size,
                 max_len=t.max_len, local_steps=t.local_steps)


# ----------------------------------------------------------------------------------------------
# Parameters and bytes
# ----------------------------------------------------------------------------------------------
LORA_PREFIX = "base_model.model."


def as_run(arch: Arch, plan: Plan) -> tuple[Arch, Plan, dict[int, int]]:
    """The model the node runs for `plan`, the plan on that model, and the map from its blocks to
    the whole model's: a submodel plan runs a model of its blocks alone, renumbered 0..k-1."""
    if not plan.submodel:
        return arch, plan, {}
    local = {b: i for i, b in enumerate(plan.block_list(arch.layers))}
    lo = replace(plan.lora, rank_pattern={local[b]: r for b, r in plan.lora.rank_pattern},
                 alpha_pattern={local[b]: a for b, a in plan.lora.alpha_pattern})
    run = replace(plan, blocks=tuple(range(len(local))), lora=lo, submodel=False)
    return replace(arch, layers=len(local)), run, {i: b for b, i in local.items()}


def trainable_tensors(arch: Arch, plan: Plan) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors `node.trainer.trainable_state` returns for this plan (a
    submodel's named by the whole model's blocks, as the node sends them)."""
    arch, plan, back = as_run(arch, plan)
    if back:
        return {renumber(name, back): shape for name, shape in trainable_tensors(arch, plan).items()}
    p = _read_plan(arch, plan)
    out: dict[str, tuple[int, ...]] = {}
    if p.method == "full":
        if p.train_embeddings:
            out.update(arch.embedding_shapes())
        for b in p.blocks:
            out.update(arch.block_shapes(b))
        if p.head:
            out.update(arch.head_shapes(pooler=p.pooler))
        return out
    if p.method == "ia3":
        for b in p.blocks:
            for path, mode in p.ia3.items():
                i, o = arch.linear_shape(path)
                out[f"{LORA_PREFIX}bert.encoder.layer.{b}.{path}.ia3_l"] = (1, i) if mode == "in" else (o, 1)
        if p.head:
            out.update(arch.head_shapes(LORA_PREFIX, p.pooler))
        return out
    if p.method == "adapter":
        d, m = arch.hidden, p.adapter_size
        for b in p.blocks:
            for place in p.adapters:
                name = f"bert.encoder.layer.{b}.{place}.adapter"
                out.update({f"{name}.down.weight": (m, d), f"{name}.down.bias": (m,),
                            f"{name}.up.weight": (d, m), f"{name}.up.bias": (d,)})
                if p.adapter_norms:
                    norm = f"bert.encoder.layer.{b}.{place}.LayerNorm"
                    out[f"{norm}.weight"] = out[f"{norm}.bias"] = (d,)
        if p.head:
            out.update(arch.head_shapes(pooler=p.pooler))
        return out
    for b in p.blocks:
        for path, r in p.lora[b].items():
            i, o = arch.linear_shape(path)
            name = f"{LORA_PREFIX}bert.encoder.layer.{b}.{path}"
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = (r, i), (o, r)
    if p.head:
        out.update(arch.head_shapes(LORA_PREFIX, p.pooler))
    return out


def trained_params(arch: Arch, plan: Plan) -> int:
    return _numel(trainable_tensors(arch, plan))


def header_bytes(arch: Arch, plan: Plan, meta_bytes: int = 600) -> int:
    """Size of the msgpack header of a TASK/RESULT message carrying the plan's tensors.

    The tensor specs are packed exactly as node.protocol.encode packs them; `meta_bytes`
    stands for the message metadata (the plan on the way down, metrics on the way up, a
    few hundred bytes)."""
    return header_bytes_of(trainable_tensors(arch, plan), meta_bytes)


def header_bytes_of(shapes: dict[str, tuple[int, ...]], meta_bytes: int = 600) -> int:
    """header_bytes for the float32 tensors `shapes` (name -> shape), of any model."""
    import msgpack

    from node.protocol import PROTOCOL_VERSION
    specs = [[name, "float32", list(shape)] for name, shape in shapes.items()]
    header = {"type": "RESULT", "version": PROTOCOL_VERSION, "run": "r" * 12, "round": 0, "meta": {}, "tensors": specs}
    return len(msgpack.packb(header, use_bin_type=True)) + int(meta_bytes)


# ----------------------------------------------------------------------------------------------
# FLOPs, saved activations, forward allocations: one walk over the ops of a training forward,
# tracking which tensors require grad
# ----------------------------------------------------------------------------------------------
PEFT_METHODS = ("lora", "ia3")  # peft keeps a copy of the head modules it trains
MMAP_MAX = 32 * MB   # glibc's DEFAULT_MMAP_THRESHOLD_MAX (64-bit): buffers this big are always mmapped


@dataclass
class _Walk:
    """Accumulates FLOPs, the bytes autograd saves for backward and the bytes the forward
    allocates, in forward order, per part ("embeddings", block index, "head")."""
    B: int
    T: int
    fwd: float = 0.0
    bwd: float = 0.0
    items: list = field(default_factory=list)                 # (part, tensor, bytes) saved for backward
    allocated: dict = field(default_factory=dict)             # part -> bytes of forward outputs < MMAP_MAX
    where: Any = ""
    _seen: set = field(default_factory=set)
    _n: int = 0

    @property
    def N(self) -> int:
        return self.B * self.T

    def fresh(self, what: str) -> str:
        """A key for a tensor that is a storage of its own."""
        self._n += 1
        return f"{what}#{self._n}"

    def save(self, key: str, nbytes: float) -> None:
        """Count a saved tensor once per storage (`key` names the storage within the part)."""
        k = (self.where, key)
        if k not in self._seen:
            self._seen.add(k)
            self.items.append((self.where, key, nbytes))

    def alloc(self, nbytes: float, times: int = 1) -> None:
        """An op output of `nbytes` (a new buffer) in the forward."""
        if nbytes < MMAP_MAX:
            self.allocated[self.where] = self.allocated.get(self.where, 0) + times * nbytes

    def linear(self, x: str, x_rg: bool, fin: int, fout: int, w_trains: bool, rank: int = 0,
               lora_dropout: float = 0.0, tokens: int | None = None, pinned: float | None = None) -> bool:
        """y = x W^T + b (+ scale * B A dropout(x)); returns whether y requires grad."""
        n = self.N if tokens is None else tokens
        self.fwd += 2 * n * fin * fout
        self.alloc(n * fout * FLOAT)
        if x_rg:
            self.bwd += 2 * n * fin * fout          # grad of the input
        if w_trains:
            self.bwd += 2 * n * fin * fout          # grad of the weight (autograd saves the input for it)
            self.save(x, pinned if pinned is not None else n * fin * FLOAT)
        if rank:
            self.fwd += 2 * n * rank * (fin + fout)
            self.bwd += 2 * n * rank * fout * 2     # B: weight grad and input grad (A trains)
            self.bwd += 2 * n * fin * rank          # A: weight grad
            if x_rg:
                self.bwd += 2 * n * fin * rank      # A: input grad
            if lora_dropout > 0:                    # CPU dropout: a float mask, then x * mask
                self.alloc(n * fin * FLOAT, 2)
                self.save(self.fresh(f"lora-dropout({x})"), n * fin * FLOAT)   # saved by A
                if x_rg:
                    self.save(self.fresh(f"lora-dropout-mask({x})"), n * fin * FLOAT)
            else:
                self.save(x, n * fin * FLOAT)
            self.alloc(n * rank * FLOAT)                                        # A x
            self.alloc(n * fout * FLOAT, 3)                                     # B(A x), * scale, + y
            self.save(self.fresh("lora-h"), n * rank * FLOAT)                  # A's output, saved by B
        return x_rg or w_trains or bool(rank)


@dataclass(frozen=True)
class _BlockPlan:
    """What trains in one block."""
    trains: bool = False                                  # every weight (method full)
    ranks: dict = field(default_factory=dict)             # LoRA: linear path -> rank
    lora_dropout: float = 0.0
    adapters: dict = field(default_factory=dict)          # sublayer output -> (size, activation)
    ia3: dict = field(default_factory=dict)               # linear path -> "out" | "in"


def _block_plan(p: _Plan, b: int) -> _BlockPlan:
    if b not in p.blocks:
        return _BlockPlan()
    return _BlockPlan(trains=p.method == "full", ranks=p.lora.get(b, {}), lora_dropout=p.lora_dropout,
                      adapters={place: (p.adapter_size, p.adapter_activation) for place in p.adapters},
                      ia3=p.ia3 if p.method == "ia3" else {})


def _linear(w: _Walk, bp: _BlockPlan, path: str, x: str, x_rg: bool, fin: int, fout: int) -> bool:
    """A block's linear module `path` under the block's plan (whole weight, LoRA, (IA)^3)."""
    mode = bp.ia3.get(path)
    if mode == "in":
        x, x_rg = _ia3_scale(w, x, x_rg, fin), True
    y = w.linear(x, x_rg, fin, fout, bp.trains, bp.ranks.get(path, 0), bp.lora_dropout)
    if mode == "out":
        _ia3_scale(w, w.fresh(f"{path}-out"), y, fout)
        return True
    return y


def _ia3_scale(w: _Walk, x: str, x_rg: bool, dim: int) -> str:
    """peft's (IA)^3: x * (1 * l.flatten()). The product keeps x for the vector's gradient, and
    the scaling (a new tensor of `dim` floats) only where x needs a gradient too. Returns the
    product's key."""
    w.alloc(dim * FLOAT)
    if x_rg:
        w.save(w.fresh("ia3-scaling"), dim * FLOAT)
    w.save(x, w.N * dim * FLOAT)
    w.alloc(w.N * dim * FLOAT)
    return w.fresh("ia3-product")


def _adapter(w: _Walk, y_rg: bool, d: int, size: int, activation: str) -> bool:
    """A bottleneck adapter on a projection's output y (node/adapters.py): y + up(act(down(y))).
    down keeps y for its weight gradient; ReLU keeps its output, which is also the input that
    up keeps (one storage); GELU and SiLU keep their input, up keeps their output."""
    n = w.N
    w.linear(w.fresh("adapter-in"), y_rg, d, size, True)
    w.alloc(n * size * FLOAT)                          # the activation
    if activation == "relu":
        h = w.fresh("adapter-relu-out")
    else:
        w.save(w.fresh("adapter-act-in"), n * size * FLOAT)
        h = w.fresh("adapter-act-out")
    w.linear(h, True, size, d, True)
    w.alloc(n * d * FLOAT)                             # y + up(...)
    return True


def _block(w: _Walk, arch: Arch, x_rg: bool, bp: _BlockPlan) -> bool:
    """One BERT layer (transformers' BertLayer, sdpa attention) in training mode under `bp`.
    Returns whether its output requires grad."""
    d, f, H, N, B, T = arch.hidden, arch.intermediate, arch.heads, w.N, w.B, w.T
    u = N * d * FLOAT                                 # one (B, T, d) float32 tensor
    trains = bp.trains
    q = _linear(w, bp, "attention.self.query", "x", x_rg, d, d)
    k = _linear(w, bp, "attention.self.key", "x", x_rg, d, d)
    v = _linear(w, bp, "attention.self.value", "x", x_rg, d, d)
    scores = B * H * T * T * FLOAT
    w.fwd += 2 * 2 * B * T * T * d
    w.alloc(B * T * T * FLOAT)                        # the additive mask
    if arch.attention_dropout > 0:
        # torch's math sdpa (CPU, dropout > 0): (q*s) @ (k^T*s) -> + mask -> softmax -> dropout -> @ v
        w.alloc(u, 4)                                 # q*s, k*s and their contiguous copies
        w.alloc(scores, 5)                            # q k^T, + mask, softmax, dropout mask, dropped
        w.alloc(u, 3)                                 # v copy, probs @ v, context made contiguous
        ctx_key = "ctx"
        if q:                                         # grad of q needs k
            w.bwd += 2 * B * T * T * d
            w.save("k-copy", u)
        if k:                                         # grad of k needs q
            w.bwd += 2 * B * T * T * d
            w.save("q-copy", u)
        s_rg = q or k
        if s_rg:
            w.save("softmax", scores)
            w.save("attn-dropout-mask", scores)
        if v:                                         # grad of v needs the probabilities
            w.bwd += 2 * B * T * T * d
            w.save("attn-probs-dropped", scores)
        if s_rg:                                      # grad of the probabilities needs v
            w.bwd += 2 * B * T * T * d
            w.save("v-copy", u)
        ctx = s_rg or v
    else:
        # no attention dropout: torch's CPU flash kernel; it keeps q, k, v, its output (already
        # laid out as the context), the log-sum-exp and the mask, and its backward recomputes
        # the scores (5 matmuls; torch's FlopCounterMode does not count this CPU kernel)
        w.alloc(u)
        w.alloc(B * H * T * FLOAT)
        ctx_key = "attn-out"
        ctx = q or k or v
        if ctx:
            w.bwd += 5 * 2 * B * T * T * d
            for name in ("q", "k", "v", "attn-out"):
                w.save(name, u)
            w.save("logsumexp", B * H * T * FLOAT)
            w.save("mask", B * T * T * FLOAT)
    o = _linear(w, bp, "attention.output.dense", ctx_key, ctx, d, d)
    if "attention.output" in bp.adapters:
        o = _adapter(w, o, d, *bp.adapters["attention.output"])
    drop = arch.hidden_dropout > 0
    w.alloc(u, 4 if drop else 2)                      # (dropout mask, dropped,) + residual, LayerNorm
    w.alloc(2 * N * FLOAT)
    if o and drop:
        w.save("dropout1-mask", u)
    ln1 = o or x_rg or trains
    if ln1:
        w.save("ln1-input", u)
        w.save("ln1-stats", 2 * N * FLOAT)
    i = _linear(w, bp, "intermediate.dense", "ln1-out", ln1, d, f)
    w.alloc(N * f * FLOAT)                            # gelu
    if i:
        w.save("gelu-input", N * f * FLOAT)
    o2 = _linear(w, bp, "output.dense", "gelu-out", i, f, d)
    if "output" in bp.adapters:
        o2 = _adapter(w, o2, d, *bp.adapters["output"])
    w.alloc(u, 4 if drop else 2)
    w.alloc(2 * N * FLOAT)
    if o2 and drop:
        w.save("dropout2-mask", u)
    ln2 = o2 or ln1 or trains
    if ln2:
        w.save("ln2-input", u)
        w.save("ln2-stats", 2 * N * FLOAT)
    return ln2


@dataclass
class _Pass:
    fwd: float
    bwd: float
    items: list                   # (part, tensor, bytes) saved for backward
    allocated: dict               # part -> bytes the forward allocates (buffers < MMAP_MAX)
    lowest: Any                   # lowest part that back-propagates: "embeddings", a block, "head", None

    def saved(self, part=None, small: bool | None = None) -> float:
        return sum(b for p, _, b in self.items if (part is None or p == part)
                   and (small is None or (b < MMAP_MAX) == small))


def _walk(arch: Arch, p: _Plan) -> _Pass:
    w = _Walk(p.batch_size, p.max_len)
    d, u = arch.hidden, w.N * arch.hidden * FLOAT
    w.where = "embeddings"
    rg = p.method == "full" and p.train_embeddings
    w.alloc(u, 4)                                     # word, token type, sum, + position
    w.alloc(w.T * d * FLOAT)                          # position embeddings
    w.alloc(u, 3 if arch.hidden_dropout > 0 else 1)   # LayerNorm (, dropout mask, dropped)
    if rg:  # embedding backward keeps the token ids; LayerNorm and dropout keep theirs
        w.save("input-ids", w.N * 8)
        w.save("position-ids", w.T * 8)
        w.save("token-type-ids", arch.max_positions * 8)   # the model's buffer, expanded
        w.save("ln-input", u)
        w.save("ln-stats", 2 * w.N * FLOAT)
        if arch.hidden_dropout > 0:
            w.save("dropout-mask", u)
    lowest: Any = "embeddings" if rg else None
    for b in range(arch.layers):
        w.where = b
        bp = _block_plan(p, b)
        if lowest is None and (bp.trains or bp.ranks or bp.adapters or bp.ia3):
            lowest = b
        rg = _block(w, arch, rg, bp)
    w.where = "head"
    B, head = w.B, p.head
    # pooler: dense(hidden[:, 0]) -> tanh; the saved first-token view pins the whole last hidden state
    x = w.linear("last-hidden", rg, d, d, p.pooler, tokens=B, pinned=u)
    drop = (arch.classifier_dropout if arch.classifier_dropout is not None else arch.hidden_dropout) > 0
    w.alloc(B * d * FLOAT, 3 if drop else 1)          # tanh (, dropout mask, dropped)
    if x:
        w.save("tanh-out", B * d * FLOAT)
        if drop:
            w.save("dropout-mask", B * d * FLOAT)
    y = w.linear("pooled" if drop else "tanh-out", x, d, arch.num_labels, head, tokens=B)
    if y:
        w.save("log-softmax", B * arch.num_labels * FLOAT)
        w.save("labels", B * 8)
        w.save("loss-weight", FLOAT)
    if lowest is None and head:
        lowest = "head"
    return _Pass(w.fwd, w.bwd, w.items, w.allocated, lowest)


def activation_detail(arch: Arch, plan: Plan) -> list[tuple[Any, str, int]]:
    """What autograd keeps for backward: (part: "embeddings" | block index | "head", tensor, bytes)."""
    arch, plan, back = as_run(arch, plan)
    return [(back.get(a, a) if isinstance(a, int) else a, b, int(c)) for a, b, c in _walk(arch, _read_plan(arch, plan)).items]


# ----------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------
@dataclass
class Cost:
    """One round of one plan on one device. `breakdown` has the parts: flops (forward,
    backward, optimizer), memory_mb (runtime, model_copy, received, activations, gradients,
    optimizer, transient, retained, the RSS of each phase and which one is the peak), wire."""
    trained_params: int
    upload_bytes: int           # tensor payload node -> aggregator (float32)
    download_bytes: int         # tensor payload aggregator -> node
    upload_wire_bytes: int      # + the msgpack header (what node.protocol.frames_nbytes counts)
    download_wire_bytes: int
    flops_per_step: float
    flops_per_round: float
    peak_memory_mb: float
    breakdown: dict = field(default_factory=dict)


ALLOCATORS = ("glibc", "returning")


def runtime_mb_from_idle(arch: Arch, idle_rss_mb: float, weights_resident: bool = False,
                         code_mb: float = DEFAULT_CODE_MB) -> float:
    """runtime_mb from the RSS of an idle node (model loaded, data tokenized, nothing trained).

    transformers maps the safetensors file and pages the frozen weights in lazily, so right
    after loading they are mostly not resident (False); the first round reads them all,
    after which they stay resident (as clean file pages, which the kernel may drop under
    memory pressure). The first backward also pages in the code of the training kernels
    (`code_mb`)."""
    return idle_rss_mb + (0.0 if weights_resident else arch.weights_mb) + code_mb


def _part_of(name: str) -> Any:
    if ".embeddings." in name:
        return "embeddings"
    b = block_of(name)
    return "head" if b is None else b


def _memory(arch: Arch, p: _Plan, ps: _Pass, shapes: dict, allocator: str) -> dict:
    """Peak bytes of the round above runtime_mb, phase by phase (see the module docstring)."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator {allocator!r} is not one of {ALLOCATORS}")
    glibc = allocator == "glibc"
    sizes = {n: math.prod(s) * FLOAT for n, s in shapes.items()}
    payload = sum(sizes.values())
    small = lambda b: b < MMAP_MAX if glibc else True          # noqa: E731  (heap vs mmap)
    P_small = sum(b for b in sizes.values() if small(b))
    P_big = payload - P_small
    # the round's model: node.trainer shares every frozen weight with the base and copies only
    # what trains (full), or the head + adapters + peft's own head copy (lora)
    copy = payload + (_numel(arch.head_shapes(pooler=p.pooler)) * FLOAT if p.method in PEFT_METHODS and p.head else 0)
    received = payload
    largest = max(sizes.values(), default=0)
    temps_small, temps_big = (2 * largest, 0) if small(largest) else (0, 2 * largest)
    N, d, f = p.batch_size * p.max_len, arch.hidden, arch.intermediate
    scores = p.batch_size * arch.heads * p.max_len ** 2
    transient = max(2 * N * f + 2 * N * d, 3 * scores + 2 * N * d) * FLOAT
    # heap retention: buffers the forward of a back-propagating part frees between the ones
    # autograd keeps stay resident (glibc reuses them poorly and trims only the heap's top)
    parts = ["embeddings"] + list(range(arch.layers)) + ["head"]
    retained = 0.0
    if glibc:
        for part in parts:
            kept = ps.saved(part, small=True)
            if kept > 0:
                retained += max(0.0, ps.allocated.get(part, 0) - kept)
    steps2 = p.local_steps >= 2            # AdamW allocates its moments at the first step
    m_small, m_big = (2 * P_small, 2 * P_big) if steps2 else (0, 0)
    points: list[tuple[str, float, float]] = []          # (phase, heap live, mmapped live)
    points.append(("load", 2 * P_small, 2 * P_big))       # load_trainable's two copies
    S_small, S_big = ps.saved(small=True), ps.saved(small=False)
    if glibc is False:
        S_small, S_big = S_small + S_big, 0
    g_small = g_big = 0.0
    points.append(("backward", S_small + m_small + transient, S_big + m_big))
    for part in ["head"] + list(range(arch.layers - 1, -1, -1)) + ["embeddings"]:
        for n, b in sizes.items():  # this part's gradients appear while its activations still live
            if _part_of(n) == part:
                if small(b):
                    g_small += b
                else:
                    g_big += b
        points.append(("backward", S_small + g_small + m_small + transient, S_big + g_big + m_big))
        s_part_small = ps.saved(part, small=True) if glibc else ps.saved(part)
        S_small -= s_part_small
        S_big -= ps.saved(part) - s_part_small
    points.append(("step", P_small * 3 + temps_small, P_big * 3 + temps_big))   # grads + 2 moments + temps
    points.append(("end", P_small * 3, P_big * 3))                              # moments + the result
    resident = 0.0
    phases: dict[str, float] = {}
    live: dict[str, float] = {}
    for phase, heap, mm in points:
        after_forward = phase != "load"
        if glibc:
            resident = max(resident, heap + (retained if after_forward else 0.0))
            rss = resident + mm
        else:
            rss = heap + mm
        phases[phase] = max(phases.get(phase, 0.0), rss)
        live[phase] = max(live.get(phase, 0.0), heap + mm)
    phase = max(phases, key=phases.get)
    base = copy + received
    return {"peak": base + phases[phase], "peak_phase": phase, "model_copy": copy, "received": received,
            "activations": ps.saved(), "gradients": payload, "optimizer": 2 * payload, "transient": transient,
            "retained": retained, "phases": {k: base + v for k, v in phases.items()},
            "live_phases": {k: base + v for k, v in live.items()}}


def estimate(arch: Arch, plan: Plan, runtime_mb: float | None = None, *, allocator: str = "glibc",
             meta_bytes: int = 600) -> Cost:
    """Cost of one round of `plan` on one device.

    runtime_mb: the process baseline (see the module docstring); None = DEFAULT_FRAMEWORK_MB +
    DEFAULT_CODE_MB + the base model's weights (measured here: one torch thread).
    allocator: "glibc" (default malloc settings, what the node runs with: freed activation
    buffers stay resident during the round) or "returning" (every large buffer goes back to
    the OS when freed, e.g. MALLOC_MMAP_THRESHOLD_=131072: the peak is the live memory).
    A submodel plan is priced on the model the node runs (its blocks alone); the process still
    holds the whole frozen model (runtime_mb), while `weights` counts the submodel's."""
    whole, hdr = arch, header_bytes(arch, plan, meta_bytes)  # the wire names the whole model's blocks
    arch, plan, _ = as_run(arch, plan)
    p = _read_plan(arch, plan)
    shapes = trainable_tensors(arch, plan)
    P = _numel(shapes)
    ps = _walk(arch, p)
    if ps.lowest is None:
        raise ValueError("the plan trains no parameter (the trainer's backward would fail)")
    payload = P * FLOAT
    opt_flops = ADAMW_FLOPS_PER_PARAM * P
    flops_step = ps.fwd + ps.bwd + opt_flops
    if runtime_mb is None:
        runtime_mb = DEFAULT_FRAMEWORK_MB + DEFAULT_CODE_MB + whole.weights_mb
    mem = _memory(arch, p, ps, shapes, allocator)
    mb = lambda b: b / MB  # noqa: E731
    by_part: dict = {}
    for part, _, b in ps.items:
        by_part[part] = by_part.get(part, 0) + b / MB
    breakdown = {
        "flops": {"forward": ps.fwd, "backward": ps.bwd, "optimizer": opt_flops,
                  "tokens_per_step": p.batch_size * p.max_len, "lowest_backprop_part": ps.lowest},
        "memory_mb": {"runtime": runtime_mb, "weights": arch.weights_mb,  # every weight of the model run, float32
                      "model_copy": mb(mem["model_copy"]), "received": mb(mem["received"]),
                      "activations": mb(mem["activations"]), "gradients": mb(mem["gradients"]),
                      "optimizer": mb(mem["optimizer"]), "transient": mb(mem["transient"]),
                      "retained": mb(mem["retained"]), "peak_phase": mem["peak_phase"],
                      "phases": {k: runtime_mb + mb(v) for k, v in mem["phases"].items()},
                      "live_phases": {k: runtime_mb + mb(v) for k, v in mem["live_phases"].items()},
                      "activations_by_part": by_part, "allocator": allocator},
        "wire": {"header_bytes": hdr, "tensors": len(shapes)},
    }
    return Cost(trained_params=P, upload_bytes=payload, download_bytes=payload,
                upload_wire_bytes=payload + hdr, download_wire_bytes=payload + hdr,
                flops_per_step=flops_step, flops_per_round=flops_step * p.local_steps,
                peak_memory_mb=runtime_mb + mb(mem["peak"]), breakdown=breakdown)


def calibrate_runtime_mb(arch: Arch, plan: Plan, measured_peak_mb: float, **kw) -> float:
    """The runtime_mb that makes estimate(arch, plan, runtime_mb).peak_memory_mb equal a
    measured peak (the node's peak_mem_mb for one round of `plan`)."""
    return measured_peak_mb - estimate(arch, plan, runtime_mb=0.0, **kw).peak_memory_mb


# ----------------------------------------------------------------------------------------------
# Measuring a round in a fresh process (for calibration, tests and bench/bench_costmodel.py)
# ----------------------------------------------------------------------------------------------
_CHILD = r'''
import ctypes, gc, json, sys
import psutil
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(int(args["threads"]))
from node import trainer
from node.data import load_dataset
proc = psutil.Process()
def rss():
    return proc.memory_info().rss / 2 ** 20
def trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
spec = trainer.ModelSpec.from_dict(args["model"]) if args["model"] else trainer.ModelSpec(num_layers=args["num_layers"])
base, tok = trainer.load_base(spec)
ds = load_dataset(args["dataset"])
n = int(args["examples"])
from node.plan import Plan
plan = Plan.from_dict(args["plan"])
data = trainer.Tokenized(tok, ds.texts[:n], ds.labels[:n], plan.train.max_len)
trim()
out = {"idle_rss_mb": rss()}
# what the aggregator sends: the tensors of a fresh build of the plan's model
tensors = trainer.trainable_state(trainer.build_model(base, plan))
trim()
out["received_rss_mb"] = rss()
_, metrics = trainer.train(base, plan, tensors, data)
out.update(peak_mb=metrics["peak_mem_mb"], compute_s=metrics["compute_s"],
           trained_params=metrics["trained_params"], loss=metrics["loss"])
for _ in range(int(args["repeats"]) - 1):  # warm runs: the first pays one-time costs (allocator, kernels)
    out["compute_s"] = min(out["compute_s"], trainer.train(base, plan, tensors, data)[1]["compute_s"])
print("RESULT " + json.dumps(out))
'''


def measure_round(plan: Plan, *, num_layers: int | None = None, threads: int = 1, examples: int = 256,
                  dataset: str = "rotten_tomatoes", env: dict | None = None, timeout: float = 300,
                  repeats: int = 1, model: dict | None = None) -> dict:
    """Run one round of `plan` with node.trainer.train in a fresh interpreter and return
    {idle_rss_mb (model loaded, data tokenized, nothing else), received_rss_mb (+ the plan's
    tensors), peak_mb (the node's peak_mem_mb, first round), compute_s (fastest of `repeats`
    rounds), trained_params, loss (first round)}.

    `model`: a node.trainer.ModelSpec as a dict (a local checkpoint of any family; default the
    built-in model cut to `num_layers`). The plan's tensors are those a fresh build of the
    plan's model holds (peft's initial LoRA, the base's values elsewhere), as the aggregator sends.

    A fresh process, so that nothing this process allocated before pollutes the peak. Needs
    torch and the model package (it runs the node's own code)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    args = {"plan": plan.to_dict(), "num_layers": num_layers, "model": model, "threads": threads, "examples": examples, "dataset": dataset,
            "repeats": repeats}
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
                 **(env or {})}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], cwd=root, env=child_env,
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"measuring child failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
