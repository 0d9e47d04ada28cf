"""Relative paths on the command line mean the directory the command was run from.

Ray workers, Tune trials and jobs run in other working directories (Ray's session folder), so every
path is resolved on the driver before anything leaves it. These tests run the CLI from a temporary
working directory with relative paths only, and look for every output where the command says.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gloss_ray import cli
from gloss_ray.config import TrainConfig

pytestmark = pytest.mark.ray

WORDS = {"pos": ["good", "great", "fine", "lovely"], "neg": ["bad", "awful", "poor", "dull"]}


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = ["pos", "neg"] * (n // 2)
    return pd.DataFrame({"text": [" ".join(rng.choice(WORDS[y], 3)) + f" film {i}" for i, y in enumerate(labels)],
                         "label": labels})


def test_resolved_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "enc").mkdir()
    cfg = TrainConfig(train_file="d/train.csv", test_file="d/test.csv", storage="runs", cache_dir="~/c",
                      model="enc").resolved()
    assert cfg.train_file == str(tmp_path / "d" / "train.csv") and cfg.test_file == str(tmp_path / "d" / "test.csv")
    assert cfg.storage == str(tmp_path / "runs") and cfg.model == str(tmp_path / "enc")
    assert cfg.cache_dir == str(Path("~/c").expanduser())
    remote = TrainConfig(benchmark="mr", storage="s3://bucket/runs", model="org/hub-model").resolved()
    assert remote.storage == "s3://bucket/runs" and remote.model == "org/hub-model"


def test_train_predict_embed_with_relative_paths_write_where_the_command_says(
        ray_local, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    _frame(48, 0).to_csv("data/train.csv", index=False)
    _frame(16, 1).to_csv("data/val.csv", index=False)
    _frame(16, 2).to_csv("data/test.csv", index=False)
    shutil.copytree(tiny_model_dir, "enc")
    Path("run.yaml").write_text("epochs: 1\nbatch_size: 16\nmax_length: 16\nprogress: false\nmax_failures: 0\n")
    code = cli.main(["train", "--config", "run.yaml", "--train-file", "data/train.csv", "--validation-file",
                     "data/val.csv", "--test-file", "data/test.csv", "--model", "enc", "--loss", "gloss",
                     "--storage", "runs", "--cache-dir", "cache", "--name", "rel"])
    assert code == 0
    run = tmp_path / "runs" / "rel"
    m = json.loads((run / "metrics.json").read_text())
    assert m["config"]["storage"] == str(tmp_path / "runs") and m["config"]["model"] == str(tmp_path / "enc")
    # CPU by default: the one worker holds every CPU of the (one-node) cluster, and PyTorch uses them all
    cpus = ray_local.cluster_resources()["CPU"]
    assert m["config"]["cpus_per_worker"] == cpus and m["cpu_threads"] == cpus
    assert (run / "history.csv").is_file() and (run / "plots" / "training_curves.png").is_file()
    assert (run / "model" / "config.json").is_file()
    assert any(Path("cache").iterdir())                      # the tokenisation cache is here too
    Path("texts.txt").write_text("good great film\nawful dull film\n")
    assert cli.main(["predict", "--model-dir", "runs/rel/model", "--input", "texts.txt", "--output", "p.csv"]) == 0
    assert len(pd.read_csv("p.csv")) == 2
    assert cli.main(["embed", "--model-dir", "runs/rel/model", "--input", "texts.txt", "--output", "e.npy"]) == 0
    assert np.load("e.npy").shape[0] == 2


def test_bench_with_relative_storage_data_dir_and_config(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for split, (n, seed) in {"train": (48, 0), "validation": (16, 1), "test": (16, 2)}.items():
        Path("bench/mr").mkdir(parents=True, exist_ok=True)
        _frame(n, seed).to_parquet(f"bench/mr/{split}.parquet", index=False)
    shutil.copytree(tiny_model_dir, "enc")
    Path("base.yaml").write_text("epochs: 1\nbatch_size: 16\nmax_length: 16\nprogress: false\n"
                                 "max_failures: 0\nmodel: enc\ndata_dir: bench\n")
    code = cli.main(["bench", "--config", "base.yaml", "--benchmarks", "mr", "--losses", "ce", "--seeds", "1",
                     "--storage", "out", "--name", "sw", "--concurrency", "1"])
    assert code == 0
    m = json.loads((tmp_path / "out" / "sw" / "runs" / "mr" / "ce" / "seed0" / "metrics.json").read_text())
    assert m["config"]["data_dir"] == str(tmp_path / "bench") and m["train_docs"] == 48
    assert (tmp_path / "out" / "sw" / "report" / "report.md").is_file()
