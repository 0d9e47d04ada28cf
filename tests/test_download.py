"""gloss_ray.download against a mirror served on 127.0.0.1 (offline, a few seconds).

    python -m pytest -q tests/test_download.py

The mirror holds small synthetic source files in the real formats and at the real URL paths: the
G-Loss authors' CSVs (pandas index column, integer labels), TextGCN's ohsumed.txt and
ohsumed_single_23/test/<class>/<id> files, and a 20news-bydate.tar.gz. The sha256 pins are
computed from these files.
"""
from __future__ import annotations

import functools
import hashlib
import io
import socket
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from gloss_ray import data
from gloss_ray import download as dl
from gloss_ray.cli import main as cli_main
from gloss_ray.errors import DataError

# authors' CSVs: split file -> [(text as in the CSV, label as in the CSV)]
CSV = {
    "MR": {"train": [("a fine film .\n", 1), ("dull and long .", 0), (" so so \n", 0)],
           "val": [("great fun .", 1)], "test": [("a mess .", 0), ("loved it .", 1)]},
    "R8": {"train": [("oil prices rise", 1), ("net profit up", 2)], "val": [("wheat exports", 3)],
           "test": [("trade gap widens", 7), ("ship strike", 6)]},
    "R52": {"train": [("cocoa crop falls", "cocoa"), ("gold output", "gold")], "val": [("cocoa talks", "cocoa")],
            "test": [("gold price", "gold")]},
    "ohsumed": {"train": [("Heart failure.\n Results were good.", 3), ("Bacterial infection.", 0)],
                "val": [("Viral disease.", 1)]},
}
OHSUMED_FILES = {  # TextGCN test files, deliberately listed out of order
    "C04/0000020": "Second heart study.\n Sentence two.\n", "C01/0000009": "An infection study.\n",
    "C04/0000003": "First heart study.\n",
}
NG_TRAIN = {  # group -> {file: raw bytes}; "10000" sorts before "9999" (file names compared as strings)
    "alt.atheism": {"9999": b"From: a\r\nSubject: god\r\n\r\nfaith  and   reason\r\n", "10000": b"From: b\n\nbelief\n"},
    "sci.med": {"51": b"From: c\n\ncaf\xe9 doctors\n", "52": b"From: d\n\npatients\n"},
}
NG_TEST = {"alt.atheism": {"7": b"From: e\n\ndoubt\n"}, "sci.med": {"8": b"From: f\n\nclinic\n"}}
NG_VAL = [("From: d\n\npatients", 1), ("From: a\nSubject: god\n\nfaith and reason", 0)]  # the CSV lost "\r"


def _csv(rows) -> bytes:
    frame = pd.DataFrame(rows, columns=["text", "label"], index=range(100, 100 + len(rows)))
    return frame.to_csv().encode()  # like the authors': leading unnamed index column


def _tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _mirror_files() -> dict[str, bytes]:
    """URL -> bytes of every source file, plus the Ohsumed test files."""
    files = {dl.GLOSS + f"{folder}/{split}.csv": _csv(rows) for folder, splits in CSV.items()
             for split, rows in splits.items()}
    files[dl.GLOSS + "20ng/val.csv"] = _csv(NG_VAL)
    listing = [f"data/ohsumed_single_23/test/{p}\ttest\t{p.split('/')[0]}" for p in OHSUMED_FILES]
    listing.append("data/ohsumed_single_23/training/C01/0000001\ttraining\tC01")
    files[dl.OHSUMED_LIST] = ("\n".join(listing) + "\n").encode()
    for path, text in OHSUMED_FILES.items():
        files[dl.OHSUMED_TEST + path] = text.encode()
    files[dl.NG_ARCHIVE] = _tarball({f"20news-bydate-{split}/{g}/{f}": data
                                     for split, pool in (("train", NG_TRAIN), ("test", NG_TEST))
                                     for g, docs in pool.items() for f, data in docs.items()})
    return files


