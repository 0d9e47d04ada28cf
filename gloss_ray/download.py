"""Download the five G-Loss benchmarks from their public sources and write them as parquet.

    gloss-ray data download [mr r8 r52 ohsumed 20ng] [--dest DIR] [--force]
    python -m pytest -q tests/test_download.py          # the tests (offline, local mirror)
    python benchmarks/check_download.py SOURCES_DIR     # check against real source files

Each benchmark becomes ``<dest>/<name>/{train,validation,test}.parquet`` (columns ``text``,
``label`` = class name; pyarrow, zstd, one row group, no index, no schema metadata), the same
bytes as the reference copies described in ``data/README.md`` of the project's shared data:

* mr, r8, r52: the G-Loss authors' CSVs (saditya13/G-Loss ``data/<MR|R8|R52>/{train,val,test}.csv``);
  integer labels mapped to class names (MR 0/1 -> negative/positive, R8 0..7 -> alphabetical names).
* ohsumed: train/validation from the authors' CSVs (labels 0..22 -> C01..C23); test rebuilt from
  the 4,043 TextGCN files ``data/ohsumed_single_23/test/<class>/<id>`` listed in TextGCN's
  ``data/ohsumed.txt`` (label = folder), ordered by class, then id.
* 20ng: the "bydate" archive ``20news-bydate.tar.gz``, fetched from the same URL and checked
  against the same sha256 as scikit-learn's ``fetch_20newsgroups`` (whose ``remove=()`` strings
  these are: bytes decoded as latin-1). One 14 MB file is more robust than 18,846 single-file
  downloads, and it needs no scikit-learn cache or private API. Validation = the authors'
  ``data/20ng/val.csv`` rows, located in the training pool by whitespace-normalised text (the
  raw post is kept, authors' order); train = the rest of the pool; train and test are ordered by
  newsgroup, then file name compared as a string (scikit-learn's ``load_files`` order: 10000
  sorts before 9136).

The only change to any text is ``str.strip()``. GitHub files are pinned at fixed commits and every
downloaded file is checked against a sha256 pinned here (the 4,043 Ohsumed test files against one
digest of their ``sha256sum`` listing). A benchmark is built in a hidden temporary folder next to
its destination and renamed into place when complete.

Public API: :func:`download` (``names``, ``dest``) and :func:`find_or_download` (``name``,
``data_dir``; :func:`gloss_ray.data.find_benchmark` searches ``data_dir``, ``$GLOSS_RAY_DATA``, ``./data``,
the user cache; then it downloads). The user cache is ``$GLOSS_RAY_CACHE/data``, default
``~/.cache/gloss_ray/data``. The ``gloss-ray data download`` parser is in :mod:`gloss_ray.cli`. Mirrors:
``$GLOSS_RAY_DATA_MIRROR`` (or ``mirror=``) is a URL prefix replacing ``https://``, e.g.
``http://127.0.0.1:8000`` fetches ``http://127.0.0.1:8000/raw.githubusercontent.com/<owner>/...``;
``file:///path`` works too. Failures raise :class:`~gloss_ray.errors.DataError` with one line
naming the URL or file. Progress goes to stderr, one line per file (per class folder for the
4,043 Ohsumed test files) with its size.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping

from .data import DATA_ENV, BenchmarkMissing, cache_dir, find_benchmark, search_roots
from .errors import DataError
from .log import say
from .options import BENCHMARKS, SPLITS

MIRROR_ENV = "GLOSS_RAY_DATA_MIRROR"   # URL prefix replacing "https://"

GLOSS = "https://raw.githubusercontent.com/saditya13/G-Loss/38d01f613b379c86641f27b8f28ba9c82486b44e/data/"
TEXTGCN = "https://raw.githubusercontent.com/yao8839836/text_gcn/962223652e9bb164ac2d83cd09fc7b8845ce860b/"
NG_ARCHIVE = "https://ndownloader.figshare.com/files/5975967"  # 20news-bydate.tar.gz (scikit-learn's URL)
OHSUMED_LIST = TEXTGCN + "data/ohsumed.txt"
OHSUMED_TEST = TEXTGCN + "data/ohsumed_single_23/test/"  # pin key: digest of the files' sha256sum listing

SHA256 = {  # URL -> sha256 of the downloaded bytes
    GLOSS + "MR/train.csv": "1fb1d9be15efc6bca4af4f99f8e26f0dadcdb6b8106c6dd773bc5953912bec33",
    GLOSS + "MR/val.csv": "4d811ba22c1beef3f66874dbe0a513a667bdb071f57b658395be5fbfa32d787d",
    GLOSS + "MR/test.csv": "07e64cae2674575200c13f444188d3907fe464158bcdf955252b23e639537a77",
    GLOSS + "R8/train.csv": "38403910f8facfb509dd7db6aa2f117f4ed84ba194df922e3366688b1ccca143",
    GLOSS + "R8/val.csv": "af2da6626ab1b11933452cebcc1f26c0d5c09a807b6a78fc5e216ecf4f37dde0",
    GLOSS + "R8/test.csv": "083f6d98c42ad906f9c02243ac676277704599b1453bc1307af78f8f65f0fe6b",
    GLOSS + "R52/train.csv": "986f41ddf39dc360ae9619da19e9632fd4779bdc5278de94f846bd74f226c9ca",
    GLOSS + "R52/val.csv": "77b1f22037e91519c9e1cdd88f2caa35a30dd93a6167dd30816f7ff766ee0789",
    GLOSS + "R52/test.csv": "a8f6d82ca86b758c697dde6985ba938a607d2831f9f827b869172027f5618d37",
    GLOSS + "ohsumed/train.csv": "30ec08bd5afa83b56e567957016444f682c7e369a4e564341b9565dcfbccc057",
    GLOSS + "ohsumed/val.csv": "ab2823f7498c60f60b40e40f3eaf5950d225b212cbcdf803d29b9b43598a0e15",
    GLOSS + "20ng/val.csv": "9536b91dada5104f79550a452f8d3c5c115253026626f5ff0b192c76bd0efccc",
    OHSUMED_LIST: "724b8ed25eb3d99b90b86fdc4ef5e2450b386ff0ba348afe38f420cd61eccc16",
    OHSUMED_TEST: "a0e6810b2091143e6d800052d8a2df942ce5c228180fbf8fd8fcea75bd9c09fb",
    NG_ARCHIVE: "8f1b2514ca22a5ade8fbb9cfa5727df95fa587f4c87b786e15c759fa66d95610",
}
LABELS = {  # authors' integer label -> class name (R52 already uses names)
    "mr": ("negative", "positive"),
    "r8": ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"),
    "ohsumed": tuple(f"C{i:02d}" for i in range(1, 24)),
}
CSV_FOLDER = {"mr": "MR", "r8": "R8", "r52": "R52", "ohsumed": "ohsumed"}

TIMEOUT_S = 60
RETRIES = 3           # attempts per URL (connection errors, HTTP 429 and 5xx)
RETRY_DELAY_S = 2.0   # first back-off, doubled per attempt
WORKERS = 8           # parallel downloads of the Ohsumed test files


# --------------------------------------------------------------------------- folders


def find_or_download(name: str, data_dir: str | os.PathLike | None = None) -> Path | str:
    """The data folder holding ``<name>/train.parquet`` (:func:`gloss_ray.data.find_benchmark`: ``data_dir``,
    ``$GLOSS_RAY_DATA``, ``./data``, the user cache), downloading the benchmark when none holds it: into
    ``data_dir`` when the caller named one (where the user asked for the data), else into the user cache,
    with one line saying so. Nothing is downloaded into a bucket (a ``data_dir`` on object storage must
    hold the benchmark). gloss-ray calls it in one place, on the driver: :func:`gloss_ray.cli.fetch_data`.
    """
    name = _check_names([name])[0]
    try:
        return find_benchmark(name, data_dir)
    except BenchmarkMissing:
        pass
    dest = search_roots(data_dir)[0] if data_dir else cache_dir()
    say(f"{name}: not found in {', '.join(map(str, search_roots(data_dir)))}; downloading into {dest}",
        file=sys.stderr)
    download([name], dest)
    return dest


def download(
    names: Iterable[str] | None = None,
    dest: str | os.PathLike | None = None,
    *,
    force: bool = False,
    mirror: str | None = None,
    pins: Mapping[str, str] | None = None,
) -> list[Path]:
    """Download and convert benchmarks (default: all five) into ``dest`` (default: user cache).

    Returns the benchmark folders ``<dest>/<name>``. A benchmark already there is kept unless
    ``force``. ``mirror`` (default ``$GLOSS_RAY_DATA_MIRROR``) replaces ``https://`` in every URL;
    ``pins`` overrides entries of :data:`SHA256` (for mirrors of other file versions, tests).
    """
    names = _check_names(list(names) if names else list(BENCHMARKS))
    root = Path(dest).expanduser().resolve() if dest else cache_dir()
    fetcher = _Fetcher(mirror if mirror is not None else os.environ.get(MIRROR_ENV), {**SHA256, **(pins or {})})
    done = []
    for name in names:
        target = root / name
        with _locked(root):
            if not force and all((target / f"{s}.parquet").is_file() for s in SPLITS):
                say(f"{name}: already in {target} (pass --force to download again)", file=sys.stderr)
            else:
                fetcher.name = name
                splits = _BUILDERS[name](fetcher)
                _install(splits, target)
                sizes = ", ".join(f"{s} {len(splits[s][0]):,}" for s in SPLITS)
                say(f"{name}: wrote {target} ({sizes} rows)", file=sys.stderr)
        done.append(target)
    return done


def _check_names(names: list[str]) -> list[str]:
    lowered = [n.lower() for n in names]
    unknown = [n for n in lowered if n not in BENCHMARKS]
    if unknown:
        raise DataError(f"unknown benchmark '{unknown[0]}' (valid: {', '.join(BENCHMARKS)})")
    return lowered


@contextmanager
def _locked(root: Path):
    """Hold an exclusive lock on the folder ``root`` itself (no lock file is left behind), so
    parallel callers, e.g. Ray workers on one node, download a benchmark once."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    except OSError as exc:
        raise DataError(f"{root}: cannot create the data folder ({exc.strerror or exc})") from exc
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _install(splits: dict[str, tuple[list[str], list[str]]], target: Path) -> None:
    """Write the splits into a temporary folder beside ``target``, then rename it into place."""
    staging = None
    try:
        staging = _new_folder(target, "partial")
        for split, (texts, labels) in splits.items():
            write_parquet(staging / f"{split}.parquet", texts, labels)
        if target.exists():
            old = _new_folder(target, "old")
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    except OSError as exc:
        raise DataError(f"{target}: cannot write the benchmark ({exc.strerror or exc})") from exc
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _new_folder(target: Path, kind: str) -> Path:
    """A new hidden folder beside ``target`` (permissions from the umask, unlike mkdtemp's 0700)."""
    folder = target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    return folder


