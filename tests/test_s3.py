"""Data and run outputs on S3, against a real S3 API on loopback (moto's server, see ``moto_server``
in conftest.py): every read and write goes through pyarrow.fs, as it would on AWS."""
import csv
import io
import json
import re
import uuid

import pandas as pd
import pyarrow.fs as pafs
import pytest

from gloss_ray import cli
from gloss_ray.config import TrainConfig
from gloss_ray.data import load_corpus

pytestmark = pytest.mark.ray  # the training tests share the session's Ray instance


@pytest.fixture
def bucket(moto_server) -> str:
    """A new, empty bucket: ``s3://<name>``."""
    name = f"gloss-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=moto_server, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


def _fs_path(uri: str):
    return pafs.FileSystem.from_uri(uri)


def _put(uri: str, frame: pd.DataFrame) -> str:
    """Write ``frame`` to ``uri`` as CSV, JSON lines or Parquet (by suffix); returns ``uri``."""
    buf = io.BytesIO()
    if uri.endswith(".csv"):
        frame.to_csv(buf, index=False)
    elif uri.endswith(".jsonl"):
        frame.to_json(buf, orient="records", lines=True)
    else:
        frame.to_parquet(buf, index=False)
    return _upload(uri, buf.getvalue())


def _upload(uri: str, data: bytes) -> str:
    fs, path = _fs_path(uri)
    with fs.open_output_stream(path) as out:
        out.write(data)
    return uri


def _get(uri: str) -> str:
    fs, path = _fs_path(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _ls(uri: str) -> list[str]:
    fs, path = _fs_path(uri)
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def _docs(n: int, seed: int) -> pd.DataFrame:
    """``n`` short two-class documents (the tiny random model learns nothing; outputs matter here)."""
    words = ["good", "great", "fine", "bad", "awful", "dull"]
    rows = [(f"{words[(i * 7 + seed) % 3 + 3 * (i % 2)]} film number {i + seed}", "pos" if i % 2 == 0 else "neg")
            for i in range(n)]
    return pd.DataFrame(rows, columns=["text", "label"])


def _splits(bucket: str) -> dict[str, str]:
    """~50 documents on S3: train (CSV), validation (JSON lines), test (Parquet)."""
    return {"train": _put(f"{bucket}/data/train.csv", _docs(32, 0)),
            "validation": _put(f"{bucket}/data/validation.jsonl", _docs(10, 100)),
            "test": _put(f"{bucket}/data/test.parquet", _docs(10, 200))}


def _train_args(files: dict, model: str, storage: str, name: str, cache) -> list[str]:
    return ["train", "--train-file", files["train"], "--validation-file", files["validation"],
            "--test-file", files["test"], "--model", model, "--loss", "gloss", "--epochs", "2",
            "--max-length", "16", "--batch-size", "8", "--storage", storage, "--name", name,
            "--cache-dir", str(cache), "--no-progress"]


def _cli_error(capsys, *args) -> str:
    """Run ``gloss-ray train ARGS``; check it failed with exit 2, one error line and no run started."""
    code = cli.main(["train", *args])
    out, err = capsys.readouterr()
    # lines Ray forwards from background actors of earlier tests ("(Actor pid=..) ...") are not ours
    lines = [ln for ln in err.strip().splitlines() if not re.match(r"^(\x1b\[\d+m)?\(", ln)]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("gloss-ray: error:"), err
    assert "[gloss-ray] run" not in out  # failed in the driver's preflight, before any Train run
    return lines[0]


# --------------------------------------------------------------------------- training


def test_train_reads_data_from_s3_and_writes_outputs_to_s3(ray_local, bucket, tiny_model_dir, tmp_path):
    files = _splits(bucket)
    storage = f"{bucket}/runs"
    assert cli.main(_train_args(files, tiny_model_dir, storage, "s3run", tmp_path / "cache")) == 0
    run = f"{storage}/s3run"
    assert {"metrics.json", "history.csv", "model"} <= set(_ls(run))
    metrics = json.loads(_get(f"{run}/metrics.json"))
    assert metrics["epochs_run"] == 2 and metrics["train_docs"] == 32 and "test_macro_f1" in metrics
    assert metrics["config"]["train_file"] == files["train"]  # the URI, not a mangled local path
    assert [int(r["epoch"]) for r in csv.DictReader(io.StringIO(_get(f"{run}/history.csv")))] == [1, 2]
    assert "config.json" in _ls(f"{run}/model")
    assert any((tmp_path / "cache").iterdir())  # the tokenisation cache stays on the node's disk


def test_failed_run_resumes_from_its_checkpoint_on_s3(ray_local, bucket, tiny_model_dir, tmp_path, monkeypatch):
    from gloss_ray.train.checkpoint import FAIL_ENV
    from gloss_ray.train.launch import fit

    files = _splits(bucket)
    storage = f"{bucket}/runs"

    def config(fail_marker) -> TrainConfig:
        monkeypatch.setenv(FAIL_ENV, f"1:{fail_marker}")      # the driver's hook reaches the Train workers
        return TrainConfig(train_file=files["train"], validation_file=files["validation"], test_file=files["test"],
                           model=tiny_model_dir, loss="gloss", epochs=2, max_length=16, batch_size=8,
                           storage=storage, name="resume", max_failures=0, patience=10, progress=False,
                           cache_dir=str(tmp_path / "cache"))

    first = tmp_path / "first-failed"
    with pytest.raises(Exception):  # max_failures=0: the simulated failure after epoch 1 ends the run
        fit(config(first))
    assert first.exists()
    assert any(n.startswith("checkpoint_") for n in _ls(f"{storage}/resume"))  # epoch 1's checkpoint, on S3
    assert "metrics.json" not in _ls(f"{storage}/resume")

    # the same command again: it continues after epoch 1, so a second failure hook armed for epoch 1
    # never fires (a run starting over would fail there again)
    second = tmp_path / "second-failed"
    metrics = fit(config(second))
    assert not second.exists()
    assert metrics["epochs_run"] == 2
    rows = list(csv.DictReader(io.StringIO(_get(f"{storage}/resume/history.csv"))))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


# --------------------------------------------------------------------------- reading


def test_benchmark_from_an_s3_data_dir(bucket, tmp_path):
    from gloss_ray.download import write_parquet

    frames = {"train": _docs(20, 0), "validation": _docs(6, 100), "test": _docs(6, 200)}
    for split, frame in frames.items():
        write_parquet(tmp_path / f"{split}.parquet", frame["text"].tolist(), frame["label"].tolist())
        _upload(f"{bucket}/prefix/mr/{split}.parquet", (tmp_path / f"{split}.parquet").read_bytes())
    corpus = load_corpus("mr", data_dir=f"{bucket}/prefix")
    assert corpus.files == {s: f"{bucket}/prefix/mr/{s}.parquet" for s in frames}
    assert corpus.splits["test"]["text"].tolist() == frames["test"]["text"].tolist()
    assert corpus.label_names == ["neg", "pos"]


def test_s3_data_dir_without_the_benchmark_is_one_line_error(bucket, capsys):
    err = _cli_error(capsys, "--benchmark", "mr", "--data-dir", f"{bucket}/empty")
    assert f"{bucket}/empty/mr/train.parquet" in err and "not found" in err


def test_missing_bucket_is_one_line_error(moto_server, capsys):
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/data/train.csv"
    err = _cli_error(capsys, "--train-file", uri)
    assert uri in err and "bucket" in err and "not found" in err


def test_missing_key_is_one_line_error(bucket, capsys):
    files = _splits(bucket)
    err = _cli_error(capsys, "--train-file", files["train"], "--test-file", f"{bucket}/data/nope.csv")
    assert f"{bucket}/data/nope.csv: file not found" in err


def test_fingerprint_of_an_s3_file_follows_its_content(bucket):
    uri = _put(f"{bucket}/data/train.csv", _docs(12, 0))
    first = load_corpus(train_file=uri).fingerprint("train")
    assert load_corpus(train_file=uri).fingerprint("train") == first  # stable while the object is unchanged
    _put(uri, _docs(14, 0))
    assert load_corpus(train_file=uri).fingerprint("train") != first  # rewritten: a new cache key


# --------------------------------------------------------------------------- credentials
SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"


def _with_credentials(uri: str) -> str:
    return uri.replace("s3://", f"s3://AKIDEXAMPLE:{SECRET}@", 1)


def _all_objects(uri: str) -> dict[str, bytes]:
    fs, path = _fs_path(uri)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path] = f.read()
    return out


