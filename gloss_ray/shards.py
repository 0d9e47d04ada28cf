"""Input files as Ray Data datasets: one file, or a folder / ``s3://`` / ``gs://`` prefix of shards
(every file under it, in sub-folders too, of one of :data:`gloss_ray.data.READERS`' formats; files named
``_*`` or ``.*`` are skipped), read block by block by Ray Data's own readers. Used by ``predict`` /
``embed`` at corpus scale (:mod:`gloss_ray.batch_inference`) and by the Ray Data training path
(:mod:`gloss_ray.train.streaming`). Every problem is a one-line :class:`~gloss_ray.errors.DataError`
naming the file or URI, credentials redacted."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs

from .data import READERS
from .errors import ConfigError, DataError, GlossRayError
from .storage import _bucket, _info, absolute, filesystem, redact


@dataclass
class Shards:
    """The input files: ``uri`` as given, its ``filesystem``, the ``paths`` inside it (sorted) and
    their format (a key of :data:`gloss_ray.data.READERS`)."""

    uri: str
    filesystem: pafs.FileSystem
    paths: list[str]
    suffix: str

    @property
    def scheme(self) -> str:
        """``s3://`` / ``gs://`` (what turns a path inside the filesystem back into a URI), or ``""``."""
        return self.uri.split("://", 1)[0] + "://" if "://" in self.uri else ""

    def name(self, path: str) -> str:
        """``path`` (inside the filesystem) as the user would write it, for messages."""
        return self.scheme + path


def _not_found(fs: pafs.FileSystem, uri: str) -> DataError:
    bucket = _bucket(uri)
    if bucket and _info(fs, bucket, uri).type == pafs.FileType.NotFound:
        return DataError(f"{redact(uri)}: bucket '{bucket}' not found")
    return DataError(f"{redact(uri)}: file or folder not found")


def _filesystem(uri: str, what: str) -> tuple[pafs.FileSystem, str]:
    """``filesystem(uri)``, or a one-line error naming ``what`` and the URI (credentials redacted)."""
    try:
        return filesystem(uri)
    except (OSError, ValueError) as exc:
        raise DataError(f"{what}{redact(uri)}: cannot access ({' '.join(str(exc).split())})") from exc


def list_shards(uri: str) -> Shards:
    """The files of ``--input``: one file, or every data file under a folder / prefix."""
    uri = absolute(uri)
    fs, root = _filesystem(uri, "")
    info = _info(fs, root, uri)
    if info.type == pafs.FileType.NotFound:
        raise _not_found(fs, uri)
    if info.type == pafs.FileType.File:
        suffix = PurePosixPath(root).suffix.lower()
        if suffix not in READERS:
            raise DataError(f"{redact(uri)}: unsupported file type '{suffix}' (use {', '.join(READERS)})")
        return Shards(uri, fs, [root], suffix)
    found = [i for i in _info_list(fs, root, uri) if i.type == pafs.FileType.File
             and not any(p.startswith(("_", ".")) for p in i.path[len(root):].split("/") if p)]
    suffixes = sorted({PurePosixPath(i.path).suffix.lower() for i in found})
    known = [s for s in suffixes if s in READERS]
    if not known:
        seen = f" (it holds {', '.join(s or 'no suffix' for s in suffixes)})" if found else " (it is empty)"
        raise DataError(f"{redact(uri)}: no input files of a known type{seen}; use {', '.join(READERS)}")
    if len({READERS[s] for s in known}) > 1:
        raise DataError(f"{redact(uri)}: mixes file types {', '.join(known)}; put one type of shard in a folder")
    paths = sorted(i.path for i in found if PurePosixPath(i.path).suffix.lower() in known)
    return Shards(uri, fs, paths, known[0])


def _info_list(fs: pafs.FileSystem, root: str, uri: str) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as exc:
        raise DataError(f"{redact(uri)}: cannot list ({' '.join(str(exc).split())})") from exc


def columns_of_first(shards: Shards) -> list[str]:
    """The columns of the first shard (Parquet footer, CSV header or first JSON line)."""
    kind, path = READERS[shards.suffix], shards.paths[0]
    if kind == "text":
        return ["text"]
    try:
        if kind == "Parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(path, filesystem=shards.filesystem).names
        with shards.filesystem.open_input_stream(path) as f:
            head = f.read(1 << 20).decode("utf-8", errors="replace")
        first = head.splitlines()[0] if head.strip() else ""
        if kind == "CSV":
            import csv

            return next(csv.reader([first]), [])
        return list(json.loads(first)) if first else []
    except (OSError, ValueError) as exc:
        raise DataError(f"{shards.name(path)}: cannot read as {kind}: {' '.join(str(exc).split())}") from exc


def key_column(shards: Shards, text_column: str, id_column: str | None) -> str:
    """Check ``text_column`` and ``id_column`` exist in the first shard; the output's key column:
    ``id_column``, else ``id`` when the input has one, else the text."""
    columns = columns_of_first(shards)
    wanted = {text_column: "--text-column", **({id_column: "--id-column"} if id_column else {})}
    for column, option in wanted.items():
        if column not in columns:
            raise DataError(f"{shards.name(shards.paths[0])}: column '{column}' not found "
                            f"(columns: {', '.join(map(str, columns))}); use {option}")
    return id_column or ("id" if "id" in columns and text_column != "id" else text_column)


def read(shards: Shards, columns: list[str], include_paths: bool = True):
    """The input as a Ray Data dataset of ``columns`` (and, with ``include_paths``, ``path``: the file
    of each row). CSV cells are read as strings, as the in-process reader reads them."""
    import ray.data

    import pyarrow.csv as pcsv

    kind = READERS[shards.suffix]
    common = dict(filesystem=shards.filesystem, include_paths=include_paths, file_extensions=None)
    if kind == "Parquet":
        return ray.data.read_parquet(shards.paths, columns=sorted(set(columns)), partitioning=None, **common)
    if kind == "CSV":   # strings, "NA" a text (as the in-process reader reads them)
        strings = {c: pa.string() for c in columns}
        convert = pcsv.ConvertOptions(column_types=strings, include_columns=sorted(strings),
                                      strings_can_be_null=False, quoted_strings_can_be_null=False)
        return ray.data.read_csv(shards.paths, convert_options=convert, partitioning=None, **common)
    if kind == "JSON":
        return ray.data.read_json(shards.paths, lines=True, partitioning=None, **common)
    return ray.data.read_text(shards.paths, drop_empty_lines=False, **common)


_RAISED = re.compile(r"^(?:gloss_ray\.errors\.)?(DataError|ConfigError): (.+)$")


def gloss_error(exc: BaseException) -> GlossRayError | None:
    """The :class:`GlossRayError` an actor raised, from the remote traceback that Ray Data's
    ``UserCodeException`` carries as text (the exception object itself does not come back)."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, GlossRayError):
            return e
        for line in reversed(str(e).splitlines()):
            m = _RAISED.match(line.strip())
            if m:
                return {"DataError": DataError, "ConfigError": ConfigError}[m[1]](m[2])
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None
