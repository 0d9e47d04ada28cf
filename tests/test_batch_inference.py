"""``gloss-ray predict`` / ``embed`` through Ray Data (gloss_ray/batch_inference.py), on the session's
Ray instance: input from S3 (moto's server on loopback) and a local folder of shards, results to S3
and a local folder, read back and compared with the in-process path on the same texts; bad input as
one line."""
import io
import re
import uuid

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from gloss_ray import cli
from gloss_ray.inference import embed_file, predict_file

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> str:
    import torch

    from gloss_ray.model import TextClassifier, load_tokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("saved_model")
    TextClassifier.from_encoder(tiny_model_dir, 3).save_pretrained(out, load_tokenizer(tiny_model_dir),
                                                                    ["neg", "neu", "pos"])
    return str(out)


@pytest.fixture
def bucket(moto_server) -> str:
    name = f"gloss-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=moto_server, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


def _docs(n: int, seed: int) -> pd.DataFrame:
    """``n`` texts of varied length with ids ``d<seed>-<i>``."""
    rng = np.random.default_rng(seed)
    words = "the film was a fine moving dull long short story about people and their lives".split()
    return pd.DataFrame({"doc_id": [f"d{seed}-{i}" for i in range(n)],
                         "text": [" ".join(rng.choice(words, size=int(rng.integers(2, 40)))) for _ in range(n)]})


def _put(uri: str, frame: pd.DataFrame) -> None:
    fs, path = pafs.FileSystem.from_uri(uri)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    with fs.open_output_stream(path) as out:
        out.write(buf.getvalue())


def _read_shards(uri: str) -> pd.DataFrame:
    fs, path = pafs.FileSystem.from_uri(uri)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.path.endswith(".parquet")]
    assert files, f"no Parquet shards under {uri}"
    return pd.concat([pq.read_table(f, filesystem=fs).to_pandas() for f in files], ignore_index=True)


