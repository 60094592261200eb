"""The scenario file: schema, loading, and the clear errors a bad file gets.

A scenario is validated whole before anything starts, so a broken file never starts half a
run. Every error names the file, the field path, the bad value and what is allowed.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from emulation.profiles import PROFILES, Power, Profile

BACKENDS = ("auto", "process", "netns", "docker")
PROFILE_FIELDS = ("cpu_share", "threads", "memory_mb", "uplink_mbit", "downlink_mbit", "latency_ms")


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message lists every problem found."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    name: str | None = Field(None, description="a built-in model (default all-minilm-l6-v2 when no path)")
    path: str | None = Field(None, description="a local Hugging Face checkpoint folder (config, weights, "
                             "tokenizer), relative to the scenario file")
    num_layers: int | None = Field(None, ge=1, description="cut the pretrained model to its first blocks")
    task: Literal["classification", "causal_lm"] = Field("classification", description="sequence classification, "
                                                          "or instruction tuning of a causal LM (needs path)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="the frozen weights' type (trained tensors "
                                                  "and the wire stay float32)")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        from node.trainer import MODELS
        if v is not None and v not in MODELS:
            raise ValueError(f"unknown model {v!r}; allowed: {', '.join(MODELS)}")
        return v

    @model_validator(mode="after")
    def _one_model(self):
        if self.name is not None and self.path is not None:
            raise ValueError("give either name (a built-in model) or path (a local checkpoint folder), not both")
        if self.name is None and self.path is None:
            self.name = "all-minilm-l6-v2"
        if self.task == "causal_lm" and self.path is None:
            raise ValueError("task causal_lm needs path: a local causal-LM checkpoint (the built-in model is an encoder)")
        return self


class Partition(Strict):
    kind: Literal["dirichlet", "iid"] = "dirichlet"
    alpha: float = Field(1.0, gt=0, description="Dirichlet concentration; small = strong label skew")
    min_per_node: int = Field(16, ge=1)
    fill: Literal["balanced", "random", "in_order"] = Field(
        "balanced", description="dirichlet: balanced splits each class over the nodes in proportion to their draws; "
        "random and in_order let nodes take exact shares one after another (in_order: the only way before this "
        "field existed), so the last ones drawn get the classes left over")


class DataConfig(Strict):
    dataset: str | None = Field(None, description="a built-in dataset (default rotten_tomatoes when no path)")
    path: str | None = Field(None, description="the user's data: a CSV, JSONL or Parquet file, or a folder written "
                             "by datasets' save_to_disk (relative to the scenario file)")
    text_column: str = Field("text", min_length=1)
    label_column: str = Field("label", min_length=1, description="string or integer labels")
    split: str = Field("train", description="the training split of a saved DatasetDict")
    test_path: str | None = Field(None, description="a file of the same format holding the test set")
    test_split: str | None = Field(None, description="the test split of a saved DatasetDict")
    prompt_column: str = Field("prompt", min_length=1, description="causal_lm: the instruction")
    response_column: str = Field("response", min_length=1, description="causal_lm: the answer the loss is on")
    partition: Partition = Partition()
    test_size: int = Field(500, ge=10, description="held-out examples, cut with the seed (from the dataset's own "
                           "test set where it has one)")
    train_size: int | None = Field(None, ge=10, description="use only this many training examples")
    max_len: int = Field(64, ge=8, le=512)

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        from node.data import BUILTIN
        if v is not None and v not in BUILTIN:
            raise ValueError(f"unknown dataset {v!r}; allowed: {', '.join(BUILTIN)}")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        from node.data import DataError
        try:
            self.source()  # either dataset or path; test_path or test_split
        except DataError as exc:
            raise ValueError(exc.message) from None
        return self

    def source(self, task: str = "classification"):
        """The node-side description of where the examples come from (node.data.DataSource)."""
        from node.data import DataSource
        return DataSource(self.dataset, self.path, self.text_column, self.label_column, self.split,
                          self.test_path, self.test_split, task, self.prompt_column, self.response_column)

    @property
    def name(self) -> str:
        return self.source().label


ZYGOTE_AUTO_NODES = 2  # from this many emulated nodes on, they fork from a zygote (docs/architecture.md)


class TrainingConfig(Strict):
    rounds: int = Field(10, ge=1)
    clients_per_round: int | None = Field(None, ge=1, description="sampled nodes per round; default all")
    local_steps: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    target_accuracy: float = Field(0.7, gt=0, le=1)
    target_loss: float | None = Field(None, gt=0, description="time to target is when the held-out loss first "
                                      "falls to this (instead of target_accuracy; causal_lm)")
    round_deadline_s: float = Field(600.0, gt=0, description="emulated seconds before stragglers are dropped")
    min_results: int = Field(1, ge=1, description="fewer results than this and the round is recorded as failed")
    time_budget_s: float | None = Field(None, gt=0, description="emulated seconds per strategy: no new round "
                                        "starts once a strategy has used them (default: run every round)")


class GilbertElliott(Strict):
    """A synthetic good/bad link (testbed/linktrace.py): the profile's rates times a factor per state."""
    p_good_to_bad: float = Field(gt=0, le=1, description="chance per step of going from good to bad")
    p_bad_to_good: float = Field(gt=0, le=1, description="chance per step of going from bad to good")
    bad_factor: float = Field(gt=0, le=1, description="the bad state's rates: this times the profile's")
    good_factor: float = Field(1.0, gt=0, description="the good state's rates: this times the profile's")
    step_s: float = Field(1.0, gt=0, description="emulated seconds per step of the chain")


