"""What a run keeps on disk: its folder, `rounds.jsonl`, the manifest and the checkpoint.

Each finished round is checkpointed (fsync, atomic rename) and then appended to rounds.jsonl
(flushed), so `run --resume DIR` continues from the last finished round and a crash never
loses one. The checkpoint is plain data only (numbers, strings, lists, dicts, numpy arrays):
the strategy's `state_dict()`, the global model and the faults in force, read back by an
unpickler that imports none of the testbed's classes, so refactoring a class never breaks
the resume of an older run folder. Checkpoints of the first format (version 1, which pickled
the strategy object itself) are read by mapping every class in them to a stand-in holding
its fields, and converted.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT = "checkpoint.pkl"
CHECKPOINT_VERSION = 2
READS = (1, 2)


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything a resumed run needs to go on after one finished round."""
    scenario: dict                   # the scenario as validated (model_dump), to refuse another one
    run_id: str
    strategy_index: int
    strategy: str
    round: int
    elapsed: float                   # emulated seconds the strategy has used
    done: bool                       # the strategy ran its last round
    state: dict[str, np.ndarray]     # the global model's trainable tensors
    strategy_state: dict             # Strategy.state_dict()
    row: dict                        # this round's rounds.jsonl row
    stopped: dict = field(default_factory=dict)
    restarts: list = field(default_factory=list)
    faults: dict = field(default_factory=dict)  # faults.Injector.snapshot()
    strategy_params: dict = field(default_factory=dict)  # strategy name -> its parameters as resolved then
    version: int = CHECKPOINT_VERSION


