"""Credentials in a URI (``s3://KEY:SECRET@bucket/...``) work where a URI is taken, but never
reach what gloss-ray writes or prints: metrics.json, the model card, JSON files, log lines.
(A whole run on S3 with credentials in its URIs: ``tests/test_s3.py``.)"""
import json

from gloss_ray.config import TrainConfig

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"
URI = f"s3://AKIDEXAMPLE:{SECRET}@bucket"


def test_redact_replaces_the_credentials_of_every_uri_and_keeps_the_rest():
    from gloss_ray.storage import redact

    assert redact(f"{URI}/runs and gs://token@b/x, /tmp/x, user@host") == \
        "s3://***@bucket/runs and gs://***@b/x, /tmp/x, user@host"
    assert redact({"a": [f"{URI}/x", 1], "b": None}) == {"a": ["s3://***@bucket/x", 1], "b": None}


def test_metrics_json_and_the_model_card_hold_no_credentials(tiny_model_dir, tmp_path):
    from gloss_ray.model import TextClassifier, load_tokenizer
    from gloss_ray.train.outputs import write_outputs

    cfg = TrainConfig(train_file=f"{URI}/data/train.csv", test_file=f"{URI}/data/test.csv", storage=f"{URI}/runs",
                      model=tiny_model_dir, name="r",
                      command=f"gloss-ray train --train-file {URI}/data/train.csv --storage {URI}/runs")
    final = {"benchmark": "train", "loss": "gloss", "seed": 0, "best_epoch": 1, "best_val_macro_f1": 0.5,
             "epochs_run": 1, "num_workers": 1, "test_accuracy": 0.5, "test_macro_f1": 0.5}
    history = [{"epoch": 1, "train_loss": 0.7, "train_ce": 0.7, "train_aux": 0.1, "val_accuracy": 0.5,
                "val_macro_f1": 0.5}]
    write_outputs(cfg, str(tmp_path / "run"), final, history, TextClassifier.from_encoder(tiny_model_dir, 2),
                  load_tokenizer(tiny_model_dir), ["neg", "pos"], None, None)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {"metrics.json", "README.md"} <= {p.name for p in files}
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["train_file"] == "s3://***@bucket/data/train.csv"
    assert "--storage s3://***@bucket/runs" in metrics["config"]["command"]
    assert "--storage s3://***@bucket/runs" in (tmp_path / "run" / "model" / "README.md").read_text()


def test_json_files_and_sweep_log_lines_hold_no_credentials(tmp_path, capsys):
    from gloss_ray.storage import write_json
    from gloss_ray.log import say

    write_json(str(tmp_path / "t.json"), {"storage": f"{URI}/sweeps", "trials": [{"error": f"{URI}/x: denied"}]})
    assert SECRET not in (tmp_path / "t.json").read_text()
    say(f"bench mr x ce -> {URI}/sweeps/s1")
    assert capsys.readouterr().out == "[gloss-ray] bench mr x ce -> s3://***@bucket/sweeps/s1\n"