def _pins(files: dict[str, bytes]) -> dict[str, str]:
    pins = {url: hashlib.sha256(data).hexdigest() for url, data in files.items() if url in dl.SHA256}
    listed = "".join(f"{hashlib.sha256(files[dl.OHSUMED_TEST + p]).hexdigest()}  data/ohsumed_single_23/test/{p}\n"
                     for p in sorted(OHSUMED_FILES))
    pins[dl.OHSUMED_TEST] = hashlib.sha256(listed.encode()).hexdigest()
    return pins


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(mirror URL, pins): the synthetic sources served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mirror")
    files = _mirror_files()
    for url, data in files.items():
        path = root / url.split("://", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", _pins(files)
    server.shutdown()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real data folder or cache; a quick retry."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0.0)
    monkeypatch.chdir(tmp_path)  # no ./data


@pytest.fixture
def mirror(served, monkeypatch):
    """Route every download to the served mirror (environment variable) with the fixture's pins."""
    url, pins = served
    monkeypatch.setenv(dl.MIRROR_ENV, url)
    monkeypatch.setattr(dl, "SHA256", pins)
    return url


def _read(folder: Path, split: str) -> tuple[list[str], list[str]]:
    frame = pd.read_parquet(folder / f"{split}.parquet")
    return frame["text"].tolist(), frame["label"].tolist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_csv_benchmarks_map_labels_strip_texts_and_keep_order(mirror, tmp_path):
    mr, r8, r52 = dl.download(["mr", "r8", "r52"], tmp_path / "data")
    assert _read(mr, "train") == (["a fine film .", "dull and long .", "so so"], ["positive", "negative", "negative"])
    assert _read(mr, "validation") == (["great fun ."], ["positive"])
    assert _read(r8, "test") == (["trade gap widens", "ship strike"], ["trade", "ship"])
    assert _read(r52, "train") == (["cocoa crop falls", "gold output"], ["cocoa", "gold"])


def test_parquet_layout_matches_the_reference_settings(mirror, tmp_path):
    (mr,) = dl.download(["mr"], tmp_path)
    meta = pq.ParquetFile(mr / "train.parquet")
    assert sorted(p.name for p in mr.iterdir()) == ["test.parquet", "train.parquet", "validation.parquet"]
    assert meta.schema_arrow.names == ["text", "label"] and meta.schema_arrow.metadata is None
    assert meta.metadata.num_row_groups == 1
    assert meta.metadata.row_group(0).column(0).compression == "ZSTD"


def test_ohsumed_test_split_is_rebuilt_from_files_by_class_then_id(mirror, tmp_path):
    (folder,) = dl.download(["ohsumed"], tmp_path)
    assert _read(folder, "test") == (
        ["An infection study.", "First heart study.", "Second heart study.\n Sentence two."], ["C01", "C04", "C04"])
    assert _read(folder, "train") == (["Heart failure.\n Results were good.", "Bacterial infection."], ["C04", "C01"])
    assert _read(folder, "validation") == (["Viral disease."], ["C02"])


def test_20ng_validation_is_located_in_the_pool_and_keeps_raw_text(mirror, tmp_path):
    (folder,) = dl.download(["20ng"], tmp_path)
    assert _read(folder, "validation") == (
        ["From: d\n\npatients", "From: a\r\nSubject: god\r\n\r\nfaith  and   reason"], ["sci.med", "alt.atheism"])
    assert _read(folder, "train") == (["From: b\n\nbelief", "From: c\n\ncafé doctors"], ["alt.atheism", "sci.med"])
    assert _read(folder, "test") == (["From: e\n\ndoubt", "From: f\n\nclinic"], ["alt.atheism", "sci.med"])


def test_progress_is_one_line_per_file_with_its_size(mirror, tmp_path, capsys):
    dl.download(["mr"], tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if "fetched" in line]
    assert len(lines) == 3 and all(line.endswith(" kB)") and "MR/" in line for line in lines)


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(mirror, tmp_path, monkeypatch):
    url = dl.GLOSS + "MR/test.csv"  # the last file: the first two were fetched fine
    monkeypatch.setitem(dl.SHA256, url, "0" * 64)
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        dl.download(["mr"], tmp_path / "data")
    assert f"{mirror}/raw.githubusercontent.com/" in str(err.value) and "MR/test.csv" in str(err.value)
    assert list((tmp_path / "data").iterdir()) == []


def test_failed_download_keeps_the_benchmark_already_there(mirror, tmp_path, monkeypatch):
    (mr,) = dl.download(["mr"], tmp_path)
    before = (mr / "train.parquet").read_bytes()
    monkeypatch.setitem(dl.SHA256, dl.GLOSS + "MR/val.csv", "0" * 64)
    with pytest.raises(DataError):
        dl.download(["mr"], tmp_path, force=True)
    assert (mr / "train.parquet").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["mr"]


def test_unreachable_url_is_one_line_naming_it_and_the_way_out(tmp_path):
    mirror = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(DataError) as err:
        dl.download(["mr"], tmp_path / "data", mirror=mirror)
    message = str(err.value)
    assert "\n" not in message
    assert f"cannot download {mirror}/raw.githubusercontent.com/saditya13/G-Loss/" in message
    assert "GLOSS_RAY_DATA" in message and "--data-dir" in message and "mr/{train,validation,test}.parquet" in message
    assert list((tmp_path / "data").iterdir()) == []


def test_missing_file_is_not_retried_and_named(served, tmp_path, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: pytest.fail("retried a 404"))
    with pytest.raises(DataError, match=r"cannot download http://127\.0\.0\.1:\d+/gone/raw\.github.*MR/train\.csv \(HTTP 404"):
        dl.download(["mr"], tmp_path, mirror=served[0] + "/gone")


def test_default_urls_are_pinned_github_commits():
    for url in dl.SHA256:
        if "githubusercontent" in url:
            assert len(url.split("/")[5]) == 40, url


def _fake(root: Path, name: str = "mr") -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "train.parquet").write_bytes(b"")
    return root.resolve()


