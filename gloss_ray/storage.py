"""Run outputs on local disk or object storage (anything ``pyarrow.fs`` understands: paths, s3://, gs://)."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs


def _fs(uri: str):
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def upload_dir(local_dir: str | Path, dest: str) -> None:
    fs, path = _fs(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(src: str, local_dir: str | Path) -> None:
    fs, path = _fs(src)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


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
