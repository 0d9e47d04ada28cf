"""Experiment tracking (``--report-to``, :mod:`gloss_ray.train.tracking`) and per-step metrics
(``--log-every``), read back from the trackers' own stores: MLflow with ``MlflowClient`` (a local
sqlite store), TensorBoard with tensorboard's event reader, W&B from its offline run file. One short
run (a 1-layer random BERT, 64 mr documents, 2 epochs of 4 steps, schedules on lambda, sigma and k)
feeds most tests; a ``gloss-ray tune`` of two trials checks one MLflow run per trial under the sweep's
experiment, logged from the Ray Train workers."""
import csv
import glob
import importlib.util
import json
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from gloss_ray import cli
from gloss_ray.config import TrainConfig
from gloss_ray.schedules import Schedule, int_schedule_value

HAVE_WANDB = importlib.util.find_spec("wandb") is not None     # in the test extra; W&B untested without it
TRACKERS = "mlflow,tensorboard" + (",wandb" if HAVE_WANDB else "")
SCHEDULES = dict(lam_schedule="cosine", sigma_schedule={"kind": "cosine", "start": 0.5}, k=6, k_schedule="cosine")


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


@pytest.fixture(scope="module")
def run(tiny_model_dir, data_dir, tmp_path_factory):
    """One tracked run in this process (LocalSession): every tracker, a row every 2 steps, the model logged."""
    from gloss_ray.train.loop import train
    from gloss_ray.train.session import LocalSession

    root = tmp_path_factory.mktemp("tracked")
    mode = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"                # no account, no network: files under the run's folder
    cfg = TrainConfig(benchmark="mr", data_dir=str(data_dir), model=tiny_model_dir, loss="gloss", epochs=2,
                      max_train=64, max_eval=16, max_length=16, batch_size=16, progress=False, storage=str(root),
                      name="tracked", cache_dir=str(root / "tok"), report_to=TRACKERS,
                      log_every=2, log_model=True, patience=10, **SCHEDULES)
    try:
        train(cfg, LocalSession(str(root / "tracked"), device="cpu"))
    finally:
        os.environ.pop("WANDB_MODE") if mode is None else os.environ.update(WANDB_MODE=mode)
    return root / "tracked", cfg


def _mlflow_run(run_dir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.parent}/mlflow.db")
    exp = client.get_experiment_by_name("gloss-ray")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_mlflow_holds_the_runs_params_tags_and_step_and_epoch_metric_histories(run):
    run_dir, cfg = run
    client, r = _mlflow_run(run_dir)
    assert r.data.params["loss"] == "gloss" and float(r.data.params["lr"]) == cfg.lr
    assert r.data.params["k_schedule"] == "cosine" and r.data.params["report_to"] == TRACKERS
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
    assert r.data.tags["benchmark"] == "mr" and r.data.tags["loss"] == "gloss" and r.data.tags["seed"] == "0"
    assert r.data.tags["git_commit"].startswith(head) and r.data.tags["mlflow.source.git.commit"].startswith(head)
    steps = _rows(run_dir / "steps.csv")
    loss = client.get_metric_history(r.info.run_id, "step/train_loss")
    assert [m.step for m in loss] == [2, 4, 6, 8] == [int(s["step"]) for s in steps]
    assert [m.value for m in loss] == pytest.approx([float(s["train_loss"]) for s in steps])
    history = _rows(run_dir / "history.csv")
    val = client.get_metric_history(r.info.run_id, "val_macro_f1")
    assert [m.step for m in val] == [4, 8]
    assert [m.value for m in val] == pytest.approx([float(h["val_macro_f1"]) for h in history])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert r.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert r.info.status == "FINISHED"


def test_mlflow_artifacts_are_the_report_files_and_the_model_folder(run, tmp_path):
    run_dir, _ = run
    client, r = _mlflow_run(run_dir)
    names = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert names == {"metrics.json", "history.csv", "steps.csv", "plots", "model"}
    assert "model/config.json" in {a.path for a in client.list_artifacts(r.info.run_id, "model")}
    got = client.download_artifacts(r.info.run_id, "metrics.json", str(tmp_path))
    assert json.loads(Path(got).read_text()) == json.loads((run_dir / "metrics.json").read_text())


def test_tensorboard_event_files_hold_the_step_and_epoch_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    steps = _rows(run_dir / "steps.csv")
    lam = events.Scalars("step/lam")
    assert [e.step for e in lam] == [2, 4, 6, 8]
    assert [e.value for e in lam] == pytest.approx([float(s["lam"]) for s in steps], rel=1e-6)
    assert [e.step for e in events.Scalars("val_accuracy")] == [4, 8]