class LinkTrace(Strict):
    """A group's link over time: a rate trace file, or the Gilbert-Elliott generator."""
    file: str | None = Field(None, description="CSV (relative to the scenario): time_s,uplink_mbit,downlink_mbit, "
                             "one trace for the group, or node,time_s,uplink_mbit,downlink_mbit per node")
    end: Literal["hold", "loop"] = Field("hold", description="after the last row: keep its rates, or start over")
    period_s: float | None = Field(None, gt=0, description="loop: the trace's length (default: the last time_s "
                                   "plus the gap before it)")
    gilbert_elliott: GilbertElliott | None = None

    @model_validator(mode="after")
    def _check(self) -> "LinkTrace":
        if (self.file is None) == (self.gilbert_elliott is None):
            raise ValueError("give exactly one of file or gilbert_elliott")
        if self.file is None and (self.end != "hold" or self.period_s is not None):
            raise ValueError("end and period_s go with file, not gilbert_elliott")
        if self.period_s is not None and self.end != "loop":
            raise ValueError("period_s goes with end: loop")
        return self


class NodeGroup(Strict):
    group: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")
    count: int = Field(1, ge=1, le=1000)
    profile: str
    overrides: dict[str, float] = Field(default_factory=dict, description="fixed profile fields for the group")
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict, description="per-node uniform draw [lo, hi]")
    backend: Literal["inherit", "remote"] = "inherit"
    engine: str | None = Field(None, description="name under engines: these nodes run as containers on that "
                               "docker engine (another host, or another engine of this one)")
    link_trace: LinkTrace | None = Field(None, description="the link's rates over time instead of the profile's "
                                         "constant ones")

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str, info: ValidationInfo) -> str:
        custom = sorted((info.context or {}).get("profiles", ()))
        if v not in PROFILES and v not in custom:
            raise ValueError(f"unknown profile {v!r}; allowed: {', '.join([*PROFILES, *custom])} "
                             "(or define it under profiles:)")
        return v

    @field_validator("overrides", "ranges")
    @classmethod
    def _fields(cls, v: dict) -> dict:
        bad = sorted(set(v) - set(PROFILE_FIELDS))
        if bad:
            raise ValueError(f"unknown profile field(s) {bad}; allowed: {', '.join(PROFILE_FIELDS)}")
        return v

    @field_validator("ranges")
    @classmethod
    def _ordered(cls, v: dict) -> dict:
        for k, (lo, hi) in v.items():
            if not 0 <= lo <= hi:
                raise ValueError(f"range for {k} must satisfy 0 <= lo <= hi, got [{lo}, {hi}]")
        return v


class ProfileSpec(Strict):
    """A device profile defined in the scenario (e.g. pasted from `python -m testbed calibrate`)."""
    cpu_share: float = Field(gt=0, description="training throughput in host cores (emulation/profiles.py)")
    threads: int = Field(1, ge=1)
    memory_mb: int = Field(gt=0)
    uplink_mbit: float = Field(0.0, ge=0, description="0 = unshaped")
    downlink_mbit: float = Field(0.0, ge=0, description="0 = unshaped")
    latency_ms: float = Field(0.0, ge=0)
    source: str = "defined in the scenario"
    power: Power | None = Field(None, description="watts by state, for energy: idle_w, compute_w, and tx_w + rx_w "
                                "or tx_nj_per_byte + rx_nj_per_byte (emulation/profiles.py)")


class StrategyEntry(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$", description="label in results")
    type: str | None = Field(None, description="strategy module; default: same as name")
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "StrategyEntry":
        from .strategies import STRATEGIES
        self.type = self.type or self.name
        if self.type not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.type!r}; allowed: {', '.join(STRATEGIES)}")
        errors = param_errors(STRATEGIES[self.type].Params, self.params)
        if errors:  # the first, with what the strategy takes (the scenario check gives the rest)
            raise ValueError(f"{errors[0]} (strategy {self.type!r} takes: "
                             f"{', '.join(STRATEGIES[self.type].Params.model_fields)})")
        return self


