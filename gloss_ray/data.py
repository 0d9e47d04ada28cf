"""Corpora, label vocabulary, tokenisation cache and batching.

* :func:`load_corpus` reads a benchmark (``<data_dir>/<name>/{train,validation,test}.parquet``),
  user files (CSV / JSON lines / Parquet) or a Hugging Face hub dataset into a :class:`Corpus`:
  texts plus integer label ids into one vocabulary, the sorted class names of the training split.
* :func:`find_benchmark` says which data folder holds a benchmark: ``data_dir``, ``$GLOSS_RAY_DATA``,
  ``./data``, then the user cache (:func:`cache_dir`). It never downloads: a benchmark in none of them
  is an error naming them; ``gloss-ray data download`` (:mod:`gloss_ray.download`) fetches it, as
  ``gloss-ray train`` / ``bench`` / ``tune`` do on the driver before they start.
* :func:`read_texts` reads the texts of one file for ``gloss-ray predict`` / ``embed``, through the
  same reader (:func:`_read_file`) and checks as a training split.
* :func:`tokenize_split` tokenises a list of texts once and caches the result on disk as an
  Arrow dataset, keyed by the tokenizer, ``max_length`` and the caller's key.
* :class:`PadCollator` pads a batch to its longest sequence (dynamic padding).
* :class:`GlobalBatchSampler` cuts one seeded ordering per epoch into *global* batches and hands
  each Ray worker its slice, so N workers x B/N examples see exactly the batches 1 worker x B sees.

Every problem with the input data raises :class:`~gloss_ray.errors.DataError` with a one-line
message naming the file, the row (1-based data row, header not counted), column, label or option.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch


from .errors import DataError
from .log import say
from .options import BENCHMARKS, SPLITS
from .storage import file_info, is_file, is_uri, join, object_fingerprint, open_input

DATA_ENV = "GLOSS_RAY_DATA"            # a folder holding <name>/{train,validation,test}.parquet
CACHE_ENV = "GLOSS_RAY_CACHE"          # gloss_ray's cache root; data lives in <root>/data

VALIDATION_FRACTION = 0.1  # share of train carved out when no validation split is given
_HUB_VALIDATION_NAMES = ("validation", "val", "dev")
_MAX_ROWS_LISTED = 5  # rows named in an error message


# --------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """A labelled text corpus.

    ``splits[s]`` is a DataFrame with columns ``text`` (str) and ``label`` (int id into
    ``label_names``); a split with no source (e.g. no test file) is absent. ``files[s]`` is the
    file or hub id the split came from (a carved-out validation split names the train source).
    """

    name: str
    label_names: list[str]
    splits: dict[str, pd.DataFrame]
    files: dict[str, str]
    _fingerprints: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        """Number of classes in the vocabulary."""
        return len(self.label_names)

    def fingerprint(self, split: str) -> str:
        """sha256 of the split's source file bytes (of ``hub id + split`` for hub data; of the URI,
        size and modification time for a file on object storage, see
        :func:`~gloss_ray.storage.object_fingerprint`).

        Meant as part of a cache key. It identifies the *source*, not the rows kept from it
        (carve-out, ``max_samples``); :func:`tokenize_split` also hashes the texts themselves.
        """
        if split not in self.files:
            raise DataError(f"corpus '{self.name}': no split '{split}' (has: {', '.join(self.files)})")
        if split not in self._fingerprints:
            source = self.files[split]
            digest = hashlib.sha256()
            if is_uri(source):  # s3:// or gs://: uri, size and mtime, one metadata request (no download)
                digest.update(object_fingerprint(source).encode())
            elif Path(source).is_file():
                with open(source, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
            else:  # hub dataset id
                digest.update(f"{source}\n{split}".encode())
            self._fingerprints[split] = digest.hexdigest()
        return self._fingerprints[split]


def _rows(mask: np.ndarray) -> str:
    """'3, 7, 9 (and 4 more)': the first few 1-based data rows where ``mask`` is True."""
    rows = (np.flatnonzero(mask) + 1).tolist()
    text = ", ".join(map(str, rows[:_MAX_ROWS_LISTED]))
    return text + (f" (and {len(rows) - _MAX_ROWS_LISTED} more)" if len(rows) > _MAX_ROWS_LISTED else "")


def _one_line(exc: BaseException) -> str:
    """An exception message squeezed onto one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


READERS = {".txt": "text", ".csv": "CSV", ".jsonl": "JSON", ".json": "JSON", ".parquet": "Parquet"}
"""File suffix -> format of the files gloss-ray reads (training data, ``predict`` / ``embed`` input)."""