def _wandb_records(path: str) -> list:
    """The records of a W&B run file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    chunks (7-byte header: crc32, length, type full/first/middle/last) hold protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, part, out = Path(path).read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
    return out


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (pip install -e '.[track]')")
def test_wandb_offline_run_records_the_step_rows_and_the_config(run):
    run_dir, cfg = run
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    records = _wandb_records(files[0])
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
            if r.WhichOneof("record_type") == "history"]
    assert [r["_step"] for r in rows if "step/train_loss" in r] == [2, 4, 6, 8]
    assert [r["step/train_loss"] for r in rows if "step/train_loss" in r] == pytest.approx(
        [float(s["train_loss"]) for s in _rows(run_dir / "steps.csv")])
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for i in r.run.config.update}
    assert config["lr"] == cfg.lr and config["loss"] == "gloss"
    logged = {c.path for r in records if r.WhichOneof("record_type") == "artifact"
              for c in r.artifact.manifest.contents}
    assert {"metrics.json", "history.csv", "steps.csv", "plots/training_curves.png", "model/config.json"} <= logged


def test_step_rows_record_lambda_sigma_and_k_as_scheduled_at_their_step(run):
    """Not the configured values: a cosine lambda, sigma multiplier and k move from row to row; the
    epoch rows of history.csv carry the values of their epoch's last step."""
    run_dir, cfg = run
    steps = _rows(run_dir / "steps.csv")
    sigma0 = json.loads((run_dir / "local_checkpoint" / "state.json").read_text())["sigma"]  # calibrated (root)
    total = 8
    lam, scale, k = (Schedule.parse(cfg.lam_schedule, default_value=cfg.lam),
                     Schedule.parse(cfg.sigma_schedule, default_value=1.0),
                     Schedule.parse(cfg.k_schedule, default_value=float(cfg.k)))
    for row in steps:
        p = (int(row["step"]) - 1) / total
        assert float(row["lam"]) == pytest.approx(lam(p))
        assert float(row["sigma"]) == pytest.approx(sigma0 * scale(p))
        assert int(row["k"]) == int_schedule_value(k, p)
    assert len({row["lam"] for row in steps}) == 4 and len({row["sigma"] for row in steps}) == 4
    assert len({row["k"] for row in steps}) > 1
    for h in _rows(run_dir / "history.csv"):
        last = next(s for s in steps if int(s["step"]) == 4 * int(h["epoch"]))
        assert (h["lam"], h["sigma"], h["k"]) == (last["lam"], last["sigma"], last["k"])
    assert all(float(row["docs_per_s"]) > 0 and float(row["lr"]) > 0 for row in steps[:-1])


# --------------------------------------------------------------------------- bad input, before Ray starts
def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gloss-ray: error:"), lines
    return lines[0]


def test_an_unknown_tracker_is_refused_naming_the_choices(capsys):
    line = _error(capsys, ["train", "--benchmark", "mr", "--report-to", "mlflow,comet"])
    assert "report_to" in line and "mlflow, tensorboard, wandb" in line


def test_mlflow_without_a_tracking_uri_needs_a_local_storage(capsys, tiny_model_dir, data_dir):
    line = _error(capsys, ["train", "--benchmark", "mr", "--data-dir", str(data_dir), "--model", tiny_model_dir,
                           "--report-to", "mlflow", "--storage", "s3://bucket/runs"])
    assert "--tracking-uri" in line and "s3://bucket/runs" in line


def test_tune_refuses_step_checkpoints(capsys, tiny_model_dir, data_dir, tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text("metric: train_loss\nmode: min\nloss: gloss\nparams:\n  lr: {loguniform: [1.0e-5, 1.0e-3]}\n")
    line = _error(capsys, ["tune", "--benchmarks", "mr", "--losses", "gloss", "--space", str(space),
                           "--storage", str(tmp_path), "--set", f"model={tiny_model_dir}",
                           "--set", f"data_dir={data_dir}", "--set", "checkpoint_every=5"])
    assert "checkpoint_every" in line and "tune" in line


# --------------------------------------------------------------------------- a sweep
@pytest.mark.ray
def test_a_sweep_logs_one_mlflow_run_per_trial_and_per_final_run_under_one_experiment(ray_local, tiny_model_dir,
                                                                                      data_dir, tmp_path):
    from mlflow import MlflowClient

    space = tmp_path / "s.yaml"
    space.write_text("metric: train_loss\nmode: min\nloss: gloss\nparams:\n  lr: {loguniform: [1.0e-5, 1.0e-3]}\n")
    sets = {"model": tiny_model_dir, "data_dir": str(data_dir), "max_train": 32, "max_eval": 16, "max_length": 16,
            "batch_size": 16, "epochs": 1, "progress": "false", "cpus_per_worker": 1, "log_every": 1}
    argv = ["tune", "--benchmarks", "mr", "--losses", "gloss", "--space", str(space), "--samples", "2",
            "--search-alg", "random", "--scheduler", "fifo", "--seeds", "1", "--concurrency", "2",
            "--storage", str(tmp_path), "--name", "sw", "--report-to", "mlflow",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    assert cli.main(argv) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("sw")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags["stage"], []).append(r)
    assert sorted(by_stage) == ["final", "report", "trial"] and len(by_stage["final"]) == 1
    trials = json.loads((tmp_path / "sw" / "search" / "mr__gloss" / "trials.json").read_text())
    assert sorted(r.data.tags["trial_id"] for r in by_stage["trial"]) == sorted(t["trial_id"] for t in trials)
    for r in by_stage["trial"]:
        lr = client.get_metric_history(r.info.run_id, "step/lr")
        assert [m.step for m in lr] == [1, 2] and float(r.data.params["lr"]) == pytest.approx(
            next(t["config"]["lr"] for t in trials if t["trial_id"] == r.data.tags["trial_id"]))
    report = by_stage["report"][0]
    assert "report/report.md" in {a.path for a in client.list_artifacts(report.info.run_id, "report")}
    assert re.search(r"\| mr \| gloss \|", (tmp_path / "sw" / "report" / "report.md").read_text())