def param_errors(params_model: type[BaseModel], params: dict, ctx: Any = None) -> list[str]:
    """Every problem of a strategy's parameters, as "params.FIELD: what is wrong"; `ctx` (a
    strategies.Context) adds the checks that need the scenario's profiles and model."""
    try:
        params_model.model_validate(params, context=ctx)
        return []
    except ValidationError as err:
        out = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            field, sep, rest = msg.partition(": ")
            if not loc and sep and field in params_model.model_fields:  # a model check naming its field
                loc, msg = field, rest
            out.append(f"params{'.' + loc if loc else ''}: {msg}")
        return out


class Strategies(Strict):
    baseline: str
    run: list[StrategyEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "Strategies":
        names = [s.name for s in self.run]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"strategy names must be unique, repeated: {dupes}")
        if self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the strategies run: {names}")
        return self


class AggregatorConfig(Strict):
    bind: str = Field("127.0.0.1", description="address the aggregator listens on")
    port: int = Field(0, ge=0, le=65535, description="0 = any free port")
    register_timeout_s: float = Field(600.0, gt=0)
    auth: Literal["curve", "none"] = Field("curve", description="curve: only nodes holding the run's keys get in")
    hold_mb: float = Field(1024.0, ge=0, description="a round whose results add up to more than this (MB) writes "
                           "each result to <run>/spill as it arrives and aggregates it from there, one tensor at a "
                           "time, so the aggregator's memory does not grow with the number of nodes (0: always)")


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


class EngineSpec(Strict):
    """A docker engine that runs some of the nodes: one more host when this one is not enough.

    Its containers dial back to the one aggregator: on the run network's gateway when the engine
    runs on this machine, else on `connect`, an address of this host the engine's host can reach
    (the aggregator listens there too)."""
    url: str = Field(description="the engine: unix:///PATH, tcp://HOST:PORT "
                     "or ssh://USER@HOST (the docker SDK; ssh uses the system's ssh client and its config)")
    connect: str | None = Field(None, description="IP address of this host that the engine's containers dial "
                                "(required for an engine on another host)")
    same_host: bool | None = Field(None, description="the engine runs on this machine (then its links are shaped "
                                   "from here like the docker backend's; default: true for unix:// and "
                                   "tcp://localhost, else false)")
    tls: bool = Field(False, description="tcp:// with TLS, certificates from DOCKER_CERT_PATH (as the docker CLI)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^(unix|tcp|ssh)://.+", v):
            raise ValueError("a docker engine address; allowed: unix:///PATH, tcp://HOST:PORT, ssh://USER@HOST")
        return v

    @field_validator("connect")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        import ipaddress
        if v is not None:
            try:
                ip = ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"connect must be an IP address of this host (the aggregator binds it), "
                                 f"got {v!r}") from None
            if ip.is_unspecified or ip.is_loopback:
                raise ValueError(f"{v} cannot be reached from another host's containers; give an "
                                 "address of this host on a network the engine's host shares")
        return v

    @model_validator(mode="after")
    def _check(self) -> "EngineSpec":
        if self.same_host is None:
            host = self.url.split("://", 1)[1].split("@")[-1].rsplit(":", 1)[0]
            self.same_host = self.url.startswith("unix://") or (self.url.startswith("tcp://") and host in LOCAL_HOSTS)
        if self.same_host and self.connect is not None:
            raise ValueError("@connect: goes with an engine on another host (same_host: false); an engine on "
                             "this machine is dialled on its run network's gateway")
        if not self.same_host and self.connect is None:
            raise ValueError(f"@connect: an engine on another host ({self.url}) needs connect: an IP address of "
                             "this host its containers can reach (the aggregator listens there)")
        if self.tls and not self.url.startswith("tcp://"):
            raise ValueError("@tls: goes with a tcp:// url")
        return self


FAULT_ACTIONS = ("kill", "restart", "pause", "resume", "cut_link", "restore_link", "link", "profile")
UNDOABLE = ("pause", "cut_link", "link", "profile")


