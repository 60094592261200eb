"""The training plan: what one node trains in one round, as typed, validated, frozen data.

A strategy on the aggregator makes a `Plan` per node and round; the cost model prices it; the
runner records it; the node's trainer executes it. All of them read this one definition, the
way every peft layer reads one `LoraConfig`. A plan is checked when it is made (a bad rank, an
unknown method, a LoRA spec on a full plan are errors at construction), and it travels in the
TASK message as `to_dict()` and comes back as `from_dict()`, which refuses unknown or missing
fields.

Naming of the model's parameters is defined here once, too: `block_of` is the one parser of
"which transformer block does this tensor belong to", and `pattern_key` is the one format of
peft's per-block rank and alpha pattern keys.

Methods: `full` (unfreeze whole blocks), `lora` (peft LoRA on chosen blocks, optionally as a
sub-model of those blocks alone), `adapter` (bottleneck adapters on chosen blocks) and `ia3`
(peft's (IA)^3 vectors on chosen blocks). A new method is one more optional spec, named in
`METHOD_SPECS` and checked in `Plan.__post_init__`.
"""
from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

from .arch import BLOCK_NAME, block_index

METHODS = ("full", "lora", "adapter", "ia3")
Method = Literal["full", "lora", "adapter", "ia3"]
# the linear modules of a BERT block, by their path inside it
BLOCK_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense")
# bottleneck adapter kind -> the sublayer output modules (paths inside a block) that get one; the
# adapter is that module's child `adapter` and acts on the output of its `dense` projection
ADAPTER_PLACES = {"houlsby": ("attention.output", "output"),  # after attention and after the feed-forward
                  "pfeiffer": ("output",)}                     # after the feed-forward only
ADAPTER_ACTIVATIONS = ("relu", "gelu", "silu")
MODULE_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def block_of(name: str) -> int | None:
    """Index of the transformer block a parameter or module name belongs to (None: embeddings,
    head, or anything outside the blocks). The block list's name (`layer`, `layers`, `h`:
    node/arch.py) must be a whole path segment."""
    return block_index(name)


def renumber(name: str, mapping: dict[int, int]) -> str:
    """`name` with its block index b replaced by mapping[b] (a name outside the blocks as it is)."""
    return BLOCK_NAME.sub(lambda m: ("." if m.group(0).startswith(".") else "")
                          + f"{m.group(1)}.{mapping[int(m.group(2))]}.", name, count=1)


def pattern_key(block: int, target: str) -> str:
    """peft's `rank_pattern` / `alpha_pattern` key for LoRA target `target` in block `block`.

    peft matches a key against the end of a module's path, so a per-block rank reaches the
    attention projections (query, key, value) of that block only; a target elsewhere in the
    block (e.g. "dense") keeps the plan's default rank. The cost model follows the same rule
    through `LoraSpec.rank_at`."""
    return f"layer.{int(block)}.attention.self.{target}"


class PlanError(ValueError):
    """A plan that cannot be executed; the message names the field and what is allowed."""


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise PlanError(msg)


def _int(v: Any, what: str, lo: int | None = None) -> int:
    _require(isinstance(v, int) and not isinstance(v, bool), f"{what} must be an integer, got {v!r}")
    _require(lo is None or v >= lo, f"{what} must be >= {lo}, got {v}")
    return int(v)


def _num(v: Any, what: str) -> float:
    _require(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
             f"{what} must be a finite number, got {v!r}")
    return float(v)


