"""``gloss-ray predict`` / ``embed`` at corpus scale, through Ray Data.

    gloss-ray predict --model-dir s3://BUCKET/runs/mr-gloss/model --input s3://BUCKET/corpus/ \\
        --output s3://BUCKET/predictions/ --id-column doc_id

The input is a file, or a folder / ``s3://`` / ``gs://`` prefix of shards (every file under it, in
sub-folders too, of one of the formats the in-process path reads: ``.parquet``, ``.csv``, ``.jsonl``
/ ``.json``, ``.txt``; files named ``_*`` or ``.*`` are skipped). It is read by Ray Data's own
readers (``read_parquet`` / ``read_csv`` / ``read_json`` / ``read_text``) block by block; the saved
model runs in ``map_batches`` on a pool of actors (:class:`Classify` / :class:`Embed`), each loading it
once (:class:`~gloss_ray.inference.Predictor`), with one GPU each under ``--gpu``; the results stream
into Parquet shards under ``--output`` (a folder or an ``s3://`` / ``gs://`` prefix that must be
empty or new): ``<key>, label, confidence`` for predict, ``<key>, embedding`` (a fixed-size list of
float32) for embed. The key is the ``--id-column`` (by default the input's ``id`` column when it has
one), else the text itself. Shards are not in input order: join on the key. Ray Data prints its
progress bars on stderr.

Bad input is one line naming the file or URI: a missing file, bucket or key, an empty folder, a
folder mixing formats, a missing column (checked on the first file before Ray Data starts; another
shard without it fails when it is read), a blank text (naming its file and key), an output prefix
that already holds files.

The maths stays in :mod:`gloss_ray.inference` (the same :class:`~gloss_ray.inference.Predictor` as the
in-process path, so the numbers agree with it); this module only reads, maps and writes.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from .errors import ConfigError, DataError
from .log import say
from .shards import Shards, _filesystem, gloss_error, key_column, list_shards, read
from .storage import _bucket, _info, absolute, filesystem, redact

ROWS_PER_CALL = 16          # x --batch-size: the texts each actor call gets, length-sorted into encoding batches


class _Model:
    """A Ray Data actor: the saved model loaded once (:class:`~gloss_ray.inference.Predictor`)."""

    def __init__(self, model_dir: str, batch_size: int, max_length: int | None, gpu: bool, graph: bool,
                 text_column: str, key: str, threads: int | None, scheme: str):
        import torch

        from .inference import Predictor, device

        if threads:
            torch.set_num_threads(threads)
        self.predictor = Predictor(model_dir, batch_size, max_length, device(gpu), graph)
        self.text_column, self.key, self.scheme = text_column, key, scheme

    def texts(self, batch: pa.Table) -> list[str]:
        """The batch's texts; a blank one is an error naming its file and key."""
        texts = batch.column(self.text_column).to_pylist()
        blank = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if blank:
            i = blank[0]
            where = self.scheme + batch.column("path")[i].as_py()
            key = "" if self.key == self.text_column else f" ({self.key} {batch.column(self.key)[i].as_py()!r})"
            more = f" and {len(blank) - 1} more in this batch" if len(blank) > 1 else ""
            raise DataError(f"{where}: empty text in column '{self.text_column}'{key}{more}")
        return texts

    def keyed(self, batch: pa.Table, **columns) -> pa.Table:
        return pa.table({self.key: batch.column(self.key), **columns})


class Classify(_Model):
    """``key, label, confidence`` of a batch."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        labels, confidence = self.predictor.predict(self.texts(batch))
        return self.keyed(batch, label=pa.array(labels, pa.string()),
                          confidence=pa.array(confidence.astype(np.float32)))


class Embed(_Model):
    """``key, embedding`` of a batch (a fixed-size list of float32)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        emb = np.ascontiguousarray(self.predictor.embed(self.texts(batch)), dtype=np.float32)
        flat = pa.array(emb.reshape(-1))
        return self.keyed(batch, embedding=pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]))


def _check_output(uri: str) -> tuple[pafs.FileSystem, str]:
    """The output's filesystem and path; an error when it is a file or a folder that holds files
    (Ray Data would add its shards to them)."""
    fs, path = _filesystem(uri, "--output ")
    info = _info(fs, path, uri)
    if info.type == pafs.FileType.File:
        raise DataError(f"--output {redact(uri)}: is a file; give a folder (or prefix) for the Parquet shards")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        raise DataError(f"--output {redact(uri)}: already holds files; give a new or empty folder")
    bucket = _bucket(uri)
    if bucket and _info(fs, bucket, uri).type == pafs.FileType.NotFound:
        raise DataError(f"--output {redact(uri)}: bucket '{bucket}' not found")
    return fs, path


