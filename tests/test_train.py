"""Fine-tuning through Ray Train: the CLI end to end, DDP equivalence, resume, and bad input."""
import csv
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gloss_ray import cli
from gloss_ray.config import TrainConfig
from gloss_ray.losses import GLoss, WeightedCrossEntropy
from gloss_ray.train.objective import StepContext, step_objective

pytestmark = pytest.mark.ray

N, DIM, C = 128, 12, 4
AUX = ("gloss", "scl", "triplet", "contrastive", "none")
WEIGHTS = torch.tensor([0.4, 1.5, 3.0, 6.0])   # class weights, e.g. "balanced" on imbalanced data


def _fixed_problem():
    """Imbalanced labels, split unevenly between the two halves: the first 64 are mostly class 0,
    the second mostly classes 1-3, so each worker's slice has other class proportions."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g, dtype=torch.float64)
    first = torch.tensor([0] * 50 + [1] * 8 + [2] * 4 + [3] * 2)
    second = torch.tensor([0] * 14 + [1] * 26 + [2] * 16 + [3] * 8)
    return x, torch.cat([first, second[torch.randperm(64, generator=g)]])


def _net():
    torch.manual_seed(1)
    return torch.nn.Linear(8, DIM).double()


def _aux(name):
    from gloss_ray.losses import BatchAllTripletLoss, ContrastiveLoss, SupConLoss

    from gloss_ray.train.objective import EmbeddingLoss, GraphLoss

    return {"gloss": GraphLoss(GLoss(C, sigma=0.6, gamma=0.7, class_weights=WEIGHTS)),
            "scl": EmbeddingLoss(SupConLoss(0.1)), "triplet": EmbeddingLoss(BatchAllTripletLoss(1.0)),
            "contrastive": EmbeddingLoss(ContrastiveLoss(1.0)), "none": None}[name]


def _step(net, x, y, aux):
    emb = net(x)
    logits = emb[:, :C]
    return step_objective(WeightedCrossEntropy(WEIGHTS), _aux(aux), logits, emb, y, lam=0.6,
                          ctx=StepContext(mask_seed=1234))


def _ddp_worker(config):
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from gloss_ray.train.session import seed_rank_streams

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for aux in AUX:
        net = _net()
        model = ray.train.torch.prepare_model(net)
        x, y = _fixed_problem()
        per = N // world
        sl = slice(rank * per, (rank + 1) * per)
        obj, backward_loss = _step(model, x[sl], y[sl], aux)
        backward_loss.backward()
        out[aux] = {"aux": obj.aux.item(), "ce": obj.ce.item(), "total": obj.total.item(),
                    "grad_w": net.weight.grad.tolist(), "grad_b": net.bias.grad.tolist()}
    torch.manual_seed(0)                      # what train() does first on every rank ...
    seed_rank_streams(0, rank)                # ... then each rank's own dropout stream
    out["dropout_mask"] = (torch.nn.functional.dropout(torch.ones(256), 0.5) > 0).tolist()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(out))


def test_two_workers_of_64_equal_one_process_of_128(ray_local):
    """Every loss (CE with class weights, plus G-Loss / SCL / triplet / contrastive on the
    all-gathered global batch): same value and same DDP-averaged gradient as one process, with
    imbalanced labels split unevenly between the workers."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as storage:
        TorchTrainer(_ddp_worker, train_loop_config={"out": out}, scaling_config=ScalingConfig(num_workers=2),
                     run_config=RunConfig(storage_path=storage, name="ddp_equiv")).fit()
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    x, y = _fixed_problem()
    for aux in AUX:
        net = _net()
        obj, loss = _step(net, x, y, aux)
        loss.backward()
        for r in ranks:
            got = r[aux]
            for key in ("aux", "ce", "total"):
                assert got[key] == pytest.approx(getattr(obj, key).item(), rel=1e-5), (aux, key)
            np.testing.assert_allclose(got["grad_w"], net.weight.grad.numpy(), rtol=1e-5, atol=1e-9, err_msg=aux)
            np.testing.assert_allclose(got["grad_b"], net.bias.grad.numpy(), rtol=1e-5, atol=1e-9, err_msg=aux)
    # the two ranks draw different dropout masks (the G-Loss mask above is shared: same values)
    assert ranks[0]["dropout_mask"] != ranks[1]["dropout_mask"]