def _read_file(path: str | Path) -> pd.DataFrame:
    """Read a text / CSV / JSON lines / Parquet file chosen by suffix: the one reader of data files
    (training splits and ``predict`` / ``embed`` input alike). CSV cells are read as strings; a
    ``.txt`` file is one text per line, in a column ``text``.

    ``path`` is a local path or an ``s3://`` / ``gs://`` URI, read through ``pyarrow.fs``
    (:mod:`gloss_ray.storage`); a missing bucket or key is a :class:`DataError` naming the URI, and
    so is an empty (zero-byte) file.
    """
    remote = is_uri(path)
    if remote:
        size = file_info(str(path)).size  # DataError: bucket or file not found, no access
        suffix = PurePosixPath(str(path)).suffix
    elif not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    else:
        size, suffix = Path(path).stat().st_size, Path(path).suffix
    if suffix.lower() not in READERS:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use {', '.join(READERS)})")
    kind = READERS[suffix.lower()]
    if size == 0:
        raise DataError(f"{path}: no data rows (the file is empty)")
    try:
        with (open_input(str(path)) if remote else nullcontext(path)) as source:
            if kind == "text":
                raw = source.read() if remote else Path(source).read_bytes()
                return pd.DataFrame({"text": raw.decode("utf-8").splitlines()})
            if kind == "CSV":
                # keep_default_na=False: a text "NA" stays a text; an empty cell is "" (caught below).
                return pd.read_csv(source, dtype=str, keep_default_na=False)
            if kind == "JSON":
                return pd.read_json(source, lines=True, dtype=False, convert_dates=False)
            return pd.read_parquet(source)
    except DataError:
        raise
    except (ValueError, OSError, UnicodeDecodeError) as exc:  # pandas/pyarrow parse and read errors
        kind = {"JSON": "JSON lines (one object per line)", "text": "UTF-8 text"}.get(kind, kind)
        raise DataError(f"{path}: cannot read as {kind}: {_one_line(exc)}") from exc


def _require_columns(frame: pd.DataFrame, source: str, columns: Mapping[str, str]) -> None:
    """A :class:`DataError` naming the first of ``columns`` (name -> the option that names it)
    that ``frame`` lacks, and the columns it has."""
    for column, option in columns.items():
        if column not in frame.columns:
            have = ", ".join(str(c) for c in frame.columns)
            raise DataError(f"{source}: column '{column}' not found (columns: {have}); use {option}")


def _empty_text(text: pd.Series) -> np.ndarray:
    """Rows of ``text`` that are missing or blank."""
    return text.isna().to_numpy() | (text.astype(str).str.strip() == "").to_numpy()


def read_texts(path: str | os.PathLike, text_column: str = "text") -> list[str]:
    """The texts of one file (``gloss-ray predict`` / ``embed``): :func:`_read_file`, then the same
    checks as a training split's texts -- the column exists, the file has rows, no text is blank --
    each a one-line :class:`DataError` naming the file (and the rows)."""
    source = str(path)
    frame = _read_file(path)
    _require_columns(frame, source, {text_column: "--text-column"})
    if len(frame) == 0:
        raise DataError(f"{source}: no data rows")
    empty = _empty_text(frame[text_column])
    if empty.any():
        raise DataError(f"{source}: empty text in column '{text_column}' at row(s) {_rows(empty)}")
    return frame[text_column].astype(str).tolist()


def _clean(frame: pd.DataFrame, source: str, text_column: str, label_column: str) -> pd.DataFrame:
    """Check columns and rows of one split; return ``text``/``label`` as str columns."""
    _require_columns(frame, source, {text_column: "--text-column", label_column: "--label-column"})
    if len(frame) == 0:
        raise DataError(f"{source}: no data rows")
    text, label = frame[text_column], frame[label_column]
    empty_text = _empty_text(text)
    if empty_text.any():
        raise DataError(f"{source}: empty text in column '{text_column}' at row(s) {_rows(empty_text)}")
    no_label = _empty_text(label)
    if no_label.any():
        raise DataError(f"{source}: missing label in column '{label_column}' at row(s) {_rows(no_label)}")
    return pd.DataFrame({"text": text.astype(str).tolist(), "label": label.astype(str).tolist()})


