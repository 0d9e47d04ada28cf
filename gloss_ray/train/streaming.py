"""Training data through Ray Data (``--data-loader ray-data``; the default for corpora of
``--ray-data-min-docs`` training documents or more): a worker's memory does not grow with the corpus.

    gloss-ray train --train-file s3://BUCKET/corpus/train/ --validation-file s3://BUCKET/corpus/val.parquet \\
        --data-loader ray-data --workers 8 --gpu

On the driver (:func:`plan`): each split is read by Ray Data's own readers (:func:`gloss_ray.shards.read`:
a file, or a folder / ``s3://`` / ``gs://`` prefix of Parquet, CSV or JSON-lines shards); one pass
over the text and label columns counts the rows and classes and checks them (a missing column, an empty
file, a blank text or label, a label that training lacks, an unreachable URI: one line each, before any
worker starts); tokenisation is a ``map_batches`` on the cluster's CPUs. The datasets go to
``TorchTrainer(datasets=...)``; :class:`StreamingDataConfig` splits ``train`` into equal streaming
shards and the evaluation splits into disjoint ones. On each worker, :class:`StreamData` serves the
loop (:mod:`gloss_ray.train.loop`) the same things :class:`~gloss_ray.train.inputs.WorkerData` does.

What holds on this path:

* **The global batch** is the union of the ranks' batches of ``batch_size`` (``iter_torch_batches``
  of each rank's shard; the shards hold equal row counts, so every rank takes the same number of
  steps). G-Loss's graph spans the global batch, gathered as on the in-memory path, so one global
  batch gives the loss and gradients one worker would compute on it (tests/test_streaming.py).
* **Shuffling** is Ray Data's: the blocks (about a Parquet row group, or a CSV/JSON file's chunk)
  come in a seeded random order, then each rank shuffles within a buffer of ``--shuffle-buffer``
  documents (seeded by seed and epoch). Documents are mixed within that window, not across the whole
  corpus as the in-memory path's permutation mixes them; a corpus stored sorted by class needs a
  buffer large enough to hold several classes' runs, or files written in shuffled order.
* **Which rank gets which block** is decided as the data stream (Ray Data's ``streaming_split``), so
  the batches are not reproducible from the seed as the in-memory path's are.
* **Resume**: after an epoch checkpoint a run starts the next epoch afresh; after a step checkpoint
  (``--checkpoint-every``) each rank reads its shard of the interrupted epoch again and skips as many
  batches as were trained, so the epoch has its full number of steps -- but, the split being
  dynamic, the skipped documents are not exactly those trained before the interruption.
* **Evaluation** streams too: each rank encodes its disjoint part of validation / test in
  length-sorted batches (within windows of ``EVAL_WINDOW`` documents), and the predictions are
  gathered (for the test split with the embeddings that the silhouette and the plot use).
* **Not on this path** (a one-line error on the driver): ``--balanced-batches`` (its batches need every
  label up front), ``--label-fraction`` below 1, ``--global-k`` (the global graph still reads the corpus
  into memory), ``--graph-predict``, ``--max-train`` / ``--max-eval``, and ``.txt`` files (no labels).
  A missing validation file is carved out of the training stream: a seeded 10% chosen by a hash of
  each text (not stratified; duplicates of a text fall on one side).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .. import distributed as D
from ..config import TrainConfig
from ..data import VALIDATION_FRACTION, Corpus, _benchmark_paths, _user_paths, _vocabulary
from ..errors import ConfigError, DataError
from ..model import encode, load_tokenizer, token_budget_batches, unwrap
from ..storage import redact

DATA_CPUS = 0.5          # CPUs per Ray Data map task (tokenise, checks)
FREE_CPUS = 1.0          # CPUs the Train workers leave to Ray Data: its file listing and read tasks take
                         # one each (Ray's default); with less the stream stalls (seen: "1/0 CPU", no rows)
EVAL_WINDOW = 4096       # documents read at once on evaluation, sorted by length into encoding batches
TASK_ROWS = 1024         # rows per call of a Ray Data map (tokenise, checks): a task's memory is bounded by
                         # it (a whole 100k-row block per call held ~4.9 GB of tokenizer output in a task)
CALIBRATION_DOCS = 1024  # sigma's calibration sample, the same on every rank
EMPTY, NO_LABEL = "\0empty-text", "\0no-label"   # markers in the check pass's counts


@dataclass
class StreamPlan:
    """What the driver learnt about the corpus, for the workers: its name and classes, rows per
    split, training rows per class, the file or URI of each split, and the seconds its check pass took."""
    name: str
    label_names: list[str]
    rows: dict[str, int]
    class_counts: list[int]
    files: dict[str, str] = field(default_factory=dict)
    check_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- driver
def unsupported(cfg: TrainConfig) -> str | None:
    """The option that keeps ``cfg`` off the Ray Data path, as a sentence; None when it can stream."""
    reasons = (("--balanced-batches", cfg.balanced_batches), ("--label-fraction below 1", cfg.label_fraction < 1),
               ("--global-k", cfg.global_k > 0), ("--graph-predict", cfg.graph_predict),
               ("--max-train / --max-eval", bool(cfg.max_train or cfg.max_eval)),
               ("--hf-dataset", cfg.hf_dataset is not None))
    named = [name for name, on in reasons if on]
    return f"{', '.join(named)} not available with --data-loader ray-data" if named else None


def sources(cfg: TrainConfig) -> tuple[str, dict[str, str]]:
    """The corpus name and split -> file / folder / URI of a benchmark or of the user's files."""
    if cfg.benchmark:
        name, paths = _benchmark_paths(cfg.benchmark, cfg.data_dir)
    else:
        name, paths = _user_paths(cfg.train_file, cfg.validation_file, cfg.test_file)
    return name, {s: str(p) for s, p in paths.items()}