def test_find_or_download_prefers_data_dir(tmp_path, monkeypatch):
    given, env = _fake(tmp_path / "given"), _fake(tmp_path / "env")
    _fake(data.cache_dir())
    monkeypatch.setenv(data.DATA_ENV, str(env))
    assert dl.find_or_download("mr", str(given)) == given


def test_find_or_download_then_environment(tmp_path, monkeypatch):
    env = _fake(tmp_path / "env")
    _fake(data.cache_dir())
    monkeypatch.setenv(data.DATA_ENV, str(env))
    assert dl.find_or_download("mr", str(tmp_path / "empty")) == env


def test_find_or_download_then_current_folder_data(tmp_path, monkeypatch):
    local = _fake(tmp_path / "data")
    _fake(data.cache_dir())
    assert dl.find_or_download("mr", None) == local


def test_find_or_download_then_cache(tmp_path, monkeypatch):
    cache = _fake(data.cache_dir())
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert dl.find_or_download("MR", None) == cache


def test_find_or_download_downloads_into_the_cache(mirror, tmp_path):
    root = dl.find_or_download("mr", None)
    assert root == data.cache_dir() == (tmp_path / "cache" / "data").resolve()
    assert _read(root / "mr", "test")[1] == ["negative", "positive"]


def test_find_or_download_downloads_into_a_named_data_dir(mirror, tmp_path):
    assert dl.find_or_download("mr", str(tmp_path / "mine")) == (tmp_path / "mine").resolve()
    assert (tmp_path / "mine" / "mr" / "validation.parquet").is_file()


@pytest.mark.parametrize("command", ["train", "bench"])
def test_a_run_downloads_a_missing_benchmark_on_the_driver_before_anything_else(mirror, tmp_path, capsys, command):
    """train and bench fetch a named benchmark first, with a line saying so; the run then stops at the
    driver's next check (an empty model folder here), before Ray starts."""
    model = tmp_path / "no-model"
    model.mkdir()
    args = (["train", "--benchmark", "mr", "--model", str(model)] if command == "train" else
            ["bench", "--benchmarks", "mr", "--losses", "ce", "--set", f"model={model}"])
    assert cli_main([*args, "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"mr: not found in {tmp_path / 'data'}" in err and f"downloading into {data.cache_dir()}" in err
    assert (data.cache_dir() / "mr" / "train.parquet").is_file()
    assert err.splitlines()[-1].startswith(f"gloss-ray: error: --model: {model}: not a model folder")
    assert not (tmp_path / "runs").exists()


def test_cli_data_download(mirror, tmp_path, capsys):
    assert cli_main(["data", "download", "mr", "r8", "--dest", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path.resolve() / "mr"), str(tmp_path.resolve() / "r8")]
    assert cli_main(["data", "download", "mr", "--dest", str(tmp_path)]) == 0
    assert "already in" in capsys.readouterr().err


def test_cli_data_download_without_names_gets_all_five(mirror, tmp_path):
    assert cli_main(["data", "download", "--dest", str(tmp_path)]) == 0
    assert all((tmp_path / name / "test.parquet").is_file() for name in dl.BENCHMARKS)


def test_cli_unknown_benchmark_is_one_line_error(tmp_path, capsys):
    assert cli_main(["data", "download", "imdb", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gloss-ray: error: unknown benchmark 'imdb'") and err.count("\n") == 1
