"""Local paths and object storage (anything ``pyarrow.fs`` understands: paths, s3://, gs://).

Run outputs (``--storage``) and input data (``--train-file``, ``--data-dir``, ...) both go through
:func:`filesystem`, the one place that turns a path or URI into ``(pyarrow filesystem, path)``.
Credentials and endpoints come from the usual environment of each library (for S3:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for
an S3-compatible server; for GCS: application default credentials), on the driver and on every
Ray worker alike.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from .errors import DataError


# scheme://user:password@ (also scheme:/user... as a URI passed through pathlib comes out)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*:/+)[^/@\s]+@")
REDACTED = "***"


def redact(obj):
    """``obj`` with the credentials of every URI in it replaced: ``s3://KEY:SECRET@bucket/x`` ->
    ``s3://***@bucket/x``; a string, or the strings inside dicts, lists and tuples. Everything
    gloss-ray writes or prints (metrics.json, the model card, logs, error lines) goes through it;
    the run itself keeps the URI as given (pyarrow reads the credentials from it)."""
    if isinstance(obj, str):
        return _USERINFO.sub(lambda m: f"{m[1]}{REDACTED}@", obj)
    if isinstance(obj, dict):
        return {redact(k): redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (s3://, gs://, file://), False for a local path."""
    return "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """A URI as it is; a local path made absolute (``~`` expanded) against the current folder."""
    path = str(path)
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path (made absolute, ``~`` expanded) or a URI."""
    return pafs.FileSystem.from_uri(absolute(uri))


_fs = filesystem


def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``: the URI itself, or, when it
    holds credentials (``s3://KEY:SECRET@bucket``), the path inside the filesystem built from it,
    so that Ray's logs and state files never hold them."""
    if redact(uri) == uri:
        return uri, None
    fs, path = filesystem(uri)
    return path, fs


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def upload_dir(local_dir: str | Path, dest: str) -> None:
    fs, path = _fs(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


REPORT_INPUTS = ("metrics.json", "history.csv", "trials.json")   # what the report reads, besides plots/*.png


def fetch_report_inputs(uri: str, local: str | Path) -> int:
    """Copy the files the report reads from the results at ``uri`` (s3:// / gs://) into the local
    folder ``local``: every metrics.json, history.csv and trials.json and the runs' plots/*.png,
    nothing inside a checkpoint or model folder. Returns how many. Used by ``tune``/``bench`` on
    object storage and by ``jobs/report.py``."""
    fs, root = filesystem(uri)
    root, n = root.rstrip("/"), 0
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        parts = info.path[len(root):].lstrip("/").split("/")
        wanted = parts[-1] in REPORT_INPUTS or (len(parts) > 1 and parts[-2] == "plots" and parts[-1].endswith(".png"))
        if info.type != pafs.FileType.File or not wanted or any(p.startswith("checkpoint_") or p == "model"
                                                                  for p in parts[:-1]):
            continue
        dest = Path(local).joinpath(*parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src:
            dest.write_bytes(src.read())
        n += 1
    return n


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def remove_checkpoints(run_dir: str) -> int:
    """Delete the Ray Train checkpoint folders (``checkpoint_*``) directly under a run's folder --
    once a run has its metrics.json they only serve a resume that will not happen. Returns how many."""
    fs, path = _fs(run_dir)
    n = 0
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            fs.delete_dir(info.path)
            n += 1
    return n


def write_json(uri: str, obj) -> None:
    """Write ``obj`` as indented JSON to a local path or URI (parent folders created), credentials
    in URIs redacted."""
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write((json.dumps(redact(obj), indent=2, default=str) + "\n").encode())


def read_json(uri: str):
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


@contextmanager
def staged_output(dest: str):
    """Write into a local temporary folder; its contents are copied to ``dest`` on exit."""
    with tempfile.TemporaryDirectory(prefix="gloss_ray_out_") as tmp:
        yield Path(tmp)
        upload_dir(tmp, dest)


def _bucket(uri: str) -> str | None:
    """The bucket of an ``s3://`` or ``gs://`` URI, without credentials (None for other paths)."""
    scheme, _, rest = str(uri).partition("://")
    return rest.split("/", 1)[0].rpartition("@")[2] if scheme in ("s3", "gs", "gcs") and rest else None


def _info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except (OSError, ValueError) as exc:  # no credentials, endpoint unreachable, access denied
        raise DataError(f"{uri}: cannot access ({' '.join(str(exc).split())})") from exc


def file_info(uri: str) -> pafs.FileInfo:
    """Type, size and mtime of the *file* at ``uri``; :class:`DataError` naming ``uri`` when it is
    missing (saying so when its bucket is), a folder, or cannot be reached."""
    try:
        fs, path = filesystem(uri)
    except (OSError, ValueError) as exc:  # unknown scheme, bad URI
        raise DataError(f"{uri}: cannot access ({' '.join(str(exc).split())})") from exc
    info = _info(fs, path, uri)
    if info.type == pafs.FileType.NotFound:
        bucket = _bucket(uri)
        if bucket and _info(fs, bucket, uri).type == pafs.FileType.NotFound:
            raise DataError(f"{uri}: bucket '{bucket}' not found")
        raise DataError(f"{uri}: file not found")
    if info.type != pafs.FileType.File:
        raise DataError(f"{uri}: is a folder, not a file")
    return info


def is_file(uri: str) -> bool:
    """True when ``uri`` (a path or URI) names an existing file; False when it is missing."""
    try:
        file_info(uri)
        return True
    except DataError:
        return False


def open_input(uri: str):
    """A seekable binary file (``pyarrow.NativeFile``) for reading the file at ``uri``."""
    fs, path = filesystem(uri)
    try:
        return fs.open_input_file(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{uri}: cannot open ({' '.join(str(exc).split())})") from exc


def object_fingerprint(uri: str) -> str:
    """sha256 over ``uri``, size and modification time of an object: one metadata request,
    no download. It changes whenever the object is rewritten (S3 and GCS set the time on every
    upload), so it can key a cache; a rewrite within the same second keeping the exact size
    would not change it (the tokenisation cache also hashes the texts, so it stays correct)."""
    info = file_info(uri)
    mtime = info.mtime_ns if info.mtime_ns is not None else ""
    return hashlib.sha256(f"{uri}\n{info.size}\n{mtime}".encode()).hexdigest()


def download_dir(uri: str, local_dir: str | Path) -> None:
    """Copy the folder at ``uri`` (``s3://`` / ``gs://``; e.g. a run's ``model/``) into the local
    folder ``local_dir``; :class:`DataError` naming ``uri`` when there is no such folder."""
    try:
        fs, path = filesystem(uri)
    except (OSError, ValueError) as exc:
        raise DataError(f"{uri}: cannot access ({' '.join(str(exc).split())})") from exc
    if _info(fs, path, uri).type != pafs.FileType.Directory:
        raise DataError(f"{uri}: folder not found")
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