def count_train_rows(cfg: TrainConfig) -> int:
    """Training documents, for ``--data-loader auto``, without Ray and without parsing: the Parquet
    footers' row counts; the lines of CSV (less the header) and JSON-lines files, read as a byte
    stream -- an estimate where a quoted CSV text spans lines."""
    from ..shards import list_shards

    shards = list_shards(sources(cfg)[1]["train"])
    if shards.suffix == ".parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(shards.filesystem.open_input_file(p)).metadata.num_rows for p in shards.paths)
    rows = 0
    for path in shards.paths:
        with shards.filesystem.open_input_stream(path) as f:
            lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
        rows += max(0, lines - (shards.suffix == ".csv"))
    return rows


def plan(cfg: TrainConfig) -> tuple[StreamPlan, dict]:
    """Read, check and tokenise (lazily: Ray Data runs it as the workers consume it) every split.
    Returns the plan and the datasets for ``TorchTrainer(datasets=...)``: ``train``, ``validation``,
    ``test`` (when given) and ``calibration`` (a seeded sample of training documents)."""
    import ray.data

    from ..shards import columns_of_first, list_shards, read

    if (why := unsupported(cfg)) is not None:
        raise ConfigError(why)
    # the loop shows the training's progress; Ray Data's per-operator bars (one set per split and epoch,
    # redrawn on the driver's console) stay off, its logs under the session's logs/ray-data
    ray.data.DataContext.get_current().enable_progress_bars = False
    name, paths = sources(cfg)
    text, label = ("text", "label") if cfg.benchmark else (cfg.text_column, cfg.label_column)
    raw = {}
    for split, uri in paths.items():
        shards = list_shards(uri)
        if shards.suffix == ".txt":
            raise DataError(f"{redact(uri)}: a .txt file has no label column; use .parquet, .csv or .jsonl")
        have = columns_of_first(shards)
        for column, option in ((text, "--text-column"), (label, "--label-column")):
            if column not in have:
                raise DataError(f"{shards.name(shards.paths[0])}: column '{column}' not found "
                                f"(columns: {', '.join(map(str, have))}); use {option}")
        raw[split] = read(shards, [text, label], include_paths=False).select_columns([text, label])
    if "validation" not in raw:          # a seeded 10% of the training stream, by a hash of the text
        paths["validation"] = paths["train"]
        held = functools.partial(_held_out, text=text, seed=cfg.seed)
        raw["validation"] = raw["train"].map_batches(held, fn_kwargs={"keep": True}, batch_format="pandas",
                                                     batch_size=TASK_ROWS * 16, num_cpus=DATA_CPUS)
        raw["train"] = raw["train"].map_batches(held, fn_kwargs={"keep": False}, batch_format="pandas",
                                                batch_size=TASK_ROWS * 16, num_cpus=DATA_CPUS)
    t = time.perf_counter()
    counts = {split: _check(ds, redact(paths[split]), text, label) for split, ds in raw.items()}
    check_s = time.perf_counter() - t
    label_names = _vocabulary(pd.DataFrame({"label": list(counts["train"])}), redact(paths["train"]))
    for split in ("validation", "test"):
        unseen = sorted(set(counts.get(split, {})) - set(label_names))
        if unseen:
            more = f" and {len(unseen) - 1} other label(s)" if len(unseen) > 1 else ""
            raise DataError(f"{redact(paths[split])}: label '{unseen[0]}'{more} does not occur in the training split")
    ids = {n: i for i, n in enumerate(label_names)}
    tokenise = dict(fn=_tokenise, batch_format="pandas", batch_size=TASK_ROWS, num_cpus=DATA_CPUS,
                    fn_kwargs=dict(model=cfg.model, max_length=cfg.max_length, text=text, label=label, ids=ids))
    datasets = {split: ds.map_batches(**tokenise) for split, ds in raw.items()}
    datasets["train"] = datasets["train"].randomize_block_order(seed=cfg.seed)
    rows = {split: int(sum(c.values())) for split, c in counts.items()}
    fraction = min(1.0, 2.0 * CALIBRATION_DOCS / max(1, rows["train"]))
    sample = raw["train"].random_sample(fraction, seed=cfg.seed).limit(CALIBRATION_DOCS).to_pandas()
    tokens = _tokenise(sample, **tokenise["fn_kwargs"])
    datasets["calibration"] = ray.data.from_items([dict(zip(tokens, row)) for row in zip(*tokens.values())])
    stream = StreamPlan(name, label_names, rows, [int(counts["train"].get(n, 0)) for n in label_names],
                        {s: redact(p) for s, p in paths.items()}, check_s)
    return stream, datasets