class FaultEvent(Strict):
    """One scheduled fault: what happens to which nodes, when (a round, or emulated time)."""
    action: Literal["kill", "restart", "pause", "resume", "cut_link", "restore_link", "link", "profile"]
    nodes: list[str] = Field(min_length=1, description="node names (group-i) or group names (all their nodes)")
    count: int | None = Field(None, ge=1, description="pick this many of `nodes` at random (seeded; the same "
                              "for every strategy)")
    round: int | None = Field(None, ge=1, description="the round it happens in")
    after_s: float = Field(0.0, ge=0, description="emulated seconds into that round (0: before its tasks go out)")
    at_s: float | None = Field(None, ge=0, description="instead of round: emulated seconds since the strategy started")
    duration_s: float | None = Field(None, gt=0, description="pause, cut_link, link, profile: undone after this "
                                     "many emulated seconds (default: until undone or the strategy ends)")
    uplink_mbit: float | None = Field(None, ge=0, description="link: the new uplink rate (0 = unshaped)")
    downlink_mbit: float | None = Field(None, ge=0, description="link: the new downlink rate (0 = unshaped)")
    latency_ms: float | None = Field(None, ge=0, description="link: the new one-way latency")
    profile: str | None = Field(None, description="profile: the device profile the nodes switch to")
    strategies: list[str] | None = Field(None, description="only under these strategies (default: every one)")

    @model_validator(mode="after")
    def _check(self) -> "FaultEvent":
        if (self.round is None) == (self.at_s is None):
            raise ValueError("give exactly one of round (with optional after_s) or at_s")
        if self.at_s is not None and self.after_s:
            raise ValueError("after_s goes with round, not with at_s")
        link = (self.uplink_mbit, self.downlink_mbit, self.latency_ms)
        if self.action == "link" and all(v is None for v in link):
            raise ValueError("action link needs at least one of uplink_mbit, downlink_mbit, latency_ms")
        if self.action != "link" and any(v is not None for v in link):
            raise ValueError(f"uplink_mbit, downlink_mbit and latency_ms go with action link, not {self.action}")
        if (self.action == "profile") != (self.profile is not None):
            raise ValueError("action profile needs profile: NAME" if self.action == "profile"
                             else f"profile: goes with action profile, not {self.action}")
        if self.duration_s is not None and self.action not in UNDOABLE:
            raise ValueError(f"duration_s goes with {', '.join(UNDOABLE)}, not {self.action}")
        return self


class MarkovOnOff(Strict):
    """Synthetic availability (testbed/linktrace.py): exponential online and offline times."""
    mean_on_s: float = Field(gt=0, description="mean emulated seconds a device stays online")
    mean_off_s: float = Field(gt=0, description="mean emulated seconds a device stays offline")
    nodes: list[str] | None = Field(None, description="node or group names it applies to (default: every "
                                    "emulated node)")


class Availability(Strict):
    """Which nodes may be sampled in a round (the others are offline: a real server never sees them).
    A node that goes offline during a round (trace or markov) loses that round's work."""
    probability: float = Field(1.0, gt=0, le=1, description="each node online with this probability per round")
    trace: str | None = Field(None, description="CSV file (relative to the scenario) with rows "
                              "node,online_from_s,online_to_s in emulated seconds since the strategy started; "
                              "a node with rows is online only inside them, one without rows always")
    markov: MarkovOnOff | None = None

    @model_validator(mode="after")
    def _check(self) -> "Availability":
        if self.trace is not None and self.markov is not None:
            raise ValueError("give at most one of trace or markov")
        return self


class Faults(Strict):
    events: list[FaultEvent] = Field(default_factory=list)
    availability: Availability = Availability()


