"""A worker's data on the in-memory path (``--data-loader memory``): the corpus tokenised (cached per
node), the low-label subset, the sampler of global batches, and a loader per split. Every rank builds
the same thing; the sampler hands each rank its slice of every global batch. The loop reads it
through ``sizes``, ``batches``, ``outputs`` and ``calibration_sample``, as it reads the Ray Data path's
:class:`~gloss_ray.train.streaming.StreamData`."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from .. import distributed as D
from ..config import TrainConfig
from ..data import GlobalBatchSampler, PadCollator, load_corpus, tokenize_split
from ..model import LengthBatches, encode, load_tokenizer


@dataclass
class WorkerData:
    corpus: object                      # gloss_ray.data.Corpus
    tokenizer: object
    collate: PadCollator
    full_train: object                  # every training document (the global graph's corpus)
    train: object                       # the documents trained on (the known-label subset)
    train_labels: np.ndarray
    known_labels: np.ndarray            # per training document, -1 where the label is hidden
    true_labels: np.ndarray
    eval_sets: dict                     # split -> dataset
    sampler: GlobalBatchSampler
    loader: DataLoader
    total_steps: int
    tokenize_s: dict = field(default_factory=dict)
    eval_batch_size: int = 64
    max_length: int = 128

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    @property
    def train_docs(self) -> int:
        return len(self.train)

    @property
    def eval_splits(self) -> list[str]:
        return list(self.eval_sets)

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.train_labels, minlength=self.corpus.num_classes)

    def sizes(self) -> dict[str, int]:
        """Documents per split (``train``: those trained on)."""
        return {"train": len(self.train), **{k: len(v) for k, v in self.eval_sets.items()}}

    def batches(self, epoch: int, done: int = 0) -> DataLoader:
        """This rank's batches of epoch ``epoch``, after the first ``done`` (a step checkpoint's)."""
        self.sampler.set_epoch(epoch, done)
        return self.loader

    def outputs(self, model, split: str, device, embeddings: bool = True):
        """``(logits, embeddings or None, labels)`` of every document of ``split`` (``train``: the
        documents trained on; ``validation``, ``test``), in order, on every rank: each rank encodes a
        contiguous shard, the parts are gathered."""
        ds = self.train if split == "train" else self.eval_sets[split]
        rank, world = D.rank_and_world()
        logits, emb = encode(model, self.loader_for(ds, D.shard_indices(len(ds), world, rank)), device)
        parts = D.gather_objects((logits.numpy(), emb.numpy() if embeddings else None))
        labels = np.asarray(self.train_labels if split == "train" else ds["label"])
        return (np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]) if embeddings else None, labels)

    def calibration_sample(self, model, device, seed: int, n: int = 1024):
        """Sigma's calibration sample: ``(embeddings, labels)`` of a seeded ``n`` training documents,
        the same on every rank."""
        rows = np.random.default_rng(seed).permutation(len(self.train))[:n].tolist()
        emb = encode(model, self.loader_for(self.train, rows), device)[1].double()
        return emb, torch.tensor(self.train.select(rows)["label"])

    @property
    def encode_tokens(self) -> int:
        """The token budget of an encoding batch: ``eval_batch_size`` documents of the longest length."""
        return self.eval_batch_size * self.max_length

    def loader_for(self, dataset, rows=None) -> DataLoader:
        """Batches of ``dataset`` (or of its ``rows``) for :func:`~gloss_ray.model.encode`: length-sorted
        within a budget of :attr:`encode_tokens` padded tokens (:class:`~gloss_ray.model.LengthBatches`),
        each with the ``position`` of its documents, where ``encode`` puts their outputs back in order."""
        part = PositionedRows(dataset if rows is None else dataset.select(list(rows)))
        return DataLoader(part, batch_sampler=LengthBatches(part.lengths(), self.encode_tokens),
                          collate_fn=self.collate_positioned)

    def collate_positioned(self, features) -> dict:
        batch = self.collate(features)
        batch["position"] = torch.tensor([f["position"] for f in features], dtype=torch.long)
        return batch


class PositionedRows(TorchDataset):
    """A tokenised dataset's rows as ``{input_ids, attention_mask, position}`` (its row number), read a
    batch at a time."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def lengths(self) -> np.ndarray:
        """Tokens per row, read from the Arrow column without building Python lists."""
        import pyarrow.compute as pc

        column = self.dataset.with_format("arrow")["input_ids"]
        return pc.list_value_length(column).to_numpy(zero_copy_only=False)

    def __getitems__(self, positions: list[int]) -> list[dict]:
        cols = self.dataset[positions]
        return [{"input_ids": i, "attention_mask": m, "position": p}
                for i, m, p in zip(cols["input_ids"], cols["attention_mask"], positions)]

    def __getitem__(self, position: int) -> dict:
        return self.__getitems__([position])[0]