def test_credentials_in_uris_never_reach_written_files_or_output(ray_local, bucket, tiny_model_dir, tmp_path,
                                                                 capfd):
    """``s3://KEY:SECRET@bucket/...`` works, and the secret is in no file of the run (metrics.json,
    model card, Ray's own files), nor in what the command prints; the URIs are kept, redacted."""
    files = {split: _with_credentials(uri) for split, uri in _splits(bucket).items()}
    storage = _with_credentials(f"{bucket}/runs")
    assert cli.main(_train_args(files, tiny_model_dir, storage, "secret", tmp_path / "cache")) == 0
    out, err = capfd.readouterr()
    written = _all_objects(f"{bucket}/runs")
    assert {"secret/metrics.json", "secret/model/README.md"} <= {p.split("/runs/", 1)[1] for p in written}
    leaks = [p for p, data in written.items() if SECRET.encode() in data]
    assert leaks == [] and SECRET not in out + err
    metrics = json.loads(written[f"{bucket[5:]}/runs/secret/metrics.json"])
    assert metrics["config"]["train_file"] == f"s3://***@{bucket[5:]}/data/train.csv"
    assert f"--storage s3://***@{bucket[5:]}/runs" in metrics["config"]["command"]


def test_an_error_names_the_uri_without_its_credentials(bucket, capsys):
    _splits(bucket)
    err = _cli_error(capsys, "--train-file", _with_credentials(f"{bucket}/data/nope.csv"))
    assert SECRET not in err and f"s3://***@{bucket[5:]}/data/nope.csv: file not found" in err
