"""The CUDA paths: G-Loss, the exact kNN graph, the bf16 encoder and the whole loop on a GPU.

Deselected by default (``-m 'not gpu'`` in pyproject.toml) and skipped without CUDA:

    python -m pytest -m gpu tests/test_gpu.py
    bash benchmarks/gpu_suite.sh          # runs these first on a GPU machine
"""
import csv

import pytest
import torch

from gloss_ray.config import TrainConfig
from gloss_ray.graph.index import exact_knn_torch, recall_at_k
from synthetic import clustered_unit_vectors
from gloss_ray.losses import GLoss

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def test_gloss_loss_and_gradient_on_cuda_equal_cpu():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (128,), generator=g)
    results = []
    for device in ("cpu", CUDA):
        emb = x.to(device).requires_grad_()
        loss = GLoss(5, sigma=0.4, gamma=0.7, k=16).to(device)(emb, y.to(device),
                                                              generator=torch.Generator().manual_seed(3))
        loss.backward()
        results.append((loss.item(), emb.grad.cpu()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-9)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-10)


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_exact_knn_graph_on_cuda_matches_cpu(dtype):
    x, _ = clustered_unit_vectors(20_000, 64, 20, seed=1)
    cpu = exact_knn_torch(x, x, 16, exclude_self=True)
    gpu = exact_knn_torch(x.to(CUDA), x.to(CUDA), 16, exclude_self=True, dtype=dtype)
    # the same neighbour sets (fp16 may swap near-ties at the k-th place), the same scores
    assert recall_at_k(gpu.ids.cpu(), cpu.ids) > (0.999 if dtype is None else 0.98)
    assert torch.allclose(gpu.scores.cpu(), cpu.scores, atol=1e-5 if dtype is None else 2e-3)


def test_encoder_under_bf16_autocast_agrees_with_float32(tiny_model_dir):
    from gloss_ray.model import TextClassifier, autocast, load_tokenizer

    model = TextClassifier.from_encoder(tiny_model_dir, 3).eval()
    batch = load_tokenizer(tiny_model_dir)(["a short text", "another, somewhat longer text"] * 8,
                                           padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_logits, ref_emb = model(batch["input_ids"], batch["attention_mask"])
        model.to(CUDA)
        with autocast(CUDA):
            logits, emb = model(batch["input_ids"].to(CUDA), batch["attention_mask"].to(CUDA))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert torch.allclose(logits.float().cpu(), ref_logits, atol=5e-2)
    assert torch.nn.functional.cosine_similarity(emb.float().cpu(), ref_emb).min() > 0.99


def test_whole_loop_on_cuda_with_global_graph(data_dir, tiny_model_dir, tmp_path):
    """One plain-process run on the GPU: G-Loss plus the global graph (bank in fp16 on the GPU,
    torch-exact kNN on the GPU), checkpoint, test, outputs."""
    from gloss_ray.train.loop import train
    from gloss_ray.train.session import LocalSession

    cfg = TrainConfig(benchmark="mr", data_dir=str(data_dir), model=tiny_model_dir, loss="gloss", epochs=2,
                      max_train=256, max_eval=64, max_length=32, batch_size=32, global_k=4, index="torch-exact",
                      progress=False, storage=str(tmp_path), name="cuda", cache_dir=str(tmp_path / "tok"))
    final = train(cfg, LocalSession(str(tmp_path / "cuda")))
    assert final["device"] == "cuda" and final["epochs_run"] == 2 and final["skipped_steps"] == 0
    rows = list(csv.DictReader(open(tmp_path / "cuda" / "history.csv")))
    assert all(float(r["recall_at_k"]) == pytest.approx(1.0) for r in rows)
    assert 0.0 <= final["test_accuracy"] <= 1.0 and (tmp_path / "cuda" / "model" / "config.json").exists()
