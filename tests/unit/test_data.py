"""Data: the built-in multi-class corpora, the user's own files through `datasets`, the same
split and shards every time, and a fingerprint that tells two copies apart."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from node.data import DataError, DataSource, load_dataset
from testbed import partition

datasets = pytest.importorskip("datasets")


@pytest.mark.parametrize("name, classes, train, test", [("20newsgroups", 20, 11_000, 7_000),
                                                         ("reuters_r8", 8, 5_000, 2_000),
                                                         ("reuters_r52", 52, 6_000, 2_000)])
def test_the_built_in_corpora_come_with_their_own_test_sets(name, classes, train, test):
    ds = load_dataset(name)
    assert len(ds.classes) == classes and ds.classes == tuple(sorted(ds.classes))
    assert ds.test_start > train and len(ds) - ds.test_start > test
    assert set(ds.labels) == set(range(classes)) and all(t.strip() for t in ds.texts[:100])


ROWS = [("a gripping, funny film", "pos"), ("dull and far too long", "neg"), ("a small wonder", "pos"),
        ("nothing works here", "neg"), ("sharp and kind", "pos"), ("tedious", "neg")] * 10


def _csv(path, rows, text="text", label="label"):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([text, label])
        w.writerows(rows)
    return path


def test_csv_jsonl_parquet_and_a_saved_folder_give_the_same_examples(tmp_path):
    _csv(tmp_path / "d.csv", ROWS)
    with open(tmp_path / "d.jsonl", "w") as fh:
        for t, y in ROWS:
            fh.write(json.dumps({"review": t, "stars": y}) + "\n")
    table = datasets.Dataset.from_dict({"text": [t for t, _ in ROWS], "label": [y for _, y in ROWS]})
    table.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": table.select(range(48)), "test": table.select(range(48, 60))}).save_to_disk(
        str(tmp_path / "saved"))
    got = {s: load_dataset(s) for s in (DataSource(path=str(tmp_path / "d.csv")),
                                         DataSource(path=str(tmp_path / "d.jsonl"), text_column="review",
                                                    label_column="stars"),
                                         DataSource(path=str(tmp_path / "d.parquet")),
                                         DataSource(path=str(tmp_path / "saved"), test_split="test"))}
    for ds in got.values():
        # string labels: 0..K-1 in sorted order, whatever the file's order
        assert ds.classes == ("neg", "pos") and ds.labels[:2] == (1, 0) and ds.texts[1] == "dull and far too long"
        assert len({d.fingerprint for d in got.values()}) == 1  # the same examples, the same fingerprint
    saved = got[DataSource(path=str(tmp_path / "saved"), test_split="test")]
    assert saved.test_start == 48 and len(saved) == 60
    assert not list(tmp_path.glob("**/*.lock")), "the loader's cache goes with it"


def test_integer_labels_and_a_test_file(tmp_path):
    _csv(tmp_path / "train.csv", [(t, int(y == "pos") + 3) for t, y in ROWS])
    _csv(tmp_path / "test.csv", [(t, int(y == "pos") + 3) for t, y in ROWS[:6]])
    ds = load_dataset(DataSource(path=str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv")))
    assert ds.classes == ("3", "4") and set(ds.labels) == {0, 1} and ds.test_start == 60 and len(ds) == 66


def test_a_file_is_split_and_sharded_identically_twice(tmp_path):
    """Two loads of the same CSV (fresh caches) and the same seed: the same held-out set and shards."""
    _csv(tmp_path / "d.csv", ROWS)
    first = load_dataset(DataSource(path=str(tmp_path / "d.csv")))
    load_dataset.cache_clear()
    second = load_dataset(DataSource(path=str(tmp_path / "d.csv")))
    assert first is not second and first == second and first.fingerprint == second.fingerprint

    def split(ds):
        train, test = partition.train_test_split(len(ds), 12, None, seed=5, test_start=ds.test_start)
        return train, test, partition.dirichlet(np.asarray(ds.labels)[train], 4, 0.5, 5, 2)
    (a_train, a_test, a_parts), (b_train, b_test, b_parts) = split(first), split(second)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_test, b_test)
    assert all(np.array_equal(x, y) for x, y in zip(a_parts, b_parts))
    assert len(a_test) == 12 and not set(a_train) & set(a_test)


def test_a_datasets_own_test_set_is_sampled_not_cut_from_the_training_examples():
    train, test = partition.train_test_split(100, 10, None, seed=1, test_start=80)
    assert len(test) == 10 and test.min() >= 80 and set(train) == set(range(80))
    _, all_of_it = partition.train_test_split(100, 50, None, seed=1, test_start=80)
    assert list(all_of_it) == list(range(80, 100))  # fewer than test_size: all of them


def test_another_copy_of_the_data_has_another_fingerprint(tmp_path):
    _csv(tmp_path / "a.csv", ROWS)
    _csv(tmp_path / "b.csv", ROWS[:-1] + [("tedious!", "neg")])
    a, b = (load_dataset(DataSource(path=str(tmp_path / f))) for f in ("a.csv", "b.csv"))
    assert a.fingerprint != b.fingerprint


@pytest.mark.parametrize("rows, match", [([("fine", 1.5), ("bad", 0.5)], "a label must be a string or an integer"),
                                         ([("fine", "1"), ("", "0")], "row 1 of data.path: empty or not text")])
def test_bad_rows_are_refused_with_their_field(tmp_path, rows, match):
    if isinstance(rows[0][1], float):
        pq = tmp_path / "d.parquet"
        datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}).to_parquet(str(pq))
        src = DataSource(path=str(pq))
    else:
        src = DataSource(path=str(_csv(tmp_path / "d.csv", rows)))
    with pytest.raises(DataError, match=match):
        load_dataset(src)


def test_a_source_names_one_place():
    with pytest.raises(DataError, match="either dataset .* or path"):
        DataSource(dataset="rotten_tomatoes", path="x.csv")
    with pytest.raises(DataError, match="belong to a dataset given by path"):
        DataSource(test_split="test")
    assert DataSource().dataset == "rotten_tomatoes"
    assert DataSource.from_dict(DataSource(path="x.csv").to_dict()) == DataSource(path="x.csv")


def test_instruction_records_for_causal_lm(tmp_path):
    from node.data import InstructionSet
    with open(tmp_path / "sft.jsonl", "w") as fh:
        for i in range(8):
            fh.write(json.dumps({"instruction": f"add {i} and 1", "output": str(i + 1)}) + "\n")
    src = DataSource(path=str(tmp_path / "sft.jsonl"), task="causal_lm", prompt_column="instruction",
                     response_column="output")
    ds = load_dataset(src)
    assert isinstance(ds, InstructionSet) and len(ds) == 8 and ds.prompts[2] == "add 2 and 1" and ds.responses[2] == "3"
    with pytest.raises(DataError, match="data.response_column: no column 'response'"):
        load_dataset(DataSource(path=str(tmp_path / "sft.jsonl"), task="causal_lm", prompt_column="instruction"))
    with open(tmp_path / "gap.jsonl", "w") as fh:
        fh.write(json.dumps({"prompt": "say hi", "response": "hi"}) + "\n" + json.dumps({"prompt": "x", "response": ""}))
    with pytest.raises(DataError, match="row 1 of data.path: empty"):
        load_dataset(DataSource(path=str(tmp_path / "gap.jsonl"), task="causal_lm"))
    with pytest.raises(DataError, match="causal_lm needs your own records"):
        DataSource(task="causal_lm")