class Scenario(Strict):
    name: str
    description: str = ""
    seed: int = 0
    seeds: list[int] | None = Field(None, min_length=1, description="run the scenario once per seed (repeated "
                                    "trials); `seed` is then each run's")
    backend: Literal["auto", "process", "netns", "docker"] = "auto"
    zygote: Literal["auto", "on", "off"] = Field("auto", description="fork nodes from one preloaded interpreter "
                                                 f"(process/netns backends; auto: from {ZYGOTE_AUTO_NODES} nodes)")
    cpu_limit: Literal["quota", "weight"] = Field("weight", description="netns backend: a slower CPU as cores shared "
                                                  "by weight with each node stretching its CPU seconds to its share "
                                                  "(weight), or as a CFS quota (quota; it costs throttled nodes "
                                                  "extra CPU time on some hosts: docs/profiles.md)")
    dilation: Literal["auto", "off"] | float = Field("auto", description="slow every device and link by one factor when the host is short of cores")
    clock: Literal["real", "virtual"] = Field("real", description="real: devices and links are emulated in wall-clock "
                                             "time; virtual: nodes train at host speed, each reports its CPU seconds "
                                             "/ its profile's cores, links are timed from the profile over the bytes "
                                             "sent, and the aggregator orders results on one virtual clock "
                                             "(docs/virtual-clock.md)")
    virtual_parallel: int | None = Field(None, ge=1, description="clock: virtual: at most this many nodes train "
                                         "at once on this host (default: its cores); a round's times do not "
                                         "depend on it, its memory and real time do")
    release_waits: bool = Field(False, description="clock: real with a dilation: once every node of a round has "
                                "done its CPU work, the rest of the round's waits passes undilated; recorded "
                                "times do not change (docs/profiles.md: Released rounds)")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    profiles: dict[str, ProfileSpec] = Field(default_factory=dict, description="device profiles of this scenario")
    nodes: list[NodeGroup] = Field(min_length=1)
    strategies: Strategies
    aggregator: AggregatorConfig = AggregatorConfig()
    faults: Faults = Faults()
    engines: dict[str, EngineSpec] = Field(default_factory=dict, description="more docker engines; node groups "
                                           "name one with engine: (README: More hosts)")

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, v: dict) -> dict:
        for name in v:
            if name in PROFILES:
                raise ValueError(f"@{name}: profile {name!r} is built in (emulation/profiles.py): "
                                 "give yours another name")
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$", name):
                raise ValueError(f"profile name {name!r}: letters, digits, '_', '.', '-' (at most 41)")
        return v

    @field_validator("zygote", mode="before")
    @classmethod
    def _zygote(cls, v):
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML 1.1: on/off are booleans

    @field_validator("dilation", mode="before")
    @classmethod
    def _dilation(cls, v):
        if v is False:  # YAML 1.1 reads a bare `off` as false
            return "off"
        if v is True:
            raise ValueError("dilation must be auto, off or a number >= 1")
        if isinstance(v, (int, float)) and v < 1:
            raise ValueError("dilation must be auto, off or a number >= 1")
        return v

    @model_validator(mode="after")
    def _check(self) -> "Scenario":
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"@seeds: each seed once, got {self.seeds}")
        groups = [g.group for g in self.nodes]
        dupes = sorted({g for g in groups if groups.count(g) > 1})
        if dupes:
            raise ValueError(f"@nodes: node group names must be unique, repeated: {dupes}")
        n = sum(g.count for g in self.nodes)
        k = self.training.clients_per_round
        if k is not None and k > n:
            raise ValueError(f"@training.clients_per_round: {k} exceeds the {n} nodes declared")
        if self.training.min_results > (k or n):
            raise ValueError(f"@training.min_results: {self.training.min_results} exceeds clients per round ({k or n})")
        self._check_engines()
        self._check_clock()
        self._check_release()
        self._check_faults()
        self._check_links()
        return self

    def strategy_param_errors(self) -> list[str]:
        """Strategy parameters against this scenario: its profiles and the model's blocks (read
        from the model's config, no weights), so a bad one never starts a run."""
        from .strategies import STRATEGIES
        ctx = strategy_context(self)
        errors = [f"strategies.run[{i}].{e}" for i, entry in enumerate(self.strategies.run)
                  for e in param_errors(STRATEGIES[entry.type].Params, entry.params, ctx)]
        if self.clock == "virtual":
            pauses = [i for i, ev in enumerate(self.faults.events) if ev.action == "pause"]
            errors += [f"faults.events[{pauses[0]}].action: pause is not timed on the virtual clock with "
                       f"{entry.type}, an asynchronous strategy (strategies.run[{i}]); allowed there: kill, restart, "
                       "link, profile; or use clock: real"
                       for i, entry in enumerate(self.strategies.run)
                       if pauses and getattr(STRATEGIES[entry.type], "asynchronous", False)][:1]
        return errors

    def _check_release(self) -> None:
        """Released rounds need nodes that read the release file on this host, on the real clock."""
        if not self.release_waits:
            return
        if self.clock == "virtual":
            raise ValueError("@release_waits: goes with clock: real (the virtual clock has no waits to release)")
        if self.backend == "docker":
            raise ValueError("@release_waits: the docker backend's nodes cannot read the run's release file; "
                             "allowed backends: auto, process, netns")
        for i, g in enumerate(self.nodes):
            if g.engine is not None:
                raise ValueError(f"@nodes[{i}]: release_waits: group {g.group} runs on engine {g.engine}, whose "
                                 "nodes cannot read the run's release file; remove engine: or release_waits")

    def _check_clock(self) -> None:
        """The virtual clock times devices it starts itself, on this host, undilated."""
        if self.clock != "virtual":
            if self.virtual_parallel is not None:
                raise ValueError("@virtual_parallel: goes with clock: virtual (the real clock trains every "
                                 "sampled node at once)")
            return
        if self.backend not in ("auto", "process"):
            raise ValueError(f"@backend: clock: virtual runs on the process backend (nodes are not slowed, so no "
                             f"sandbox limits their CPU or links); got {self.backend!r}; allowed: auto, process")
        if isinstance(self.dilation, float) and self.dilation != 1:
            raise ValueError(f"@dilation: clock: virtual has no dilation (nothing waits); got {self.dilation:g}; "
                             "allowed: auto, off, 1")
        for i, g in enumerate(self.nodes):
            if g.backend == "remote" or g.engine is not None:
                raise ValueError(f"@nodes[{i}]: clock: virtual times only the nodes it starts on this host; "
                                 f"group {g.group} is {'remote' if g.backend == 'remote' else 'on engine ' + g.engine}")

    def _check_engines(self) -> None:
        for name in self.engines:
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$", name):
                raise ValueError(f"@engines: engine name {name!r}: letters, digits, '_', '.', '-' (at most 41)")
        for i, g in enumerate(self.nodes):
            if g.engine is None:
                continue
            if g.engine not in self.engines:
                allowed = ", ".join(sorted(self.engines)) or "none defined (add them under engines:)"
                raise ValueError(f"@nodes[{i}].engine: unknown engine {g.engine!r}; allowed: {allowed}")
            if g.backend == "remote":
                raise ValueError(f"@nodes[{i}].engine: a remote (hand-started) group runs on no engine; "
                                 "give engine: or backend: remote, not both")

    def _check_faults(self) -> None:
        names = {f"{g.group}-{i}" for g in self.nodes for i in range(g.count)}
        groups = {g.group for g in self.nodes}
        remote = {g.group for g in self.nodes if g.backend == "remote"}
        remote |= {f"{g}-{i}" for g in self.nodes if g.backend == "remote" for i in range(g.count)} if remote else set()
        strategies = [s.name for s in self.strategies.run]
        known = {*PROFILES, *self.profiles}
        for i, ev in enumerate(self.faults.events):
            at = f"@faults.events[{i}]"
            bad = sorted(set(ev.nodes) - names - groups)
            if bad:
                raise ValueError(f"{at}.nodes: unknown node or group {bad}; groups: {', '.join(sorted(groups))}; "
                                 f"nodes are named GROUP-INDEX (e.g. {sorted(names)[0]})")
            hands_off = sorted(set(ev.nodes) & remote)
            if hands_off:
                raise ValueError(f"{at}.nodes: {hands_off} are remote (real) devices: the testbed cannot "
                                 "inject faults into them")
            pool = {n for x in ev.nodes for n in ([x] if x in names else
                                                  [f"{x}-{j}" for g in self.nodes if g.group == x for j in range(g.count)])}
            if ev.count is not None and ev.count > len(pool):
                raise ValueError(f"{at}.count: {ev.count} exceeds the {len(pool)} node(s) named")
            if ev.profile is not None and ev.profile not in known:
                raise ValueError(f"{at}.profile: unknown profile {ev.profile!r}; allowed: {', '.join(sorted(known))}")
            if ev.round is not None and ev.round > self.training.rounds:
                raise ValueError(f"{at}.round: {ev.round} is after the last round ({self.training.rounds})")
            wrong = sorted(set(ev.strategies or ()) - set(strategies))
            if wrong:
                raise ValueError(f"{at}.strategies: unknown {wrong}; the scenario runs {strategies}")


    def _check_links(self) -> None:
        """Link traces on emulated groups only, and Gilbert-Elliott on shaped links only."""
        for i, g in enumerate(self.nodes):
            tr = g.link_trace
            if tr is None:
                continue
            if g.backend == "remote":
                raise ValueError(f"@nodes[{i}].link_trace: group {g.group} is remote (real devices): their links "
                                 "are their own")
            if tr.gilbert_elliott is not None:
                base = PROFILES.get(g.profile) or self.profiles[g.profile]
                for k in ("uplink_mbit", "downlink_mbit"):
                    if not g.overrides.get(k, getattr(base, k)) and k not in g.ranges:
                        raise ValueError(f"@nodes[{i}].link_trace.gilbert_elliott: it scales the profile's rates, "
                                         f"and {g.profile}'s {k} is 0 (unshaped); give the group overrides: "
                                         f"{{{k}: ...}} or use a trace file")
        mk = self.faults.availability.markov
        if mk is not None and mk.nodes is not None:
            names = {f"{g.group}-{j}" for g in self.nodes for j in range(g.count)}
            groups = {g.group for g in self.nodes}
            bad = sorted(set(mk.nodes) - names - groups)
            if bad:
                raise ValueError(f"@faults.availability.markov.nodes: unknown node or group {bad}; groups: "
                                 f"{', '.join(sorted(groups))}")