def _vocabulary(train: pd.DataFrame, source: str) -> list[str]:
    """Sorted unique training labels (numerically when every label is an integer)."""
    names = sorted(set(train["label"]))
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=lambda n: (int(n), n))
    if len(names) < 2:
        raise DataError(f"{source}: the training split has a single class ('{names[0]}'); need at least 2")
    return names


def _encode(frame: pd.DataFrame, label_names: list[str], source: str) -> pd.DataFrame:
    """Map class names to ids; a name the training split lacks is an error."""
    ids = {name: i for i, name in enumerate(label_names)}
    unknown = ~frame["label"].isin(list(ids)).to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        others = len(set(frame["label"][unknown])) - 1
        more = f" and {others} other label(s)" if others else ""
        raise DataError(
            f"{source}: label '{frame['label'].iloc[row]}' (row {row + 1}){more} "
            "does not occur in the training split"
        )
    return pd.DataFrame({"text": frame["text"], "label": frame["label"].map(ids).astype(np.int64)})


def _carve_validation(train: pd.DataFrame, seed: int, source: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off a seeded 10% validation set, stratified when sklearn allows it."""
    from sklearn.model_selection import train_test_split

    if len(train) < 2:
        raise DataError(f"{source}: {len(train)} training row(s); cannot carve out a validation split")
    positions = np.arange(len(train))
    try:  # stratification needs >= 2 members per class and room for every class on both sides
        kept, held = train_test_split(
            positions, test_size=VALIDATION_FRACTION, random_state=seed, stratify=train["label"]
        )
    except ValueError:
        kept, held = train_test_split(positions, test_size=VALIDATION_FRACTION, random_state=seed)
    pick = lambda p: train.iloc[np.sort(p)].reset_index(drop=True)  # noqa: E731 - keep file order
    return pick(kept), pick(held)


def _subsample(frame: pd.DataFrame, limit: int, rng: np.random.Generator) -> pd.DataFrame:
    """At most ``limit`` rows: one random example per class first (while room), the rest uniformly."""
    if len(frame) <= limit:
        return frame
    labels = frame["label"].to_numpy()
    classes = rng.permutation(np.unique(labels))[:limit]
    first = np.array([rng.choice(np.flatnonzero(labels == c)) for c in classes], dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(frame)), first)
    chosen = np.concatenate([first, rng.choice(rest, size=limit - len(first), replace=False)])
    return frame.iloc[np.sort(chosen)].reset_index(drop=True)


def _limits(max_samples: int | Mapping[str, int] | None) -> dict[str, int]:
    """``max_samples`` as a per-split dict, validated."""
    if max_samples is None:
        return {}
    limits = dict(max_samples) if isinstance(max_samples, Mapping) else dict.fromkeys(SPLITS, max_samples)
    for split, limit in limits.items():
        if split not in SPLITS:
            raise DataError(f"max_samples: unknown split '{split}' (splits: {', '.join(SPLITS)})")
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
            raise DataError(f"max_samples: '{split}' must be a positive integer, got {limit!r}")
    return limits


def _load_hub(hf_dataset: str, text_column: str, label_column: str) -> tuple[dict, dict]:
    """Raw splits and their sources from ``datasets.load_dataset`` (needs network access)."""
    import datasets

    try:
        loaded = datasets.load_dataset(hf_dataset)
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        raise DataError(f"hf_dataset '{hf_dataset}': cannot load ({_one_line(exc)})") from exc
    wanted = {"train": ("train",), "validation": _HUB_VALIDATION_NAMES, "test": ("test",)}
    frames, files = {}, {}
    for split, candidates in wanted.items():
        name = next((c for c in candidates if c in loaded), None)
        if name is None:
            continue
        part = loaded[name]
        frame = part.to_pandas()
        feature = part.features.get(label_column)
        if isinstance(feature, datasets.ClassLabel):  # integer ids -> class names
            frame[label_column] = [
                feature.int2str(int(v)) if pd.notna(v) else None for v in frame[label_column]
            ]
        frames[split] = _clean(frame, f"{hf_dataset}[{name}]", text_column, label_column)
        files[split] = hf_dataset
    if "train" not in frames:
        raise DataError(f"hf_dataset '{hf_dataset}': no 'train' split (splits: {', '.join(loaded)})")
    return frames, files


def _check_sources(benchmark, train_file, validation_file, test_file, hf_dataset) -> None:
    """Exactly one of benchmark / train_file / hf_dataset; validation and test files only with a train file."""
    given = [opt for opt, v in (("benchmark", benchmark), ("train_file", train_file),
                                ("hf_dataset", hf_dataset)) if v is not None]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise DataError(
            "give exactly one of benchmark, train_file (--train-file) or hf_dataset (--hf-dataset); "
            f"got {what}"
        )
    if train_file is None and (validation_file is not None or test_file is not None):
        raise DataError(
            "validation_file/test_file (--validation-file/--test-file) need train_file (--train-file)"
        )


class BenchmarkMissing(DataError):
    """A benchmark that none of the local data folders holds (:func:`find_benchmark`)."""


def cache_dir() -> Path:
    """The user data cache: ``$GLOSS_RAY_CACHE/data``, default ``~/.cache/gloss_ray/data``."""
    root = os.environ.get(CACHE_ENV) or Path("~", ".cache", "gloss_ray")
    return (Path(root).expanduser() / "data").resolve()


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The local folders searched for a benchmark, in order: ``data_dir`` (if given), ``$GLOSS_RAY_DATA``
    (if set), ``./data`` (the earlier default), then the user cache (:func:`cache_dir`)."""
    given = (data_dir, os.environ.get(DATA_ENV), "data")
    return [Path(p).expanduser().resolve() for p in given if p] + [cache_dir()]


def find_benchmark(name: str, data_dir: str | os.PathLike | None = None) -> Path | str:
    """The data folder holding ``<name>/train.parquet``, among :func:`search_roots`; a ``data_dir`` on
    object storage (``s3://``, ``gs://``) is returned as is (a string) when it holds the benchmark. Never
    downloads: a benchmark in no local folder raises :class:`BenchmarkMissing` naming them."""
    name = name.lower()
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{name}' (valid: {', '.join(BENCHMARKS)})")
    if data_dir is not None and is_uri(data_dir):
        try:
            file_info(join(str(data_dir), name, "train.parquet"))
        except DataError as exc:
            raise DataError(f"{exc}; a data dir on object storage must hold {name}/{{train,validation,test}}"
                            f".parquet (get them with `gloss-ray data download {name}`, then copy them there)") from None
        return str(data_dir)
    roots = search_roots(data_dir)
    for root in roots:
        if (root / name / "train.parquet").is_file():
            return root
    raise BenchmarkMissing(f"benchmark {name}: not found in {', '.join(map(str, roots))}; get it with "
                           f"`gloss-ray data download {name}` (gloss-ray train, bench and tune download it themselves)")


def _benchmark_paths(benchmark: str, data_dir) -> tuple[str, dict]:
    """A benchmark's name and split -> Parquet path (train always; the others where they exist)."""
    name = benchmark.lower()
    folder = join(str(find_benchmark(name, data_dir)), name)
    paths = {s: join(folder, f"{s}.parquet") for s in SPLITS}
    return name, {s: p for s, p in paths.items() if s == "train" or is_file(p)}


def _user_paths(train_file, validation_file, test_file) -> tuple[str, dict]:
    """The corpus name (the train file's folder when it is named train.*, else its stem) and split -> path."""
    paths = {"train": train_file, "validation": validation_file, "test": test_file}
    # local paths as Path; s3:// / gs:// URIs stay strings (a Path would squash "//")
    paths = {s: str(p) if is_uri(p) else Path(p).expanduser() for s, p in paths.items() if p is not None}
    train = PurePosixPath(str(paths["train"]).split("://", 1)[-1]) if is_uri(paths["train"]) \
        else paths["train"].resolve()
    return (train.parent.name if train.stem in SPLITS else train.stem), paths


def load_corpus(
    benchmark: str | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    text_column: str = "text",
    label_column: str = "label",
    hf_dataset: str | None = None,
    max_samples: int | Mapping[str, int] | None = None,
    seed: int = 0,
) -> Corpus:
    """Load a benchmark, user files or a hub dataset (exactly one of the three) as a :class:`Corpus`.

    Without a validation split, a seeded (stratified when possible) 10% of train becomes one.
    ``max_samples`` (an int, or split -> int) then keeps at most that many rows per split.
    Benchmarks always use the columns ``text`` and ``label``.
    """
    _check_sources(benchmark, train_file, validation_file, test_file, hf_dataset)
    limits = _limits(max_samples)
    if hf_dataset is not None:
        name = hf_dataset
        raw, files = _load_hub(hf_dataset, text_column, label_column)
    else:
        if benchmark is not None:
            name, paths = _benchmark_paths(benchmark, data_dir)
            text_column, label_column = "text", "label"     # benchmarks always use these
        else:
            name, paths = _user_paths(train_file, validation_file, test_file)
        raw = {split: _clean(_read_file(path), str(path), text_column, label_column) for split, path in paths.items()}
        files = {split: str(path) for split, path in paths.items()}

    label_names = _vocabulary(raw["train"], files["train"])
    if "validation" not in raw:
        raw["train"], raw["validation"] = _carve_validation(raw["train"], seed, files["train"])
        files["validation"] = files["train"]
    splits = {}
    for i, split in enumerate(s for s in SPLITS if s in raw):
        frame = _encode(raw[split], label_names, files[split])
        if split in limits:
            frame = _subsample(frame, limits[split], np.random.default_rng([seed, i]))
        splits[split] = frame
    return Corpus(name=name, label_names=label_names, splits=splits, files=files)


def _cache_key(tokenizer, max_length: int, key: str, texts: list[str]) -> str:
    """sha256 over the tokenizer identity, ``max_length``, the caller's key and the texts."""
    cls = type(tokenizer)
    ident = json.dumps([
        str(getattr(tokenizer, "name_or_path", "")), f"{cls.__module__}.{cls.__qualname__}",
        len(tokenizer), int(max_length), str(key), len(texts),
    ])
    digest = hashlib.sha256(ident.encode())
    for text in texts:  # guards against a key reused for other rows (e.g. another max_samples)
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def tokenize_split(
    texts: list[str], tokenizer, max_length: int, cache_dir: str | Path | None, key: str, log=say
):
    """Tokenise ``texts`` (truncated to ``max_length``, unpadded) into a ``datasets.Dataset``
    with columns ``input_ids`` and ``attention_mask``.

    With a ``cache_dir`` the result is stored under ``cache_dir/<sha256>`` (see :func:`_cache_key`)
    and later calls with the same arguments load it without calling the tokenizer. The entry is
    written to a temporary folder and renamed, so concurrent workers never read a partial one;
    ``log`` says which (a cache hit, or the entry written).
    """
    from datasets import Dataset, load_from_disk
    from datasets.table import InMemoryTable

    texts = list(texts)
    digest = _cache_key(tokenizer, max_length, key, texts)
    target = None
    if cache_dir is not None:
        target = Path(cache_dir) / digest
        if target.is_dir():
            log(f"tokenisation cache hit: {target}")
            return load_from_disk(str(target))
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    # An explicit fingerprint (the cache key): without one, datasets hashes the whole table by
    # pickling it, which costs time on large corpora (and, under Ray Train's logging, printed
    # dill's bytecode trace into the run's log).
    table = InMemoryTable.from_pydict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    dataset = Dataset(table, fingerprint=digest[:32])
    if target is None:
        return dataset
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    dataset.save_to_disk(str(tmp))
    try:
        tmp.rename(target)
    except OSError:  # another worker finished first; its entry is identical
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"tokenisation cached: {target}")
    return load_from_disk(str(target))