def write_parquet(path: Path, texts: list[str], labels: list[str]) -> None:
    """``text``/``label`` string columns: zstd, one row group, no index, no schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array(texts, pa.string()), "label": pa.array(labels, pa.string())})
    pq.write_table(table, path, compression="zstd", row_group_size=max(len(texts), 1))


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


# --------------------------------------------------------------------------- fetching


class _Fetcher:
    """Fetch URLs (through the mirror, with retries) and check them against the pins."""

    def __init__(self, mirror: str | None, pins: Mapping[str, str]):
        self.mirror = mirror.rstrip("/") if mirror else None
        self.pins = pins
        self.name = "<name>"  # the benchmark being fetched, for error messages

    def where(self, url: str) -> str:
        """The URL actually fetched: ``url`` with ``https://`` replaced by the mirror prefix."""
        return f"{self.mirror}/{url.split('://', 1)[1]}" if self.mirror else url

    def raw(self, url: str) -> bytes:
        """The bytes at ``url`` (no checksum); DataError naming the URL on failure."""
        actual = self.where(url)
        request = urllib.request.Request(actual, headers={"User-Agent": "gloss-ray"})
        for attempt in range(RETRIES):
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                    return response.read()
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                code = getattr(exc, "code", None)
                transient = code is None or code == 429 or code >= 500
                if not transient or attempt == RETRIES - 1 or actual.startswith("file:"):
                    raise DataError(
                        f"cannot download {actual} ({_reason(exc)}); without internet, set "
                        f"{DATA_ENV} (or pass --data-dir) to a folder holding "
                        f"{self.name}/{{train,validation,test}}.parquet"
                    ) from exc
                time.sleep(RETRY_DELAY_S * 2 ** attempt)
        raise AssertionError("unreachable")

    def get(self, url: str, what: str) -> bytes:
        """The bytes at ``url``, checked against its pinned sha256; prints one progress line."""
        data = self.raw(url)
        self.check(url, hashlib.sha256(data).hexdigest(), what=self.where(url))
        say(f"{what}: fetched {self.where(url)} ({_size(len(data))})", file=sys.stderr)
        return data

    def check(self, key: str, digest: str, what: str) -> None:
        expected = self.pins.get(key)
        if expected is None:
            raise DataError(f"{what}: no sha256 pinned for {key}")
        if digest != expected:
            raise DataError(
                f"{what}: sha256 mismatch (expected {expected}, got {digest}); the source changed "
                "or the download is corrupt, nothing was written"
            )


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    code = getattr(exc, "code", None)
    text = " ".join(str(reason).split()) or type(exc).__name__
    return f"HTTP {code} {text}" if code else text


