"""Training throughput figures (issue 26): model FLOPs, the device peak, the rates. No Ray."""
import json

import pytest
import torch

from gloss_ray import throughput as T
from gloss_ray.train.loop import run_throughput


def test_model_flops_count_linear_weights_and_attention(tiny_model_dir):
    from gloss_ray.model import TextClassifier

    enc = TextClassifier.from_encoder(tiny_model_dir, 2).encoder
    P, L, H = T.matmul_flops(enc)
    # 1 layer, hidden 32, feed-forward 64: Q, K, V, O (4 x 32 x 32) + up and down (2 x 32 x 64); no pooler
    assert (P, L, H) == (4 * 32 * 32 + 2 * 32 * 64, 1, 32)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert T.step_flops(mask, P, L, H) == 6 * P * 7 + 12 * L * H * (9 + 16)


def test_rates_and_padding():
    sums = {"tokens": 600.0, "padded_tokens": 800.0, "docs": 20.0, "flops": 4e9, "seconds": 2.0}
    r = T.Meter.rates(sums, peak=1e9, devices=2)
    assert r == pytest.approx({"tokens_per_s": 300.0, "docs_per_s": 10.0, "mfu": 1.0, "padding": 0.25})
    history = [{f"train_{k}": v for k, v in sums.items()}, {f"train_{k}": v for k, v in sums.items()}]
    run = run_throughput(history, 4e9, "probe:x", 1)
    assert run["train_tokens_per_s"] == pytest.approx(300.0) and run["train_mfu"] == pytest.approx(0.5)


def test_cpu_peak_is_probed_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(T, "probe_peak", lambda device: calls.append(device) or 5e10)
    assert T.peak_flops("cpu")[0] == 5e10 and T.peak_flops("cpu")[0] == 5e10
    assert len(calls) == 1
    saved = json.loads((tmp_path / ".cache" / "gloss_ray" / "peak_flops.json").read_text())
    assert list(saved.values()) == [5e10]


def test_known_gpus_come_from_the_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert T.peak_flops(torch.device("cuda")) == (989e12, "table:H100")


def test_the_probe_measures_a_matmul():
    assert 1e8 < T.probe_peak(torch.device("cpu"), size=256, repeats=1) < 1e14


def test_a_run_records_throughput_and_shows_refresh_progress(data_dir, tiny_model_dir, tmp_path, monkeypatch, capfd):
    """history.csv holds each epoch's training tokens/s, docs/s and MFU; the run's figures are in
    ``state["throughput"]``; the global graph's refresh shows a progress bar over its documents."""
    import csv

    from gloss_ray.config import TrainConfig
    from gloss_ray.train import loop
    from gloss_ray.train.session import LocalSession

    monkeypatch.setattr(loop, "peak_flops", lambda device: (1e12, "test"))
    seen = {}
    finish = loop.finish
    monkeypatch.setattr(loop, "finish", lambda cfg, session, model, data, state, *a, **k:
                        seen.update(state["throughput"]) or finish(cfg, session, model, data, state, *a, **k))
    cfg = TrainConfig(benchmark="mr", data_dir=str(data_dir), model=tiny_model_dir, loss="gloss", epochs=1,
                      max_train=96, max_eval=16, max_length=16, batch_size=16, max_steps=2, global_k=4,
                      progress=True, storage=str(tmp_path), name="speed")
    loop.train(cfg, LocalSession(str(tmp_path / "speed")))
    out, err = capfd.readouterr()
    assert "refresh: encode 96 docs: 100%" in err and "tokens/s" in out and "MFU" in out
    row = next(csv.DictReader(open(tmp_path / "speed" / "history.csv")))
    assert float(row["train_docs"]) == 32 and float(row["train_seconds"]) > 0
    assert 16 <= float(row["train_tokens"]) <= float(row["train_padded_tokens"]) <= 32 * 16
    assert float(row["train_tokens_per_s"]) == pytest.approx(float(row["train_tokens"]) / float(row["train_seconds"]))
    assert 0 < float(row["train_mfu"]) < 1
    assert seen["train_tokens_per_s"] == pytest.approx(float(row["train_tokens_per_s"]))
    assert seen["device_peak_source"] == "test"