class NodeSpec(BaseModel):
    """One concrete node: its name, group and the profile after overrides and draws."""
    name: str
    group: str
    profile: Profile
    remote: bool = False
    engine: str | None = None  # name under engines: (None: the scenario's backend on this host)


def model_spec(sc: Scenario):
    """The model every node and the aggregator build (node.trainer.ModelSpec); its head has one
    output per class of the data."""
    from node.data import load_dataset
    from node.trainer import ModelSpec
    if sc.model.task == "causal_lm":
        return ModelSpec(sc.model.name or "local", 2, sc.model.num_layers, sc.seed, path=sc.model.path,
                         task="causal_lm", dtype=sc.model.dtype)
    return ModelSpec(sc.model.name or "local", len(load_dataset(sc.data.source()).classes), sc.model.num_layers,
                     sc.seed, path=sc.model.path, dtype=sc.model.dtype)


def as_it_began(doc: dict) -> dict:
    """A scenario as a run that began before a default changed read it (a checkpoint's copy):
    dirichlet shards were drawn in the nodes' order before `data.partition.fill` existed."""
    part = (doc.get("data") or {}).get("partition") or {}
    if part.get("kind", "dirichlet") == "dirichlet" and "fill" not in part:
        doc = {**doc, "data": {**doc["data"], "partition": {**part, "fill": "in_order"}}}
    return doc