# --------------------------------------------------------------------------- batching


class PadCollator:
    """Collate ``{input_ids, attention_mask, label, index}`` dicts into right-padded tensors.

    Pads to the longest sequence of the batch. Returns ``input_ids``, ``attention_mask``
    (0 on padding), ``labels`` and ``index`` (long tensors); the last two only when present.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        width = max((len(f["input_ids"]) for f in features), default=0)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[row, :n] = torch.as_tensor(f["attention_mask"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask}
        for src, dst in (("label", "labels"), ("index", "index")):
            if features and src in features[0]:
                batch[dst] = torch.tensor([int(f[src]) for f in features], dtype=torch.long)
        return batch


class GlobalBatchSampler:
    """Per-rank batches of dataset indices cut from shared *global* batches (a ``batch_sampler``).

    For epoch ``e`` (:meth:`set_epoch`) one ordering of all indices is built from ``(seed, e)``
    alone and cut into global batches of ``per_worker_batch * world_size``; rank ``r`` yields
    positions ``[r*per_worker_batch, (r+1)*per_worker_batch)`` of each. Hence 1 worker x 128 and
    2 workers x 64 see the same global batches in the same order, and rank 0's batch ``i``
    followed by rank 1's batch ``i`` equals the single worker's batch ``i``. ``len()`` is the
    number of global batches; with ``drop_last`` (training) the incomplete last one is dropped,
    otherwise each rank gets its slice of it, which may be short or empty.

    ``balanced=False``: a seeded permutation; every index appears at most once per epoch.

    ``balanced=True``: with ``C`` classes present, position ``j`` of a global batch holds class
    ``order[j % C]``, ``order`` being a fresh seeded permutation of the classes per batch.
    Guarantees, for a global batch of ``B`` positions:

    * every class gets ``B // C`` or ``B // C + 1`` positions (so >= 2 each when ``B >= 2*C``),
      or all its members when it has fewer;
    * any contiguous run of ``w`` positions - in particular each rank's slice - holds every class
      ``w // C`` or ``w // C + 1`` times (round robin), so per-worker graphs are balanced too, as
      long as no class has fewer members than its share;
    * no document appears twice in a batch: a class with fewer members than its share of
      positions contributes each member once and its spare positions go to the other classes
      (round robin over those); each class is drawn from its own reshuffled cycle, so small classes
      are repeated across batches (oversampled) and large ones are partly skipped in an epoch.

    An epoch has as many global batches as in the unbalanced case.
    """

    def __init__(
        self,
        labels: Sequence[int],
        per_worker_batch: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        balanced: bool = False,
        drop_last: bool = True,
    ):
        if per_worker_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need per_worker_batch >= 1 and 0 <= rank < world_size, got "
                f"per_worker_batch={per_worker_batch}, world_size={world_size}, rank={rank}"
            )
        self.labels = np.asarray(labels, dtype=np.int64)
        self.per_worker_batch, self.world_size, self.rank = per_worker_batch, world_size, rank
        self.seed, self.balanced, self.drop_last = seed, balanced, drop_last
        self.epoch, self.start = 0, 0
        if drop_last and len(self) == 0:
            raise DataError(
                f"{len(self.labels)} training examples are fewer than one global batch of "
                f"{self.global_batch_size} (per-worker batch {per_worker_batch} x {world_size} workers); "
                "lower the batch size"
            )

    @property
    def global_batch_size(self) -> int:
        """``per_worker_batch * world_size``."""
        return self.per_worker_batch * self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch whose ordering the next iteration uses, and the global batch it starts
        at: ``start`` > 0 resumes an epoch after its first ``start`` batches (a step checkpoint),
        yielding exactly the batches an uninterrupted pass would have yielded next. ``len()`` stays
        the whole epoch's."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be in [0, {len(self)}], got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        n, size = len(self.labels), self.global_batch_size
        return n // size if self.drop_last else -(-n // size)

    def _sizes(self) -> list[int]:
        """Size of every global batch of an epoch."""
        n, size = len(self.labels), self.global_batch_size
        return [min(size, n - i * size) for i in range(len(self))]

    def global_batches(self) -> list[np.ndarray]:
        """All global batches of the current epoch (identical on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if not self.balanced:
            order = rng.permutation(len(self.labels))
            bounds = np.cumsum([0] + self._sizes())
            return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return self._balanced_batches(rng)

    def _balanced_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Round-robin class slots per batch, each class fed from its own reshuffled cycle."""
        classes = np.unique(self.labels)
        members = {c: np.flatnonzero(self.labels == c) for c in classes}
        cycle = {c: rng.permutation(members[c]).tolist() for c in classes}
        pos = dict.fromkeys(classes, 0)

        def take(c, k: int) -> list[int]:
            out: list[int] = []
            while len(out) < k:
                if pos[c] == len(cycle[c]):  # reshuffle; this batch's picks go last to avoid repeats
                    fresh, taken = rng.permutation(members[c]).tolist(), set(out)
                    cycle[c] = [i for i in fresh if i not in taken] + [i for i in fresh if i in taken]
                    pos[c] = 0
                out.append(cycle[c][pos[c]])
                pos[c] += 1
            return out

        batches = []
        for size in self._sizes():
            slots = self._slots(rng.permutation(classes), size, {c: len(m) for c, m in members.items()})
            picks = {c: iter(take(c, k)) for c, k in Counter(slots).items()}
            batches.append(np.array([next(picks[c]) for c in slots], dtype=np.int64))
        return batches

    @staticmethod
    def _slots(order: np.ndarray, size: int, capacity: dict) -> list:
        """Round robin over ``order`` for ``size`` positions, skipping a class once it has as many
        positions as members: no document appears twice in a batch (a copy could be visible while
        another is hidden in the G-Loss graph). With no class at capacity this is ``order[j % C]``."""
        slots: list = []
        used = Counter()
        while len(slots) < size:
            for c in order:
                if len(slots) < size and used[c] < capacity[c]:
                    slots.append(c)
                    used[c] += 1
        return slots

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.per_worker_batch
        for batch in self.global_batches()[self.start:]:
            yield batch[lo:lo + self.per_worker_batch].tolist()