# --------------------------------------------------------------------------- conversion

Splits = dict[str, tuple[list[str], list[str]]]  # split -> (texts, labels)


def _authors_csv(fetcher: _Fetcher, name: str, file: str) -> tuple[list[str], list[str]]:
    """Texts (stripped) and class names of one G-Loss CSV (``<MR|R8|R52|ohsumed|20ng>/<file>.csv``)."""
    import pandas as pd

    url = GLOSS + f"{CSV_FOLDER.get(name, name)}/{file}.csv"
    frame = pd.read_csv(io.BytesIO(fetcher.get(url, name)), dtype=str, keep_default_na=False)
    names = LABELS.get(name)
    try:
        labels = [names[int(v)] if names else v for v in frame["label"]]
    except (ValueError, IndexError, KeyError) as exc:
        raise DataError(f"{fetcher.where(url)}: unexpected label column ({exc})") from exc
    return [t.strip() for t in frame["text"]], labels


def _csv_benchmark(name: str):
    def build(fetcher: _Fetcher) -> Splits:
        return {s: _authors_csv(fetcher, name, f) for s, f in zip(SPLITS, ("train", "val", "test"))}
    return build


def _ohsumed(fetcher: _Fetcher) -> Splits:
    listing = fetcher.get(OHSUMED_LIST, "ohsumed").decode("utf-8")
    paths = sorted(  # data/ohsumed_single_23/test/<class>/<id>: by class, then id
        row.split("\t")[0] for row in listing.splitlines() if row.split("\t")[1:2] == ["test"]
    )
    files, done, size = [], 0, 0
    pool = ThreadPoolExecutor(WORKERS)
    try:
        for i, data in enumerate(pool.map(fetcher.raw, [TEXTGCN + p for p in paths])):
            files.append(data)
            size += len(data)
            label = paths[i].split("/")[-2]
            if i + 1 == len(paths) or paths[i + 1].split("/")[-2] != label:  # one line per class folder
                say(f"ohsumed: fetched {i + 1 - done} files {fetcher.where(OHSUMED_TEST)}{label}/ ({_size(size)})",
                    file=sys.stderr)
                done, size = i + 1, 0
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, fetch no more
    # pinned: the sha256 of `sha256sum <paths in sorted order>`, as in `... | xargs sha256sum | sha256sum`
    listed = "".join(f"{hashlib.sha256(d).hexdigest()}  {p}\n" for p, d in zip(paths, files))
    fetcher.check(OHSUMED_TEST, hashlib.sha256(listed.encode()).hexdigest(),
                  what=f"{fetcher.where(OHSUMED_TEST)} ({len(paths)} files)")
    splits = {s: _authors_csv(fetcher, "ohsumed", f) for s, f in (("train", "train"), ("validation", "val"))}
    splits["test"] = ([d.decode("utf-8").strip() for d in files], [p.split("/")[-2] for p in paths])
    return splits