def walked_analytically(model_type: str | None, dtype: str) -> bool:
    """Whether testbed/costmodel.py prices this model (a BERT encoder in float32); any other is
    measured on the model itself (testbed/costmeasure.py)."""
    return model_type in COST_MODEL_FAMILIES and dtype == "float32"


def strategy_context(sc: Scenario, nodes: list[NodeSpec] | None = None):
    """What a strategy may know of this scenario (testbed.strategies.Context): the training
    settings, the model's config and blocks, every node's profile and the profiles faults switch to."""
    from node.arch import layer_count
    from node.trainer import block_projections, layout, meta_model, model_config, model_path

    from .costmeasure import Measured
    from .strategies import STRATEGIES, Context
    spec = model_spec(sc)
    config = model_config(spec)
    projections, modules = (), ()
    if any(STRATEGIES[s.type].reads_block_layout for s in sc.strategies.run):
        meta = meta_model(model_path(spec.name, spec.path), spec.task)
        block = meta.get_submodule(layout(meta).blocks + "0")
        projections, modules = block_projections(meta), tuple(n for n, _ in block.named_modules() if n)
    nodes = expand_nodes(sc) if nodes is None else nodes
    measured = None if walked_analytically(config.get("model_type"), spec.dtype) else Measured(spec)
    return Context(training=sc.training, max_len=sc.data.max_len, num_blocks=layer_count(config), task=sc.model.task,
                   seed=sc.seed, model_config=config, cost_of=measured, block_projections=projections,
                   block_modules=modules,
                   profiles={n.name: n.profile for n in nodes},
                   known_profiles=tuple(sc.profiles),
                   profile_names=frozenset(ev.profile for ev in sc.faults.events if ev.profile))


def expand_nodes(sc: Scenario) -> list[NodeSpec]:
    """Groups -> nodes; `ranges` are drawn per node from the scenario seed (reproducible)."""
    rng = random.Random(sc.seed)
    out = []
    for g in sc.nodes:
        for i in range(g.count):
            fields = dict(g.overrides)
            fields.update({k: rng.uniform(lo, hi) for k, (lo, hi) in sorted(g.ranges.items())})
            if "threads" in fields:
                fields["threads"] = max(1, int(round(fields["threads"])))
            if "memory_mb" in fields:
                fields["memory_mb"] = int(fields["memory_mb"])
            base = PROFILES.get(g.profile) or Profile(name=g.profile, **sc.profiles[g.profile].model_dump())
            out.append(NodeSpec(name=f"{g.group}-{i}", group=g.group, profile=base.with_overrides(**fields),
                                remote=g.backend == "remote", engine=g.engine))
    return out