def _held_out(batch: pd.DataFrame, text: str, seed: int, keep: bool) -> pd.DataFrame:
    """The rows of ``batch`` that belong to the carved-out validation split (``keep``) or the others:
    those whose text's CRC-32, salted with the seed, falls in the lowest 10%."""
    salt = f"{seed}:".encode()
    held = np.array([zlib.crc32(salt + str(t).encode("utf-8", "surrogatepass")) % 1000 < VALIDATION_FRACTION * 1000
                     for t in batch[text]], dtype=bool)
    return batch[held if keep else ~held]


def _count(batch: pd.DataFrame, text: str, label: str) -> pd.DataFrame:
    t, y = batch[text], batch[label]
    blank = lambda s: s.isna().to_numpy() | (s.astype(str).str.strip() == "").to_numpy()  # noqa: E731
    empty, missing = blank(t), blank(y)
    vc = y[~missing].astype(str).value_counts()
    return pd.DataFrame({"label": [*vc.index, EMPTY, NO_LABEL],
                         "count": [*vc.to_numpy(), int(empty.sum()), int(missing.sum())]})


def _check(ds, source: str, text: str, label: str) -> dict[str, int]:
    """One pass over a split's text and label columns: rows per label (as text), after checking that
    it has rows and no blank text or label."""
    from ..shards import gloss_error

    try:
        counted = ds.map_batches(_count, fn_kwargs={"text": text, "label": label}, batch_format="pandas",
                                 batch_size=TASK_ROWS * 16, num_cpus=DATA_CPUS).to_pandas()
    except Exception as exc:  # noqa: BLE001 - Ray wraps the reader's error; say it in one line
        if (err := gloss_error(exc)) is not None:
            raise err from None
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise DataError(f"{source}: cannot read: {redact(first)}") from exc
    totals = counted.groupby("label")["count"].sum().to_dict() if len(counted) else {}
    if empty := int(totals.pop(EMPTY, 0)):
        raise DataError(f"{source}: empty text in column '{text}' in {empty} row(s)")
    if missing := int(totals.pop(NO_LABEL, 0)):
        raise DataError(f"{source}: missing label in column '{label}' in {missing} row(s)")
    totals = {k: int(v) for k, v in totals.items() if v}
    if not totals:
        raise DataError(f"{source}: no data rows")
    return totals