def _one_error_line(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("gloss-ray:")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def test_s3_input_and_output_agree_with_the_in_process_predict(ray_local, bucket, model_dir, tmp_path, capsys):
    """Two Parquet shards on S3 -> Parquet shards on S3 of doc_id, label, confidence: every document
    once, with the label and confidence the single-process path gives the same texts."""
    shards = [_docs(30, 1), _docs(25, 2)]
    for i, frame in enumerate(shards):
        _put(f"{bucket}/corpus/part-{i}.parquet", frame)
    assert cli.main(["predict", "--model-dir", model_dir, "--input", f"{bucket}/corpus/", "--output",
                     f"{bucket}/predictions/", "--id-column", "doc_id", "--batch-size", "8", "--actors", "1"]) == 0
    assert f"wrote 55 rows" in capsys.readouterr().out
    got = _read_shards(f"{bucket}/predictions/").set_index("doc_id")
    assert list(got.columns) == ["label", "confidence"] and len(got) == 55 and got.index.is_unique

    local = tmp_path / "all.parquet"
    pd.concat(shards, ignore_index=True).to_parquet(local)
    want = pd.read_csv(predict_file(model_dir, str(local), str(tmp_path / "p.csv"), batch_size=8))
    want.index = pd.concat(shards)["doc_id"].tolist()
    got = got.loc[want.index]
    assert got["label"].tolist() == want["label"].tolist()
    assert np.allclose(got["confidence"].to_numpy(), want["confidence"].to_numpy(), atol=1e-5)


def test_a_folder_of_csv_shards_embeds_like_the_in_process_path(ray_local, model_dir, tmp_path):
    """A local folder of CSV shards (no id column: the text is the key), one of them in a sub-folder
    and a marker file beside them -> embeddings equal to ``embed_file``'s of the same texts."""
    folder = tmp_path / "corpus"
    (folder / "more").mkdir(parents=True)
    frames = [_docs(12, 3), _docs(9, 4), _docs(7, 5)]
    for frame, name in zip(frames, ["a.csv", "b.csv", "more/c.csv"]):
        frame[["text"]].to_csv(folder / name, index=False)
    (folder / "_SUCCESS").write_text("")
    out = tmp_path / "emb"
    assert cli.main(["embed", "--model-dir", model_dir, "--input", str(folder), "--output", str(out),
                     "--batch-size", "4", "--actors", "1"]) == 0
    got = _read_shards(str(out))
    assert list(got.columns) == ["text", "embedding"] and len(got) == 28

    texts = pd.concat(frames, ignore_index=True)["text"]
    (tmp_path / "all.txt").write_text("\n".join(texts) + "\n")
    want = np.load(embed_file(model_dir, str(tmp_path / "all.txt"), str(tmp_path / "e.npy"), batch_size=4))
    by_text = dict(zip(got["text"], got["embedding"]))
    assert np.allclose(np.stack([by_text[t] for t in texts]), want, atol=1e-5)


def test_a_blank_text_names_its_shard_and_id(ray_local, bucket, model_dir, capsys):
    frame = _docs(6, 6)
    frame.loc[4, "text"] = "   "
    _put(f"{bucket}/corpus/part-0.parquet", _docs(5, 7))
    _put(f"{bucket}/corpus/part-1.parquet", frame)
    line = _one_error_line(capsys, ["predict", "--model-dir", model_dir, "--input", f"{bucket}/corpus",
                                    "--output", f"{bucket}/out", "--id-column", "doc_id", "--actors", "1"])
    assert line == f"gloss-ray: error: {bucket}/corpus/part-1.parquet: empty text in column 'text' (doc_id 'd6-4')"


def test_a_missing_key_is_one_line_naming_the_uri(bucket, model_dir, capsys):
    """Checked before Ray Data starts: no Ray needed."""
    uri = f"{bucket}/corpus/nope.parquet"
    assert _one_error_line(capsys, ["predict", "--model-dir", model_dir, "--input", uri, "--output",
                                    f"{bucket}/out"]) == f"gloss-ray: error: {uri}: file or folder not found"


@pytest.mark.parametrize("case", ["missing column", "output holds files", "mixed types", "no --output for s3"])
def test_bad_input_is_one_line_before_ray_data_starts(bucket, model_dir, tmp_path, capsys, case):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _docs(4, 8).to_parquet(folder / "a.parquet")
    out = tmp_path / "out"
    argv = ["predict", "--model-dir", model_dir, "--input", str(folder), "--output", str(out)]
    if case == "missing column":
        argv += ["--text-column", "body"]
        want = f"{folder / 'a.parquet'}: column 'body' not found (columns: doc_id, text); use --text-column"
    elif case == "output holds files":
        out.mkdir()
        (out / "old.parquet").write_text("earlier results")
        want = f"--output {out}: already holds files; give a new or empty folder"
    elif case == "mixed types":
        _docs(4, 9).to_csv(folder / "b.csv", index=False)
        want = f"{folder}: mixes file types .csv, .parquet; put one type of shard in a folder"
    else:
        _put(f"{bucket}/c/a.parquet", _docs(3, 1))
        argv = ["predict", "--model-dir", model_dir, "--input", f"{bucket}/c/"]
        want = f"--output: give the folder or s3:// / gs:// prefix for the predict shards of {bucket}/c/"
    assert _one_error_line(capsys, argv) == f"gloss-ray: error: {want}"
    if case == "output holds files":
        assert (out / "old.parquet").read_text() == "earlier results"


def test_gpu_without_a_gpu_is_one_line(model_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "t.txt").write_text("a fine film\n")
    line = _one_error_line(capsys, ["predict", "--model-dir", model_dir, "--input", str(tmp_path / "t.txt"), "--gpu"])
    assert re.match(r"gloss-ray: error: --gpu: PyTorch sees no CUDA GPU on this machine \(torch [^,]+, ", line), line
    assert not (tmp_path / "t.predictions.csv").exists()


def test_actors_that_leave_no_cpu_for_reading_are_refused(ray_local, model_dir, tmp_path, capsys):
    """On CPU the actors may take all but one of the instance's CPUs (4 here): Ray Data's read and write
    tasks need one, and without it the pipeline stalls (seen on this machine with 1 actor x 2 CPUs of 2)."""
    (tmp_path / "t.txt").write_text("a fine film\n")
    line = _one_error_line(capsys, ["predict", "--model-dir", model_dir, "--input", str(tmp_path / "t.txt"), "--ray",
                                    "--actors", "2", "--cpus-per-actor", "2"])
    assert line.startswith("gloss-ray: error: --actors 2 x --cpus-per-actor 2 leaves no CPU of this Ray cluster's 4 ")
    assert line.endswith("use at most 1 actors of 2 CPU(s)")
    assert not (tmp_path / "t.predictions").exists()