def test_rank_zero_keeps_the_run_seed_for_dropout():
    from gloss_ray.train.session import seed_rank_streams

    masks = []
    for rank in (0, 0, 1, 2):
        torch.manual_seed(5)
        seed_rank_streams(5, rank)
        masks.append(torch.nn.functional.dropout(torch.ones(128), 0.5).tolist())
    torch.manual_seed(5)
    assert masks[0] == masks[1] == torch.nn.functional.dropout(torch.ones(128), 0.5).tolist()
    assert masks[0] != masks[2] != masks[3] != masks[0]


def test_train_cli_two_workers_real_minilm(ray_local, data_dir, tmp_path, capsys):
    code = cli.main(["train", "--benchmark", "mr", "--loss", "gloss", "--epochs", "2", "--workers", "2",
                     "--max-train", "192", "--max-eval", "96", "--batch-size", "16", "--max-length", "48",
                     "--data-dir", str(data_dir), "--storage", str(tmp_path), "--name", "mr-gloss", "--no-progress"])
    assert code == 0
    run = tmp_path / "mr-gloss"
    m = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= m["test_accuracy"] <= 1.0 and 0.0 <= m["test_macro_f1"] <= 1.0
    assert m["num_workers"] == 2 and m["best_epoch"] in (1, 2) and m["config"]["loss"] == "gloss"
    assert -1.0 <= m["silhouette"] <= 1.0 and m["wall_time_s"] > 0
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["train_aux"]) > 0 and float(r["train_ce"]) > 0 for r in rows)
    assert (run / "plots" / "training_curves.png").stat().st_size > 1000
    assert (run / "plots" / "embedding_map.png").stat().st_size > 1000
    # the saved model reloads in Hugging Face format and classifies a file of texts
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(run / "model")
    assert hf.config.hidden_size == 384 and hf.config.id2label == {0: "negative", 1: "positive"}
    texts = tmp_path / "texts.txt"
    texts.write_text("a wonderful , moving film\nboring and far too long\n")
    assert cli.main(["predict", "--model-dir", str(run / "model"), "--input", str(texts),
                     "--output", str(tmp_path / "p.csv")]) == 0
    pred = pd.read_csv(tmp_path / "p.csv")
    assert len(pred) == 2 and set(pred["label"]) <= {"negative", "positive"}
    assert cli.main(["embed", "--model-dir", str(run / "model"), "--input", str(texts),
                     "--output", str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (2, 384)


def test_interrupted_run_resumes_with_one_history_row_per_epoch(ray_local, data_dir, tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    from gloss_ray.train.checkpoint import FAIL_ENV
    from gloss_ray.train.launch import fit

    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ENV, f"1:{marker}")          # the driver's hook reaches the Train workers
    cfg = TrainConfig(benchmark="mr", data_dir=str(data_dir), model=tiny_model_dir, loss="gloss", epochs=3,
                      max_train=64, max_eval=32, max_length=32, batch_size=16, storage=str(tmp_path), name="resume",
                      max_failures=1, patience=10, progress=False)
    m = fit(cfg)
    assert marker.exists()  # the worker really failed once after epoch 1
    rows = list(csv.DictReader(open(tmp_path / "resume" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert m["epochs_run"] == 3


def _cli_error(capsys, *args):
    code = cli.main(["train", *args])
    # lines Ray forwards from background actors of earlier tests ("(Actor pid=..) ...") are not ours
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if not re.match(r"^(\x1b\[\d+m)?\(", ln)]
    err = "\n".join(lines)
    assert code == 2
    assert len(lines) == 1 and err.startswith("gloss-ray: error:"), err
    return err


def test_bad_input_is_one_line(tmp_path, capsys, data_dir):
    good = pd.DataFrame({"text": ["good film", "bad film", "fine", "awful"], "label": ["pos", "neg", "pos", "neg"]})
    good.to_csv(tmp_path / "train.csv", index=False)
    assert "nope.csv" in _cli_error(capsys, "--train-file", str(tmp_path / "nope.csv"))
    good.rename(columns={"text": "body"}).to_csv(tmp_path / "nocol.csv", index=False)
    assert "'text'" in _cli_error(capsys, "--train-file", str(tmp_path / "nocol.csv"))
    bad = good.copy()
    bad.loc[2, "text"] = "   "
    bad.to_csv(tmp_path / "empty.csv", index=False)
    assert "row" in _cli_error(capsys, "--train-file", str(tmp_path / "empty.csv"))
    test = good.copy()
    test.loc[1, "label"] = "neutral"
    test.to_csv(tmp_path / "test.csv", index=False)
    assert "neutral" in _cli_error(capsys, "--train-file", str(tmp_path / "train.csv"), "--test-file", str(tmp_path / "test.csv"))
    assert "imdb" in _cli_error(capsys, "--benchmark", "imdb", "--data-dir", str(data_dir))
    assert "lam" in _cli_error(capsys, "--benchmark", "mr", "--lam", "1.5")


def test_two_worker_run_with_global_graph_logs_diagnostics(ray_local, data_dir, tiny_model_dir, tmp_path):
    from gloss_ray.train.launch import fit

    cfg = TrainConfig(benchmark="r8", data_dir=str(data_dir), model=tiny_model_dir, loss="gloss", epochs=2, workers=2,
                      max_train=160, max_eval=48, max_length=32, batch_size=16, global_k=8, global_max_nodes=64,
                      label_fraction=0.5, storage=str(tmp_path), name="global", max_failures=0, progress=False)
    m = fit(cfg)
    assert m["global_graph"] is True and m["num_workers"] == 2
    rows = list(csv.DictReader(open(tmp_path / "global" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= float(r["homophily"]) <= 1.0
        assert float(r["recall_at_k"]) == pytest.approx(1.0)  # exact FAISS index on a small corpus
        assert 0.0 <= float(r["pseudo_label_accuracy"]) <= 1.0 and int(r["pseudo_labelled"]) > 0
        assert float(r["refresh_s"]) > 0 and float(r["lookup_s"]) > 0
        assert int(r["bank_shared"]) == 1          # two workers on one machine: one bank in /dev/shm


def test_max_steps_ends_the_run_mid_epoch(data_dir, tiny_model_dir, tmp_path):
    """--max-steps bounds a run (large corpora): the epoch ends there, and the run with it."""
    from gloss_ray.train.loop import train
    from gloss_ray.train.session import LocalSession

    cfg = TrainConfig(benchmark="mr", data_dir=str(data_dir), model=tiny_model_dir, loss="gloss", epochs=3,
                      max_train=96, max_eval=16, max_length=16, batch_size=16, max_steps=4, progress=False,
                      storage=str(tmp_path), name="bounded")
    final = train(cfg, LocalSession(str(tmp_path / "bounded")))      # 6 steps per epoch
    rows = list(csv.DictReader(open(tmp_path / "bounded" / "history.csv")))
    assert final["epochs_run"] == 1 and [int(r["epoch"]) for r in rows] == [1]
    state = json.loads((tmp_path / "bounded" / "local_checkpoint" / "state.json").read_text())
    assert state["global_step"] == 4


def test_run_reports_tokenisation_memory_and_bank_bytes(data_dir, tiny_model_dir, tmp_path):
    """Issue 13's measurements: tokenisation seconds per split and each worker's peak RSS in metrics.json,
    the bank's and the index's bytes in the refresh diagnostics (history.csv)."""
    from gloss_ray.train.loop import train
    from gloss_ray.train.session import LocalSession

    cfg = TrainConfig(benchmark="mr", data_dir=str(data_dir), model=tiny_model_dir, loss="gloss", epochs=1,
                      max_train=96, max_eval=16, max_length=16, batch_size=16, max_steps=2, global_k=4,
                      progress=False, storage=str(tmp_path), name="measured", cache_dir=str(tmp_path / "tok"))
    train(cfg, LocalSession(str(tmp_path / "measured")))
    metrics = json.loads((tmp_path / "measured" / "metrics.json").read_text())
    assert set(metrics["tokenize_s"]) == {"train", "validation", "test"}
    assert all(v > 0 for v in metrics["tokenize_s"].values())
    assert len(metrics["peak_rss_mb_per_worker"]) == 1 and metrics["peak_rss_mb_per_worker"][0] > 10
    row = next(csv.DictReader(open(tmp_path / "measured" / "history.csv")))
    # 96 docs x hidden 32: float32 vectors + int64 labels + bool fill flags + int64 known labels
    assert int(row["bank_bytes"]) == 96 * 32 * 4 + 96 * 8 + 96 + 96 * 8
    # auto picks exact faiss-flat (96 x 32 float32); without FAISS torch-exact shares the bank's tensor
    assert int(row["index_bytes"]) in (96 * 32 * 4, 0)