@functools.lru_cache(maxsize=2)
def _tokenizer(model: str | None):
    return load_tokenizer(model)


def _tokenise(batch: pd.DataFrame, model: str | None, max_length: int, text: str, label: str, ids: dict) -> dict:
    """A batch of rows -> ``input_ids`` (int32, padded to ``max_length``), ``length`` (real tokens) and
    ``label`` (its id). Runs in Ray Data's tasks; the tokenizer loads once per process."""
    labels = batch[label].astype(str).map(ids)
    if labels.isna().any():         # the driver's check pass saw every label; a file changed since?
        raise DataError(f"label '{batch[label][labels.isna()].iloc[0]}' does not occur in the training split")
    enc = _tokenizer(model)(batch[text].astype(str).tolist(), truncation=True, max_length=max_length,
                            padding="max_length", return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int32), "length": enc["attention_mask"].sum(1).astype(np.int32),
            "label": labels.to_numpy(np.int64)}


def check_resources(cfg: TrainConfig) -> None:
    """Ray Data's tasks need CPUs the Train workers leave free, or the stream stalls."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    if cfg.workers * (cfg.cpus_per_worker or 1) > total - FREE_CPUS:
        raise ConfigError(f"--cpus-per-worker {cfg.cpus_per_worker:g} x {cfg.workers} worker(s) leaves less than "
                          f"{FREE_CPUS:g} of the cluster's {total:g} CPUs to Ray Data's read and tokenise tasks; "
                          + (f"give at most {(total - FREE_CPUS) / cfg.workers:g}" if total > FREE_CPUS
                             else "use --data-loader memory"))


def data_config():
    """Ray Train's ``DataConfig`` for this path (see :class:`StreamingDataConfig`)."""
    from ray.train import DataConfig

    class StreamingDataConfig(DataConfig):
        """``train`` split into equal streaming shards (every rank takes the same number of steps);
        ``validation`` / ``test`` into disjoint shards that together hold every row once (Ray Train's
        default would drop up to ``workers - 1`` rows to make them equal); ``calibration`` whole on
        every rank."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                if name == "calibration":
                    for i in range(world_size):
                        out[i][name] = ds.iterator()
                    continue
                for i, part in enumerate(ds.streaming_split(world_size, equal=name == "train",
                                                            locality_hints=worker_node_ids)):
                    out[i][name] = part
            return out

    return StreamingDataConfig()


# ---------------------------------------------------------------------------------------------- worker
def pad_batch(batch: dict) -> dict:
    """Ray Data's numpy batch -> the loop's tensors, cut to the batch's longest document."""
    length = torch.from_numpy(np.asarray(batch["length"], dtype=np.int64))
    width = int(length.max()) if len(length) else 0
    ids = torch.from_numpy(np.ascontiguousarray(batch["input_ids"][:, :width], dtype=np.int64))
    return {"input_ids": ids, "attention_mask": (torch.arange(width)[None, :] < length[:, None]).long(),
            "labels": torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))}