def _check_model(model_dir: str, gpu: bool, graph: bool) -> str:
    """``model_dir`` made absolute, checked on the driver: a gloss-ray model folder; with ``graph``, a
    graph that scores each document on its own (inductive), as batches need."""
    from .graph.predict import META_FILE as GRAPH_META
    from .model import META_FILE

    model_dir = absolute(model_dir)
    fs, path = filesystem(model_dir)
    if _info(fs, f"{path.rstrip('/')}/{META_FILE}", model_dir).type != pafs.FileType.File:
        raise ConfigError(f"--model-dir {redact(model_dir)}: not a gloss-ray model directory (no {META_FILE}); "
                          "pass the 'model' folder of a run")
    if graph and _info(fs, f"{path.rstrip('/')}/{GRAPH_META}", model_dir).type == pafs.FileType.File:
        with fs.open_input_stream(f"{path.rstrip('/')}/{GRAPH_META}") as f:
            if json.loads(f.read()).get("transductive"):
                raise ConfigError("--graph: the model's graph is transductive (every document scored votes for the "
                                  "others), which batches cannot do; give a local file without --ray, or retrain "
                                  "without --graph-transductive")
    return model_dir


def _check_resources(gpu: bool, private: bool) -> None:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpu and not gpus:
        if private:
            raise ConfigError("--gpu: Ray sees no GPU on this machine; leave out --gpu to run on the CPU")
        say("--gpu: the Ray cluster has no GPU yet; the actors wait for one (an autoscaling cluster adds GPU "
            "nodes on demand)", file=sys.stderr)


def run(what: str, model_dir: str, input_uri: str, output: str, text_column: str = "text",
        id_column: str | None = None, batch_size: int = 64, max_length: int | None = None, gpu: bool = False,
        graph: bool = False, actors: int | None = None, cpus_per_actor: float | None = None) -> dict:
    """Classify (``what="predict"``) or embed every text of ``input_uri`` into Parquet shards under
    ``output``; returns ``{"rows", "files", "output"}``. Connects to the Ray cluster (or starts a local
    instance, :func:`gloss_ray.train.launch.init_ray`)."""
    import ray
    import ray.data

    from .train.launch import _starts_a_local_instance, init_ray

    shards = list_shards(input_uri)
    key = key_column(shards, text_column, id_column)
    model_dir = _check_model(model_dir, gpu, graph)
    out_fs, out_path = _check_output(output)
    private = not ray.is_initialized() and _starts_a_local_instance()
    init_ray()
    _check_resources(gpu, private)
    cpus = float(cpus_per_actor or 1)
    if actors is None:
        res = ray.cluster_resources()
        actors = max(1, int(res.get("GPU", 0))) if gpu else max(1, int((res.get("CPU", 1) - 1) // cpus))
    if not gpu:
        total = ray.cluster_resources().get("CPU", 0)
        if actors * cpus > total - 1:
            raise ConfigError(f"--actors {actors} x --cpus-per-actor {cpus:g} leaves no CPU of this Ray cluster's "
                              f"{total:g} for Ray Data's read and write tasks (measured: the pipeline then stalls); "
                              + (f"use at most {int((total - 1) // cpus)} actors of {cpus:g} CPU(s)" if total - 1 >= cpus
                                 else "give a single local file without --ray to run it in this process"))
    udf = Classify if what == "predict" else Embed
    ds = read(shards, [text_column, key]).map_batches(
        udf, batch_format="pyarrow", batch_size=ROWS_PER_CALL * batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=1 if gpu else 0,
        fn_constructor_kwargs=dict(model_dir=model_dir, batch_size=batch_size, max_length=max_length, gpu=gpu,
                                   graph=graph, text_column=text_column, key=key,
                                   threads=None if gpu else max(1, int(cpus)), scheme=shards.scheme))
    try:
        ds.write_parquet(out_path, filesystem=out_fs)
    except Exception as exc:  # noqa: BLE001 - Ray wraps what the actors raised; say it in one line
        err = gloss_error(exc)
        if err is not None:
            raise err from None
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise DataError(f"{redact(shards.uri)}: Ray Data failed: {type(exc).__name__}: {redact(first)}") from exc
    return _written(out_fs, out_path, output, shards)


def _written(fs: pafs.FileSystem, path: str, output: str, shards: Shards) -> dict:
    """Rows and files under the output (from the Parquet footers); no rows at all is an error."""
    import pyarrow.parquet as pq

    files = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
             if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    rows = sum(pq.read_metadata(p, filesystem=fs).num_rows for p in files)
    if rows == 0:
        raise DataError(f"{redact(shards.uri)}: no data rows")
    return {"rows": rows, "files": len(files), "output": redact(output)}


def default_output(input_uri: str, what: str) -> str:
    """Where the shards go without ``--output``: next to a local input, ``<input>.predictions`` /
    ``<input>.embeddings``; an ``s3://`` / ``gs://`` input needs ``--output``."""
    if "://" in str(input_uri):
        raise ConfigError(f"--output: give the folder or s3:// / gs:// prefix for the {what} shards of "
                          f"{redact(input_uri)}")
    base = os.path.abspath(str(input_uri)).rstrip("/")
    return f"{base.rsplit('.', 1)[0] if os.path.isfile(base) else base}.{'predictions' if what == 'predict' else 'embeddings'}"