def _20ng(fetcher: _Fetcher) -> Splits:
    archive = fetcher.get(NG_ARCHIVE, "20ng")
    pool: dict[str, list[tuple[str, str, str]]] = {"train": [], "test": []}  # (group, file, text)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar:  # 20news-bydate-<train|test>/<group>/<id>, perhaps below "./"
            parts = PurePosixPath(member.name).parts[-3:]
            if member.isfile() and len(parts) == 3 and parts[0] in ("20news-bydate-train", "20news-bydate-test"):
                text = tar.extractfile(member).read().decode("latin-1").strip()
                pool[parts[0].rsplit("-", 1)[1]].append((parts[1], parts[2], text))
    if not pool["train"] or not pool["test"]:
        raise DataError(f"{fetcher.where(NG_ARCHIVE)}: no 20news-bydate-train/ or 20news-bydate-test/ files inside")
    for docs in pool.values():  # scikit-learn's load_files order: group, then file name as a string
        docs.sort(key=lambda d: d[:2])
    groups = sorted({g for g, _, _ in pool["train"]})

    val_texts, val_labels = _authors_csv(fetcher, "20ng", "val")
    where = {" ".join(t.split()): i for i, (_, _, t) in enumerate(pool["train"])}
    picked = []
    for row, (text, label) in enumerate(zip(val_texts, val_labels), start=1):
        i = where.get(" ".join(text.split()))
        group = groups[int(label)] if label.isdigit() and int(label) < len(groups) else None
        if i is None or group != pool["train"][i][0]:
            raise DataError(f"{fetcher.where(GLOSS + '20ng/val.csv')}: row {row} not found in the training pool "
                            "with its label")
        picked.append(i)
    chosen = set(picked)
    if len(chosen) != len(picked):
        raise DataError(f"{fetcher.where(GLOSS + '20ng/val.csv')}: rows match the same training document twice")
    train = [d for i, d in enumerate(pool["train"]) if i not in chosen]
    return {
        "train": ([t for _, _, t in train], [g for g, _, _ in train]),
        "validation": ([pool["train"][i][2] for i in picked], [pool["train"][i][0] for i in picked]),
        "test": ([t for _, _, t in pool["test"]], [g for g, _, _ in pool["test"]]),
    }


_BUILDERS = {"mr": _csv_benchmark("mr"), "r8": _csv_benchmark("r8"), "r52": _csv_benchmark("r52"),
             "ohsumed": _ohsumed, "20ng": _20ng}