def _pairs(pattern: Any, what: str, value) -> tuple[tuple[int, Any], ...]:
    """A {block: value} mapping (keys may arrive as strings from the wire) as sorted pairs."""
    _require(isinstance(pattern, (dict, tuple, list)), f"{what} must map block -> value, got {pattern!r}")
    items = pattern.items() if isinstance(pattern, dict) else pattern
    out = {}
    for b, v in items:
        block = int(b) if isinstance(b, str) and b.isdigit() else b
        out[_int(block, f"{what} block", 0)] = value(v, f"{what}[{block}]")
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (peft): rank r and scaling alpha / r on `target_modules` of the plan's blocks;
    `rank_pattern` / `alpha_pattern` give some blocks their own rank / alpha."""
    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    rank_pattern: tuple[tuple[int, int], ...] = ()     # (block, rank), sorted; a dict is accepted
    alpha_pattern: tuple[tuple[int, float], ...] = ()  # (block, alpha), sorted; a dict is accepted

    def __post_init__(self):
        _int(self.r, "lora.r", 1)
        _require(_num(self.alpha, "lora.alpha") > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _require(0 <= _num(self.dropout, "lora.dropout") < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        targets = tuple(self.target_modules) if isinstance(self.target_modules, (list, tuple)) else None
        _require(bool(targets) and all(isinstance(t, str) and t for t in targets),
                 f"lora.target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        ranks = _pairs(self.rank_pattern, "lora.rank_pattern", lambda v, w: _int(v, w, 1))
        alphas = _pairs(self.alpha_pattern, "lora.alpha_pattern", _num)
        _require(all(a > 0 for _, a in alphas), "lora.alpha_pattern values must be > 0")
        for name, value in (("target_modules", targets), ("rank_pattern", ranks), ("alpha_pattern", alphas),
                            ("alpha", float(self.alpha)), ("dropout", float(self.dropout))):
            object.__setattr__(self, name, value)

    def rank_at(self, block: int, module_path: str) -> int:
        """The rank of the adapter on `module_path` (inside the block, e.g. attention.self.query)."""
        special = dict(self.rank_pattern)
        if block in special and any(module_path == f"attention.self.{t}" for t in self.target_modules):
            return special[block]
        return self.r

    def peft_patterns(self, key=None) -> tuple[dict[str, int], dict[str, float]]:
        """(rank_pattern, alpha_pattern) keyed the way peft's LoraConfig reads them; `key(block,
        target)` makes a key (default: `pattern_key`, BERT's attention)."""
        key = key or pattern_key
        ranks = {key(b, t): r for b, r in self.rank_pattern for t in self.target_modules}
        alphas = {key(b, t): a for b, a in self.alpha_pattern for t in self.target_modules}
        return ranks, alphas


@dataclass(frozen=True)
class AdapterSpec:
    """Bottleneck adapters: on the output y of a sublayer's projection, y + up(act(down(y))),
    down d -> size, up size -> d, before the sublayer's dropout, residual and LayerNorm.
    `kind` houlsby: after the attention output and the feed-forward output projections
    (Houlsby et al. 2019); pfeiffer: after the feed-forward output only (Pfeiffer et al. 2021).
    Both projections start normal(0, init_std) with zero biases, near the identity.
    `train_layer_norm`: the LayerNorm after each adapted sublayer trains too (Houlsby's
    recipe)."""
    size: int = 24
    kind: Literal["houlsby", "pfeiffer"] = "houlsby"
    activation: Literal["relu", "gelu", "silu"] = "relu"
    init_std: float = 1e-3
    train_layer_norm: bool = False

    def __post_init__(self):
        _int(self.size, "adapter.size", 1)
        _require(self.kind in ADAPTER_PLACES, f"adapter.kind must be one of {', '.join(ADAPTER_PLACES)}, "
                 f"got {self.kind!r}")
        _require(self.activation in ADAPTER_ACTIVATIONS,
                 f"adapter.activation must be one of {', '.join(ADAPTER_ACTIVATIONS)}, got {self.activation!r}")
        _require(isinstance(self.init_std, (int, float)) and not isinstance(self.init_std, bool)
                 and math.isfinite(self.init_std) and self.init_std > 0,
                 f"adapter.init_std must be a number > 0, got {self.init_std!r}")
        _require(isinstance(self.train_layer_norm, bool), "adapter.train_layer_norm must be true or false")

    @property
    def places(self) -> tuple[str, ...]:
        """The sublayer output modules (paths inside a block) that get an adapter."""
        return ADAPTER_PLACES[self.kind]


@dataclass(frozen=True)
class IA3Spec:
    """(IA)^3 (Liu et al. 2022, https://arxiv.org/abs/2205.05638) through peft: learned vectors
    that rescale, in every planned block, the output of the `targets` projections, or their
    input for the `feedforward` ones (the input of the feed-forward's second layer in the
    paper). A target with a dot is a path inside a block, matched exactly (peft's suffix
    matching would also take BERT's attention-output `dense` for `output.dense`); a plain name
    matches the modules of that name anywhere in the block (Llama's `k_proj`). The defaults are
    BERT's; strategies.fedia3 takes peft's defaults for other families."""
    targets: tuple[str, ...] = ("attention.self.key", "attention.self.value", "output.dense")
    feedforward: tuple[str, ...] = ("output.dense",)

    def __post_init__(self):
        for name in ("targets", "feedforward"):
            value = getattr(self, name)
            _require(isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value),
                     f"ia3.{name} must be a list of block paths")
            bad = [t for t in value if not MODULE_PATH.fullmatch(t)]
            _require(not bad, f"ia3.{name}: {bad} are not module paths (names joined by dots)")
            object.__setattr__(self, name, tuple(value))
        _require(len(self.targets) > 0, "ia3.targets must name at least one projection")
        _require(set(self.feedforward) <= set(self.targets), "ia3.feedforward must be among ia3.targets")

    @staticmethod
    def matches(target: str, path: str) -> bool:
        """Whether `target` names the module at `path` inside a block (see the class docstring)."""
        return path == target or ("." not in target and path.rsplit(".", 1)[-1] == target)

    def peft_regexes(self, blocks: list[int], segment: str = "layer") -> tuple[str, str | None]:
        """peft's target_modules and feedforward_modules, as regexes over full module names
        (`segment`: the name of the model's block list, node.arch.Layout.segment)."""
        def rx(paths):
            alts = "|".join(re.escape(p) if "." in p else rf"(?:[\w.]*\.)?{re.escape(p)}" for p in paths)
            return rf".*\.{re.escape(segment)}\.({'|'.join(map(str, blocks))})\.({alts})"
        return rx(self.targets), (rx(self.feedforward) if self.feedforward else None)


@dataclass(frozen=True)
class HeadSpec:
    """The task head (BERT: pooler + classifier). The classifier is new for the task, so it
    usually trains; the pretrained pooler trains with it only when `pooler` is set (peft's
    sequence-classification task saves the classifier alone). What trains is part of what the
    node receives and sends back."""
    train: bool = True
    pooler: bool = True

    def __post_init__(self):
        _require(isinstance(self.train, bool), f"head.train must be true or false, got {self.train!r}")
        _require(isinstance(self.pooler, bool), f"head.pooler must be true or false, got {self.pooler!r}")

    @property
    def trains_pooler(self) -> bool:
        return self.train and self.pooler


@dataclass(frozen=True)
class RankPenalty:
    """HetLoRA's local rank self-pruning: the loss adds weight x sum_m ||B_m[:, keep:] A_m[keep:, :]||_F
    over the LoRA modules m, and the node reports the share of its update norm in those ranks."""
    keep: int
    weight: float

    def __post_init__(self):
        _int(self.keep, "rank_penalty.keep", 1)
        _require(_num(self.weight, "rank_penalty.weight") >= 0, f"rank_penalty.weight must be >= 0, got {self.weight}")
        object.__setattr__(self, "weight", float(self.weight))


@dataclass(frozen=True)
class TrainSpec:
    """The local training loop: steps of AdamW on batches drawn with `seed` from the node's shard."""
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_len: int = 64
    seed: int = 0
    proximal_mu: float = 0.0  # > 0: the loss gets (mu/2)||w - w_start||^2 over the trained tensors (FedProx, FedAsync)

    def __post_init__(self):
        _int(self.local_steps, "train.local_steps", 1)
        _int(self.batch_size, "train.batch_size", 1)
        _int(self.max_len, "train.max_len", 1)
        _int(self.seed, "train.seed")
        _require(_num(self.lr, "train.lr") > 0, f"train.lr must be > 0, got {self.lr}")
        _require(_num(self.weight_decay, "train.weight_decay") >= 0, "train.weight_decay must be >= 0")
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "weight_decay", float(self.weight_decay))
        _require(_num(self.proximal_mu, "train.proximal_mu") >= 0, "train.proximal_mu must be >= 0")
        object.__setattr__(self, "proximal_mu", float(self.proximal_mu))


@dataclass(frozen=True)
class Plan:
    """What one node trains in one round.

    blocks: the transformer blocks that train (method full: unfrozen whole; method lora: where
    the adapters go), in ascending order; None = every block of the model.
    submodel: the node builds a smaller model of these blocks alone, in order (FedRA's
    execution): the other blocks cost it nothing; tensors keep their blocks' global names on
    the wire."""
    method: Method
    blocks: tuple[int, ...] | None = None
    head: HeadSpec = field(default_factory=HeadSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    lora: LoraSpec | None = None          # method lora only
    adapter: AdapterSpec | None = None    # method adapter only
    ia3: IA3Spec | None = None            # method ia3 only
    train_embeddings: bool = False        # method full only
    rank_penalty: RankPenalty | None = None  # method lora only
    submodel: bool = False                # method lora only: the node runs a model of `blocks` alone

    def __post_init__(self):
        _require(self.method in METHODS, f"plan method {self.method!r} is not one of: {', '.join(METHODS)}")
        if self.blocks is not None:
            _require(isinstance(self.blocks, (list, tuple)), f"plan blocks must be a list, got {self.blocks!r}")
            blocks = tuple(sorted({_int(b, "plan blocks entry", 0) for b in self.blocks}))
            object.__setattr__(self, "blocks", blocks)
        for name, kind in _SPECS:
            value = getattr(self, name)
            _require(value is None and name in _OPTIONAL or isinstance(value, kind),
                     f"plan {name} must be a {kind.__name__}, got {type(value).__name__}")
        _require(isinstance(self.train_embeddings, bool), "plan train_embeddings must be true or false")
        _require(isinstance(self.submodel, bool), "plan submodel must be true or false")
        for method, spec in METHOD_SPECS.items():  # a method's spec exactly when it is the method
            given = getattr(self, spec) is not None
            _require(given or self.method != method, f"plan method {method} needs its {spec} spec")
            _require(not given or self.method == method, f"the {spec} spec goes with method {method}, not {self.method}")
        if self.method != "full":
            _require(self.blocks is None or len(self.blocks) > 0, f"plan method {self.method} needs at least one block; "
                     "for the head alone use method full with no blocks")
            _require(not self.train_embeddings, f"train_embeddings goes with method full, not {self.method}")
        _require(self.rank_penalty is None or self.method == "lora",
                 f"rank_penalty needs method lora, the plan has {self.method!r}")
        _require(not self.submodel or (self.method == "lora" and self.blocks is not None),
                 "a submodel plan needs method lora and its blocks listed")

    def block_list(self, num_blocks: int) -> list[int]:
        """The blocks that train, checked against a model of `num_blocks` blocks."""
        blocks = list(range(num_blocks)) if self.blocks is None else list(self.blocks)
        _require(all(b < num_blocks for b in blocks),
                 f"plan names blocks {blocks} but the model has blocks 0..{num_blocks - 1}")
        return blocks

    def local_blocks(self) -> dict[int, int]:
        """Global block -> its index in the model the node runs (the identity unless a submodel)."""
        return {b: i for i, b in enumerate(self.blocks)} if self.submodel else {}

    def record(self) -> dict[str, Any]:
        """What results keep of the plan: method, blocks, the rank penalty, a submodel."""
        out: dict[str, Any] = {"method": self.method, "blocks": None if self.blocks is None else list(self.blocks)}
        if self.submodel:
            out["submodel"] = True
        if self.rank_penalty is not None:
            out["rank_penalty"] = asdict(self.rank_penalty)
        return out

    # -- the wire ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain msgpack / JSON types only (block keys of the patterns become strings)."""
        d = asdict(self)
        d["blocks"] = None if self.blocks is None else list(self.blocks)
        if self.ia3 is not None:
            d["ia3"] = {"targets": list(self.ia3.targets), "feedforward": list(self.ia3.feedforward)}
        if self.lora is not None:
            lo = d["lora"]
            lo["target_modules"] = list(self.lora.target_modules)
            lo["rank_pattern"] = {str(b): r for b, r in self.lora.rank_pattern}
            lo["alpha_pattern"] = {str(b): a for b, a in self.lora.alpha_pattern}
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Plan":
        """The plan a `to_dict()` made; unknown or missing fields are PlanErrors."""
        _require(isinstance(d, dict), f"a plan must be a mapping, got {type(d).__name__}")
        kw = dict(d)
        for name, kind in _SPECS:
            if kw.get(name) is not None:
                kw[name] = _build(kind, kw[name], f"plan {name}")
        return _build(cls, kw, "plan")


_SPECS = (("head", HeadSpec), ("train", TrainSpec), ("lora", LoraSpec), ("rank_penalty", RankPenalty),
          ("adapter", AdapterSpec), ("ia3", IA3Spec))
_OPTIONAL = ("lora", "rank_penalty", "adapter", "ia3")
METHOD_SPECS = {"lora": "lora", "adapter": "adapter", "ia3": "ia3"}  # method -> the spec it needs


def _build(kind, d: Any, what: str):
    """kind(**d), with unknown and missing fields said plainly."""
    _require(isinstance(d, dict), f"{what} must be a mapping, got {d!r}")
    names = {f.name for f in fields(kind)}
    unknown = sorted(set(d) - names)
    _require(not unknown, f"{what}: unknown field(s) {unknown}; allowed: {', '.join(sorted(names))}")
    missing = sorted(f.name for f in fields(kind) if f.name not in d
                     and f.default is MISSING and f.default_factory is MISSING)
    _require(not missing, f"{what}: missing field(s) {missing}")
    return kind(**d)