def known_label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the training documents whose labels stay known (stratified, >= 1 per class)."""
    rng = np.random.default_rng(seed + 7919)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.extend(rng.permutation(idx)[: max(1, round(len(idx) * fraction))])
    return np.sort(np.asarray(keep))


def _default_cache() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "gloss_ray", "tokens")


def _tokenised(corpus, split, tokenizer, cfg, log):
    frame = corpus.splits[split]
    key = f"{corpus.fingerprint(split)}:{split}"
    ds = tokenize_split(frame["text"].tolist(), tokenizer, cfg.max_length, cfg.cache_dir or _default_cache(), key, log)
    fp = f"{key}:{cfg.max_length}".encode().hex()[-60:]  # explicit fingerprints: no hashing of Arrow internals
    ds = ds.add_column("label", frame["label"].astype(int).tolist(), new_fingerprint=fp + "l")
    return ds.add_column("index", list(range(len(frame))), new_fingerprint=fp + "i")


def _corpus(cfg: TrainConfig):
    limits = {k: v for k, v in (("train", cfg.max_train), ("validation", cfg.max_eval), ("test", cfg.max_eval)) if v}
    return load_corpus(cfg.benchmark, data_dir=cfg.data_dir, train_file=cfg.train_file,
                       validation_file=cfg.validation_file, test_file=cfg.test_file, text_column=cfg.text_column,
                       label_column=cfg.label_column, hf_dataset=cfg.hf_dataset, max_samples=limits or None,
                       seed=cfg.seed)


def load_worker_data(cfg: TrainConfig, rank: int, world: int, log) -> WorkerData:
    corpus = _corpus(cfg)
    tokenizer = load_tokenizer(cfg.model)
    tok_s, sets = {}, {}
    for split in ("train", "validation", "test"):   # seconds to tokenise (or read from the cache), this rank
        if split in corpus.splits:
            t = time.perf_counter()
            sets[split] = _tokenised(corpus, split, tokenizer, cfg, log)
            tok_s[split] = time.perf_counter() - t
    log("tokenisation: " + ", ".join(f"{k} {v:.1f}s" for k, v in tok_s.items()))
    full_train = train = sets.pop("train")
    true_labels = train_labels = np.asarray(full_train["label"])
    known_labels = true_labels.copy()
    if cfg.label_fraction < 1.0:
        known = known_label_subset(train_labels, cfg.label_fraction, cfg.seed)
        train, train_labels = full_train.select(known.tolist()), train_labels[known]
        known_labels[np.setdiff1d(np.arange(len(known_labels)), known)] = -1
        log(f"low-label setting: {len(known)} of {len(corpus.splits['train'])} training labels known")
    collate = PadCollator(tokenizer.pad_token_id)
    sampler = GlobalBatchSampler(train_labels.tolist(), cfg.batch_size, world, rank, seed=cfg.seed,
                                 balanced=cfg.balanced_batches)
    total_steps = len(sampler) * cfg.epochs
    if cfg.max_steps:                 # a bounded run (e.g. on a large corpus): the schedules end there
        total_steps = min(total_steps, cfg.max_steps)
    # The loader's own generator: each new iterator (one per epoch) draws a base seed from it, which
    # would otherwise come from the global torch stream that dropout uses -- and a run resumed from a
    # step checkpoint starts its iterator after that stream's restored state, not before it.
    loader = DataLoader(train, batch_sampler=sampler, collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed))
    return WorkerData(corpus, tokenizer, collate, full_train, train, train_labels, known_labels, true_labels, sets,
                      sampler, loader, total_steps, tok_s,
                      eval_batch_size=cfg.eval_batch_size, max_length=cfg.max_length)