class StreamData:
    """A worker's view of the streamed corpus, with the interface the loop uses
    (:class:`~gloss_ray.train.inputs.WorkerData` is the in-memory one)."""

    def __init__(self, cfg: TrainConfig, stream: StreamPlan, shard):
        rank, world = D.rank_and_world()
        self.cfg, self.stream, self.shard, self.world = cfg, stream, shard, world
        self.corpus = Corpus(stream.name, stream.label_names, {}, stream.files)
        self.tokenizer = load_tokenizer(cfg.model)
        # tokenisation runs in Ray Data's tasks as the batches stream (its cost is in the training's
        # documents/s); what the run spent before its first batch is the driver's check pass
        self.tokenize_s = {"driver_check_pass": stream.check_s}
        self.eval_splits = [s for s in ("validation", "test") if s in stream.rows]
        per_rank = stream.rows["train"] // world
        self.steps_per_epoch = per_rank // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{stream.rows['train']} training examples are fewer than one global batch of "
                            f"{cfg.batch_size * world} (per-worker batch {cfg.batch_size} x {world} workers); "
                            "lower the batch size")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)

    @property
    def train_docs(self) -> int:
        return self.stream.rows["train"]

    @property
    def class_counts(self) -> np.ndarray:
        return np.asarray(self.stream.class_counts)

    def sizes(self) -> dict[str, int]:
        return dict(self.stream.rows)

    def batches(self, epoch: int, done: int = 0):
        """This rank's batches of epoch ``epoch``, after the first ``done`` (a step checkpoint's)."""
        it = self.shard("train").iter_torch_batches(
            batch_size=self.cfg.batch_size, collate_fn=pad_batch, drop_last=True,
            local_shuffle_buffer_size=self.cfg.shuffle_buffer or None,
            local_shuffle_seed=self.cfg.seed * 100_003 + epoch if self.cfg.shuffle_buffer else None)
        return itertools.islice(it, done, None)

    def outputs(self, model, split: str, device, embeddings: bool = True):
        """``(logits, embeddings or None, labels)`` of every document of ``split`` (``validation``,
        ``test``; ``train`` is not served here), gathered from all ranks on every rank: each rank
        encodes its shard in windows of :data:`EVAL_WINDOW` documents, length-sorted into batches."""
        logits, embs, labels = [], [], []
        for window in self.shard(split).iter_batches(batch_size=EVAL_WINDOW, batch_format="numpy"):
            lo, em = self._encode(model, window, device)
            logits.append(lo.numpy())
            embs.append(em.numpy() if embeddings else None)
            labels.append(np.asarray(window["label"], dtype=np.int64))
        net = unwrap(model)
        mine = (_cat(logits, net.num_classes), _cat(embs, net.encoder.config.hidden_size) if embeddings else None,
                np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64))
        parts = D.gather_objects(mine)
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]) if embeddings else None,
                np.concatenate([p[2] for p in parts]))

    def calibration_sample(self, model, device, seed: int, n: int = CALIBRATION_DOCS):
        """Sigma's calibration sample: the driver's seeded sample of training documents, whole on every
        rank (``seed`` was the driver's)."""
        batch = next(iter(self.shard("calibration").iter_batches(batch_size=n, batch_format="numpy")))
        return self._encode(model, batch, device)[1].double(), torch.as_tensor(np.asarray(batch["label"]))

    def _encode(self, model, window: dict, device):
        """``(logits, embeddings)`` of a numpy batch of tokenised rows, in its order, encoded in
        length-sorted batches of at most ``eval_batch_size x max_length`` padded tokens."""
        length, ids = np.asarray(window["length"]), np.asarray(window["input_ids"])
        batches = []
        for rows in token_budget_batches(length, self.cfg.eval_batch_size * self.cfg.max_length):
            rows = np.asarray(rows)
            width = int(length[rows].max())
            batches.append({"input_ids": torch.from_numpy(ids[rows, :width].astype(np.int64)),
                            "attention_mask": torch.from_numpy((np.arange(width)[None, :] < length[rows, None])
                                                               .astype(np.int64)),
                            "position": torch.from_numpy(rows)})
        return encode(model, batches, device, rows=len(length))


def _cat(parts: list, width: int) -> np.ndarray:
    parts = [p for p in parts if p is not None and len(p)]
    return np.concatenate(parts) if parts else np.zeros((0, width), dtype=np.float32)
