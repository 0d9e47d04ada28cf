"""The Ray Data training path (``--data-loader ray-data``, gloss_ray/train/streaming.py): a 2-worker
run, data on S3, resume after a failure, the G-Loss of a streamed global batch against one process,
and bad input as one line before any worker starts."""
import csv
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from gloss_ray import cli
from gloss_ray.config import TrainConfig
from test_s3 import _put, bucket  # noqa: F401 - the fixture

pytestmark = pytest.mark.ray


def _mr_files(data_dir, folder, n=(192, 64, 64)) -> dict:
    """Seeded slices of MR as Parquet files: train / validation / test."""
    out = {}
    for split, rows in zip(("train", "validation", "test"), n):
        frame = pd.read_parquet(data_dir / "mr" / f"{split}.parquet").sample(rows, random_state=0)
        folder.mkdir(parents=True, exist_ok=True)
        out[split] = str(folder / f"{split}.parquet")
        frame.to_parquet(out[split], index=False)
    return out


def _args(files: dict, model: str, storage, name: str, *extra) -> list[str]:
    return ["train", "--train-file", files["train"], "--validation-file", files["validation"],
            "--test-file", files["test"], "--data-loader", "ray-data", "--model", model, "--loss", "gloss",
            "--epochs", "2", "--batch-size", "16", "--max-length", "32", "--workers", "2", "--no-progress",
            "--storage", str(storage), "--name", name, "--patience", "10", *extra]