def _format_errors(path: str, err: ValidationError, doc: Any) -> str:
    lines = [f"{path}: {err.error_count()} error(s) in scenario"]
    for e in err.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"]).replace(".[", "[")
        msg = e["msg"].removeprefix("Value error, ")
        sub = re.match(r"(params(?:\.[\w.]+)?|@[\w.\[\]-]+): ", msg)  # a validator that checked a nested field names it
        if sub:
            loc, msg = ".".join(x for x in (loc, sub.group(1).lstrip("@")) if x), msg[sub.end():]
        got = f" (got {e['input']!r})" if e["type"] not in ("missing",) and not isinstance(e["input"], dict) else ""
        lines.append(f"  {path}: {loc or '<top>'}: {msg}{got}")
    return "\n".join(lines)


def parse(doc: Any, path: str = "<scenario>") -> Scenario:
    if not isinstance(doc, dict):
        raise ScenarioError(f"{path}: a scenario must be a YAML mapping, got {type(doc).__name__}")
    try:
        custom = doc.get("profiles")
        sc = Scenario.model_validate(doc, context={"profiles": set(custom) if isinstance(custom, dict) else set()})
    except ValidationError as err:
        raise ScenarioError(_format_errors(path, err, doc)) from None
    _read_model(sc, path)
    _read_data(sc, path)  # before the strategies' checks: the model's head needs the number of classes
    errors = sc.strategy_param_errors()
    if errors:
        raise ScenarioError("\n".join([f"{path}: {len(errors)} error(s) in scenario",
                                       *(f"  {path}: {e}" for e in errors)]))
    _read_traces(sc, path)
    return sc


def _read_traces(sc: Scenario, path: str) -> None:
    """Read every trace file now, against the scenario's nodes: a bad trace never starts a run."""
    from .linktrace import TraceError, load_availability, load_rate_trace
    nodes = expand_nodes(sc)
    av = sc.faults.availability
    reads = [("faults.availability.trace", av, "trace", lambda f: load_availability(f, {n.name for n in nodes}))]
    for i, g in enumerate(sc.nodes):
        tr = g.link_trace
        if tr is not None and tr.file is not None:
            members = [n.name for n in nodes if n.group == g.group]
            reads.append((f"nodes[{i}].link_trace.file", tr, "file",
                          lambda f, tr=tr, members=members: load_rate_trace(f, members, tr.end, tr.period_s)))
    for where, holder, attr, load in reads:
        if getattr(holder, attr) is None:
            continue
        setattr(holder, attr, beside(path, getattr(holder, attr)))
        try:
            load(getattr(holder, attr))
        except TraceError as exc:
            raise ScenarioError(f"{path}: {where}: {exc}") from None


COST_MODEL_FAMILIES = ("bert",)  # what testbed/costmodel.py walks analytically; others are measured (costmeasure)


def beside(scenario_path: str, value: str) -> str:
    """A path the scenario gives, relative to the scenario file's folder (as it is when absolute,
    or when the scenario did not come from a file)."""
    if Path(value).is_absolute() or scenario_path == "<scenario>":
        return value
    return str(Path(scenario_path).resolve().parent / value)


def _read_model(sc: Scenario, path: str) -> None:
    """Resolve a local checkpoint against the scenario file and check it now: its files, the
    task's head and the blocks every strategy addresses."""
    from node.arch import LayoutError
    from node.trainer import ModelError, check_checkpoint, checkpoint_layout
    m = sc.model
    if m.path is None:
        return
    m.path = beside(path, m.path)
    try:
        check_checkpoint(m.path)
        checkpoint_layout(m.path, m.task)
    except LayoutError as exc:
        raise ScenarioError(f"{path}: 1 error(s) in scenario\n  {path}: model.path: {exc}; every strategy addresses "
                            "the model's blocks") from None
    except (ModelError, OSError, ValueError) as exc:
        raise ScenarioError(f"{path}: 1 error(s) in scenario\n  {path}: model.path: {exc}") from None


def _read_data(sc: Scenario, path: str) -> None:
    """Resolve the data's paths against the scenario file and read the data now: a missing or
    unusable file never starts a run."""
    from node.data import DataError, load_dataset
    d = sc.data
    for key in ("path", "test_path"):
        if getattr(d, key) is not None:
            setattr(d, key, beside(path, getattr(d, key)))
    if sc.model.task == "causal_lm" and d.partition.kind != "iid":
        raise ScenarioError(f"{path}: 1 error(s) in scenario\n  {path}: data.partition.kind: causal_lm records have "
                            "no labels to skew by: use iid")
    try:
        load_dataset(d.source(sc.model.task))
    except DataError as exc:
        raise ScenarioError(f"{path}: 1 error(s) in scenario\n  {path}: {exc.field}: {exc.message}") from None
    except FileNotFoundError as exc:  # a built-in's package is missing
        raise ScenarioError(f"{path}: data.dataset: {exc}") from None


def set_value(doc: dict, dotted: str, raw: str) -> None:
    """Apply a `--set a.b.c=value` override; the value is parsed as YAML (numbers, lists)."""
    keys = dotted.split(".")
    cur = doc
    for k in keys[:-1]:
        if isinstance(cur, list) and k.isdigit() and int(k) < len(cur):
            cur = cur[int(k)]
            continue
        if not isinstance(cur, dict):
            raise ScenarioError(f"--set {dotted}: {k!r} is not inside a mapping")
        cur = cur.setdefault(k, {})
    last = keys[-1]
    value = yaml.safe_load(raw)
    if isinstance(cur, list) and last.isdigit() and int(last) < len(cur):
        cur[int(last)] = value
    elif isinstance(cur, dict):
        cur[last] = value
    else:
        raise ScenarioError(f"--set {dotted}: cannot set a field of a {type(cur).__name__}")


def load(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read scenario: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(f"{path}: not valid YAML: {where}{problem}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ScenarioError(f"--set {item!r}: expected key=value, e.g. training.rounds=5")
        key, raw = item.split("=", 1)
        if not isinstance(doc, dict):
            break
        set_value(doc, key.strip(), raw)
    return parse(doc, str(path))