# -- reading checkpoints ----------------------------------------------------------------------
_NUMPY = {("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"), ("numpy", "dtype"),
          ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
          ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"), ("numpy", "ndarray")}
_BUILTINS = {"set", "frozenset", "complex", "bytearray"}


class _StandIn:
    """Whatever class an old checkpoint names: it keeps the object's pickled fields, nothing runs."""
    _pickled_as = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state


def _stand_in(module: str, name: str) -> type:
    return type(name, (_StandIn,), {"_pickled_as": f"{module}.{name}"})


class _Unpickler(pickle.Unpickler):
    """numpy arrays and builtins only; with `legacy`, any other class becomes a stand-in."""

    def __init__(self, fh, legacy: bool):
        super().__init__(fh)
        self.legacy = legacy

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY or (module == "builtins" and name in _BUILTINS):
            return super().find_class(module, name)
        if self.legacy:
            return _stand_in(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}: a checkpoint holds plain data only")


def _fields(obj: Any) -> Any:
    """A stand-in's pickled fields (recursively), as plain data."""
    if isinstance(obj, _StandIn):
        state = obj.__dict__.get("_state")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict) and "__dict__" in state:  # pydantic models
            state = state["__dict__"]
        return _fields(state if state is not None else {})
    if isinstance(obj, dict):
        return {k: _fields(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_fields(v) for v in obj]
    return obj


# what a version-1 strategy object kept that its state_dict() now holds: old field -> new key
_LEGACY_STRATEGY_FIELDS = {"speed": "speed", "bw_up": "bw_up", "bw_down": "bw_down",  # legend
                           "prune_cap": "prune_cap",                                   # hetlora
                           "_upload": "upload", "max_share": "max_share"}            # caff


def _from_version_1(ck: dict) -> Checkpoint:
    old = _fields(ck["strategy_object"])
    strategy_state = {new: old[key] for key, new in _LEGACY_STRATEGY_FIELDS.items() if key in old}
    params = {ck["strategy"]: old["p"]} if isinstance(old.get("p"), dict) else {}  # only the running one's
    return Checkpoint(scenario=ck["scenario"], run_id=ck["run_id"], strategy_index=ck["strategy_index"],
                      strategy=ck["strategy"], round=ck["round"], elapsed=ck["elapsed"], done=ck["done"],
                      state=ck["state"], strategy_state=strategy_state, row=ck["row"], stopped=ck["stopped"],
                      restarts=ck["restarts"], faults=_fields(ck["faults"]), strategy_params=params, version=1)


def differences(then, now, at: str = "") -> list[str]:
    """Where two scenario dumps differ: "a.b.c: then -> now", field by field."""
    if isinstance(then, dict) and isinstance(now, dict):
        return [d for k in sorted({*then, *now}, key=str)
                for d in differences(then.get(k, "(none)"), now.get(k, "(none)"), f"{at}.{k}" if at else str(k))]
    return [] if then == now else [f"{at}: {then} -> {now}"]


def params_changed(then: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """How this version resolves the strategies' parameters differently from the version that
    began a run: "strategy: field: then -> now" (a field that version did not have: "(none)")."""
    out = []
    for name, old in then.items():
        for key, value in (now.get(name) or {}).items():
            if old.get(key, "(none)") != value:
                out.append(f"{name}: {key}: {old.get(key, '(none)')} -> {value}")
    return out


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in `path`, whichever format this testbed wrote it in (RunError if none)."""
    try:
        with open(path, "rb") as fh:
            head = _Unpickler(fh, legacy=True).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise RunError(f"{path}: not a checkpoint this testbed can read ({type(exc).__name__}: {exc})") from None
    version = head.get("version") if isinstance(head, dict) else None
    if version not in READS:
        raise RunError(f"{path}: checkpoint version {version}; this testbed reads versions "
                       f"{', '.join(map(str, READS))}")
    if version == 1:
        try:
            return _from_version_1(head)
        except (KeyError, TypeError, AttributeError) as exc:
            raise RunError(f"{path}: a version-1 checkpoint without its {exc} field") from None
    with open(path, "rb") as fh:  # the current format: plain data, no stand-ins allowed
        try:
            d = _Unpickler(fh, legacy=False).load()
            return Checkpoint(**d)
        except (pickle.UnpicklingError, TypeError) as exc:
            raise RunError(f"{path}: a damaged version-{version} checkpoint ({exc})") from None


ASYNC_STEPS = "async-steps"  # an asynchronous strategy's steps until it ends (testbed/asyncloop.py)


def write_checkpoint(path: Path, ck: Checkpoint) -> None:
    """Atomic and on disk (fsync) before the round is appended to rounds.jsonl."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(asdict(ck), fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


# -- the run folder ---------------------------------------------------------------------------
class RunStore:
    """The run folder: rounds as they finish, the manifest, the checkpoint."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.rows: list[dict] = []
        self.resumed: list[dict] = []  # every earlier attempt this run continues

    def create(self) -> None:
        """A new run: the folder must not hold results already (nothing is ever overwritten)."""
        self.out.mkdir(parents=True, exist_ok=True)
        existing = [f for f in ("rounds.jsonl", "summary.json") if (self.out / f).exists()]
        if existing:
            raise RunError(f"{self.out} already holds results ({', '.join(existing)}); "
                           "choose another --out so nothing is overwritten")

    def resume(self, scenario: dict, strategy_order: list[str], run_id: str,
               normalize=lambda d: d, check=lambda ck: None) -> tuple[Checkpoint, str | None]:
        """Continue an interrupted run: its checkpoint, and the old run id (for cleaning up after
        it). rounds.jsonl is cut back to the checkpoint: a round written after it is redone, one
        checkpointed but not yet written is added. `normalize` reads the scenario the run started
        with as this version does (fields added since take their defaults); `check` may refuse
        the checkpoint (RunError) before anything in the folder changes."""
        manifest = self._manifest_to_resume()
        ck_path = self.out / CHECKPOINT
        if not ck_path.is_file():
            raise RunError(f"{self.out}: no {CHECKPOINT}, nothing to resume (no round had finished, "
                           "or this is not a run folder)")
        ck = read_checkpoint(ck_path)
        try:
            started = normalize(ck.scenario)
        except ValueError as exc:
            raise RunError(f"{ck_path}: the scenario this run started with no longer validates: {exc}") from None
        if started != scenario:
            diff = "; ".join(differences(started, scenario)[:6])
            raise RunError(f"{self.out}: the scenario differs from the one this run started with ({diff}); resume "
                           "with the same file and --set options")
        check(ck)
        order = {name: i for i, name in enumerate(strategy_order)}
        upto = (ck.strategy_index, ck.round)
        rows = [r for r in self._read_rows() if (order.get(r.get("strategy"), 1 << 30), r.get("round", 0)) <= upto]
        if not any(r["strategy"] == ck.strategy and r["round"] == ck.round for r in rows):
            rows.append(ck.row)
        tmp = self.out / ".rounds.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(self.out / "rounds.jsonl")
        self.rows = rows
        old = manifest.get("run_id")
        self.resumed = [*manifest.get("resumed", []),
                        {"from_run_id": old, "strategy": ck.strategy, "round": ck.round,
                         "strategy_finished": ck.done, "run_id": run_id, "checkpoint_version": ck.version,
                         "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}]
        return ck, old

    def _manifest_to_resume(self) -> dict:
        try:
            manifest = json.loads((self.out / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise RunError(f"{self.out / 'manifest.json'}: cannot read it to resume: {exc}") from None
        if manifest.get("status") == "finished":
            raise RunError(f"{self.out}: this run finished; nothing to resume")
        return manifest

    def _read_rows(self) -> list[dict]:
        try:
            lines = (self.out / "rounds.jsonl").read_text().splitlines()
        except OSError:
            return []
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:  # the last line, cut short by the crash
                continue
        return rows

    def append_row(self, row: dict) -> None:
        with open(self.out / "rounds.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.append(row)

    def write_json(self, name: str, obj) -> None:
        tmp = self.out / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        tmp.replace(self.out / name)

    def save_checkpoint(self, ck: Checkpoint) -> None:
        write_checkpoint(self.out / CHECKPOINT, ck)

    # -- an asynchronous strategy's steps (testbed/asyncloop.py) ---------------------------------
    def _steps(self, index: int, strategy: str) -> list[Path]:
        return sorted((self.out / ASYNC_STEPS).glob(f"{index:02d}-{strategy}-*.pkl"))

    def save_async_step(self, index: int, strategy: str, version: int, step: dict) -> None:
        """One aggregation step, plain data (its row before evaluation, the model, what the
        strategy and the faults hold), atomic and on disk: a resume goes on from the last one."""
        folder = self.out / ASYNC_STEPS
        folder.mkdir(exist_ok=True)
        path = folder / f"{index:02d}-{strategy}-{version:07d}.pkl"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(step, fh, protocol=pickle.HIGHEST_PROTOCOL)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)

    def async_steps(self, index: int, strategy: str) -> list[dict]:
        """The saved steps of an asynchronous strategy that has not ended, in order."""
        out = []
        for path in self._steps(index, strategy):
            try:
                with open(path, "rb") as fh:
                    out.append(_Unpickler(fh, legacy=False).load())
            except (OSError, pickle.UnpicklingError, EOFError) as exc:
                raise RunError(f"{path}: a damaged step of {strategy} ({exc}); remove it to resume "
                               "from the step before") from None
        return out

    def drop_async_steps(self, index: int, strategy: str) -> None:
        for path in self._steps(index, strategy):
            path.unlink(missing_ok=True)
        folder = self.out / ASYNC_STEPS
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    def drop_checkpoint(self) -> None:
        """A finished run has nothing to resume (and a full model's checkpoint is large)."""
        (self.out / CHECKPOINT).unlink(missing_ok=True)

    def host_peak(self) -> tuple[float | None, int]:
        """The host's peak memory in use over the rounds so far, and its OOM kills."""
        hosts = [r["host"] for r in self.rows if r.get("host")]
        return (max((h["peak_used_mb"] for h in hosts), default=None),
                sum(h.get("oom_kills") or 0 for h in hosts))