def test_two_worker_run_streams_every_split(ray_local, data_dir, tiny_model_dir, tmp_path, capsys):
    files = _mr_files(data_dir, tmp_path / "data")
    assert cli.main(_args(files, tiny_model_dir, tmp_path / "runs", "rd")) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "runs" / "rd" / "metrics.json").read_text())
    assert metrics["data_loader"] == "ray-data" and metrics["num_workers"] == 2
    assert metrics["train_docs"] == 192 and metrics["config"]["data_loader"] == "ray-data"
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["silhouette"] is not None
    rows = list(csv.DictReader(open(tmp_path / "runs" / "rd" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # 192 documents, 2 equal shards of 96, batches of 16 per worker: 6 steps an epoch on every rank
    assert "6 steps/epoch" in out
    assert (tmp_path / "runs" / "rd" / "model" / "config.json").exists()


def test_auto_keeps_small_corpora_in_memory_and_streams_large_ones(ray_local, data_dir, tiny_model_dir, tmp_path):
    from gloss_ray.train.launch import data_loader

    files = _mr_files(data_dir, tmp_path / "data")
    cfg = TrainConfig(train_file=files["train"], validation_file=files["validation"], model=tiny_model_dir)
    assert data_loader(cfg) == "memory"
    assert data_loader(TrainConfig(**{**cfg.to_dict(), "ray_data_min_docs": 192})) == "ray-data"
    # an option the stream cannot honour keeps auto in memory, and is an error when ray-data is asked for
    balanced = {**cfg.to_dict(), "ray_data_min_docs": 192, "balanced_batches": True}
    assert data_loader(TrainConfig(**balanced)) == "memory"
    with pytest.raises(Exception, match="--balanced-batches not available with --data-loader ray-data"):
        data_loader(TrainConfig(**{**balanced, "data_loader": "ray-data"}))


def test_training_data_streams_from_s3(ray_local, bucket, data_dir, tiny_model_dir, tmp_path):  # noqa: F811
    local = _mr_files(data_dir, tmp_path / "data", n=(96, 32, 32))
    files = {s: _put(f"{bucket}/corpus/{s}.parquet", pd.read_parquet(p)) for s, p in local.items()}
    assert cli.main(_args(files, tiny_model_dir, f"{bucket}/runs", "s3rd", "--epochs", "1")) == 0
    from test_s3 import _get

    metrics = json.loads(_get(f"{bucket}/runs/s3rd/metrics.json"))
    assert metrics["data_loader"] == "ray-data" and metrics["train_docs"] == 96
    assert metrics["config"]["train_file"] == files["train"]


def test_a_failed_streamed_run_resumes_from_its_step_checkpoint(ray_local, data_dir, tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    from gloss_ray.train.checkpoint import FAIL_STEP_ENV
    from gloss_ray.train.launch import fit

    files = _mr_files(data_dir, tmp_path / "data")
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_STEP_ENV, f"8:{marker}")     # after the step checkpoint of step 8 (epoch 2, batch 2)
    cfg = TrainConfig(train_file=files["train"], validation_file=files["validation"], test_file=files["test"],
                      data_loader="ray-data", model=tiny_model_dir, loss="gloss", epochs=2, batch_size=16,
                      max_length=32, workers=2, storage=str(tmp_path), name="resume", max_failures=1, patience=10,
                      progress=False, checkpoint_every=4, log_every=1)
    m = fit(cfg)
    assert marker.exists()
    rows = list(csv.DictReader(open(tmp_path / "resume" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "resume" / "steps.csv"))]
    assert steps == list(range(1, 13))         # every step once: none repeated, none skipped
    assert m["epochs_run"] == 2


# ----------------------------------------------------------------------------- exactness on a streamed batch
def _streamed_gloss_worker(config):
    """Each rank takes its first streamed batch, computes CE + G-Loss over the gathered global batch
    and its gradient; rank 0 saves the results with the global batch's documents."""
    import ray.train
    import ray.train.torch

    from gloss_ray import distributed as D
    from gloss_ray.losses import GLoss, WeightedCrossEntropy
    from gloss_ray.model import TextClassifier
    from gloss_ray.train.objective import GraphLoss, StepContext, step_objective
    from gloss_ray.train.streaming import pad_batch

    torch.manual_seed(0)
    net = TextClassifier.from_encoder(config["model"], 2, "cls", dropout=0.0)
    model = ray.train.torch.prepare_model(net)
    batch = next(iter(ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=8, collate_fn=pad_batch,
                                                                               drop_last=True)))
    logits, emb = model(batch["input_ids"], batch["attention_mask"])
    obj, loss = step_objective(WeightedCrossEntropy(), GraphLoss(GLoss(2, sigma=0.5, gamma=0.5)), logits, emb,
                               batch["labels"], lam=0.7, ctx=StepContext(mask_seed=11))
    loss.backward()
    docs = D.gather_objects([(ids[m.bool()].tolist(), int(y)) for ids, m, y in
                             zip(batch["input_ids"], batch["attention_mask"], batch["labels"])])
    if D.rank_and_world()[0] == 0:
        head = next(p for p in net.head.parameters() if p.dim() == 2)
        emb_w = net.encoder.embeddings.word_embeddings.weight
        torch.save({"total": obj.total.item(), "aux": obj.aux.item(), "docs": [d for r in docs for d in r],
                    "head_grad": head.grad.clone(), "emb_grad": emb_w.grad.clone()}, config["out"])


def test_a_streamed_global_batch_gives_one_process_loss_and_gradients(ray_local, data_dir, tiny_model_dir,
                                                                     tmp_path):
    """Two workers, each fed its batch by Ray Data: G-Loss over the gathered global batch, with the
    DDP-averaged gradient, equals one process on the same 16 documents."""
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gloss_ray.losses import GLoss, WeightedCrossEntropy
    from gloss_ray.model import TextClassifier
    from gloss_ray.train.objective import GraphLoss, StepContext, step_objective
    from gloss_ray.train.streaming import _tokenise, data_config

    frame = pd.read_parquet(data_dir / "mr" / "train.parquet").head(64)
    ds = ray.data.from_pandas(frame).map_batches(
        _tokenise, batch_format="pandas",
        fn_kwargs=dict(model=tiny_model_dir, max_length=32, text="text", label="label",
                       ids={"negative": 0, "positive": 1}))
    out = tmp_path / "streamed.pt"
    TorchTrainer(_streamed_gloss_worker, train_loop_config={"model": tiny_model_dir, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2), datasets={"train": ds}, dataset_config=data_config(),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="exact")).fit()
    got = torch.load(out)
    assert len(got["docs"]) == 16
    # one process, the same 16 documents in rank order, padded to the longest
    width = max(len(ids) for ids, _ in got["docs"])
    ids = torch.zeros(16, width, dtype=torch.long)
    mask = torch.zeros(16, width, dtype=torch.long)
    for i, (doc, _) in enumerate(got["docs"]):
        ids[i, :len(doc)], mask[i, :len(doc)] = torch.tensor(doc), 1
    labels = torch.tensor([y for _, y in got["docs"]])
    torch.manual_seed(0)
    net = TextClassifier.from_encoder(tiny_model_dir, 2, "cls", dropout=0.0)
    logits, emb = net(ids, mask)
    obj, loss = step_objective(WeightedCrossEntropy(), GraphLoss(GLoss(2, sigma=0.5, gamma=0.5)), logits, emb,
                               labels, lam=0.7, ctx=StepContext(mask_seed=11))
    loss.backward()
    assert got["total"] == pytest.approx(obj.total.item(), rel=1e-5)
    assert got["aux"] == pytest.approx(obj.aux.item(), rel=1e-5)
    head = next(p for p in net.head.parameters() if p.dim() == 2)
    np.testing.assert_allclose(got["head_grad"], head.grad, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got["emb_grad"], net.encoder.embeddings.word_embeddings.weight.grad,
                               rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- bad input: one line, on the driver
def _one_line_error(capsys, args) -> str:
    code = cli.main(args)
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines()
             if ln.startswith("gloss-ray:") or not re.match(r"^(\x1b\[[\d;]*m)*\(|^\s|^[\d-]+ [\d:,]+\s", ln)]
    lines = [ln for ln in lines if ln.startswith("gloss-ray")]
    assert code == 2 and len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("case, expected", [
    ("missing column", r"train\.parquet: column 'text' not found \(columns: sentence, label\); use --text-column"),
    ("empty file", r"train\.parquet: (no data rows|cannot read)"),
    ("unseen label", r"validation\.parquet: label 'other' does not occur in the training split"),
    ("blank text", r"train\.parquet: empty text in column 'text' in 1 row\(s\)"),
])
def test_bad_input_is_one_line_before_any_worker_starts(ray_local, tiny_model_dir, tmp_path, capsys, case, expected):
    train = pd.DataFrame({"text": ["good film", "bad film", "fine", "awful"] * 8, "label": ["pos", "neg"] * 16})
    val = train.head(4).copy()
    if case == "missing column":
        train = train.rename(columns={"text": "sentence"})
    if case == "empty file":
        train = train.head(0)
    if case == "unseen label":
        val.loc[0, "label"] = "other"
    if case == "blank text":
        train.loc[3, "text"] = "  "
    train.to_parquet(tmp_path / "train.parquet", index=False)
    val.to_parquet(tmp_path / "validation.parquet", index=False)
    files = {"train": str(tmp_path / "train.parquet"), "validation": str(tmp_path / "validation.parquet"),
             "test": str(tmp_path / "validation.parquet")}
    err = _one_line_error(capsys, _args(files, tiny_model_dir, tmp_path / "runs", "bad"))
    assert re.search(expected, err), err
    assert not (tmp_path / "runs" / "bad").exists()       # nothing started, nothing written


def test_an_unreachable_uri_is_one_line(ray_local, moto_server, tiny_model_dir, tmp_path, capsys):
    files = {s: f"s3://no-such-bucket-gloss/{s}.parquet" for s in ("train", "validation", "test")}
    err = _one_line_error(capsys, _args(files, tiny_model_dir, tmp_path / "runs", "bad"))
    assert "s3://no-such-bucket-gloss/train.parquet: bucket 'no-such-bucket-gloss' not found" in err
