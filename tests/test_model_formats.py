"""A saved model folder loads, silently and as trained, in sentence-transformers, transformers
(``AutoModelForSequenceClassification`` and ``pipeline``) and gloss-ray's own predict / embed; it
carries a model card; older folders still work in gloss-ray."""
import contextlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from gloss_ray import cli
from gloss_ray.inference import embed_file, predict_file
from gloss_ray.model import LEGACY_HEAD_FILE, META_FILE, TextClassifier, load_tokenizer

CLASSES = ["negative", "neutral", "positive"]
WORDS = {"negative": "dull boring awful tedious bad", "neutral": "plain average ordinary usual fine",
         "positive": "wonderful moving great superb fun"}
TEXTS = ["a wonderful , moving film", "boring", "an ordinary film with an average plot and plain acting",
         "superb fun " * 30]  # the last one is longer than --max-length: every loader must truncate alike
MAX_LENGTH = 24


@contextlib.contextmanager
def no_warnings():
    """Fail on any Python warning or any transformers / sentence-transformers log at WARNING or above."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name}: {record.getMessage()}")

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("transformers", "sentence_transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        records += [f"{w.category.__name__}: {w.message}" for w in caught]
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert not records, "\n".join(records)


def _corpus(tmp: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = CLASSES[i % 3]
        words = rng.choice(WORDS[label].split(), size=int(rng.integers(2, 8))).tolist()
        rows.append({"text": " ".join(words + rng.choice(["a film", "the plot", "acting"], size=2).tolist()), "label": label})
    path = tmp / f"corpus{seed}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def run(ray_local, tiny_model_dir, tmp_path_factory):
    """One tiny training run through the CLI (1 epoch, 1-layer random BERT)."""
    tmp = tmp_path_factory.mktemp("formats")
    code = cli.main(["train", "--train-file", str(_corpus(tmp, 48, 0)), "--test-file", str(_corpus(tmp, 15, 1)),
                     "--model", tiny_model_dir, "--loss", "gloss", "--epochs", "1", "--batch-size", "16",
                     "--max-length", str(MAX_LENGTH), "--storage", str(tmp), "--name", "fmt", "--no-progress",
                     "--max-failures", "0"])
    assert code == 0
    texts = tmp / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    return {"dir": tmp / "fmt", "model": tmp / "fmt" / "model", "texts": texts, "tmp": tmp}


@pytest.fixture(scope="module")
def ours(run):
    """gloss-ray's own predict / embed on the saved folder (defaults, as the CLI's user gets them)."""
    pred = pd.read_csv(predict_file(str(run["model"]), str(run["texts"]), str(run["tmp"] / "p.csv")))
    emb = np.load(embed_file(str(run["model"]), str(run["texts"]), str(run["tmp"] / "e.npy")))
    return pred, emb


pytestmark = pytest.mark.ray


def test_sentence_transformers_encode_equals_gloss_ray_embed(run, ours):
    from sentence_transformers import SentenceTransformer

    with no_warnings():
        st = SentenceTransformer(str(run["model"]), device="cpu")
        got = st.encode(TEXTS, convert_to_numpy=True)
    assert st.max_seq_length == MAX_LENGTH
    assert got.shape == ours[1].shape == (len(TEXTS), 32)
    np.testing.assert_allclose(got, ours[1], atol=1e-5, rtol=0)


def test_transformers_classifier_and_pipeline_equal_gloss_ray_predict(run, ours):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    pred = ours[0]
    with no_warnings():
        model = AutoModelForSequenceClassification.from_pretrained(run["model"]).eval()
        tok = AutoTokenizer.from_pretrained(run["model"])
        classify = pipeline("text-classification", model=str(run["model"]), device="cpu")
    assert model.config.id2label == dict(enumerate(CLASSES))
    assert model.config.label2id == {c: i for i, c in enumerate(CLASSES)}
    with torch.no_grad():
        prob = model(**tok(TEXTS, padding=True, truncation=True, return_tensors="pt")).logits.softmax(-1)
    assert [CLASSES[i] for i in prob.argmax(-1).tolist()] == pred["label"].tolist()
    np.testing.assert_allclose(prob.max(-1).values.numpy(), pred["confidence"].to_numpy(), atol=1e-5, rtol=0)
    with no_warnings():
        top = classify(TEXTS, truncation=True)
        every = classify(TEXTS, truncation=True, top_k=None)
    assert [t["label"] for t in top] == pred["label"].tolist()
    np.testing.assert_allclose([t["score"] for t in top], pred["confidence"].to_numpy(), atol=1e-5, rtol=0)
    for row, p in zip(every, prob.numpy()):
        np.testing.assert_allclose([{d["label"]: d["score"] for d in row}[c] for c in CLASSES], p, atol=1e-5, rtol=0)


def test_gloss_ray_loads_its_folder_with_no_load_report(run, capfd):
    with no_warnings():
        model = TextClassifier.from_pretrained(run["model"])
    assert model.label_names == CLASSES and model.pooling == "cls"
    assert "LOAD REPORT" not in capfd.readouterr().err
    assert cli.main(["embed", "--model-dir", str(run["model"]), "--input", str(run["texts"]),
                     "--output", str(run["tmp"] / "cli.npy")]) == 0
    assert "LOAD REPORT" not in capfd.readouterr().err
    assert np.load(run["tmp"] / "cli.npy").shape == (len(TEXTS), 32)


def test_model_card(run):
    text = (run["model"] / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"
    assert {"gloss-ray", "gloss", "sentence-transformers"} <= set(meta["tags"])
    assert "base_model" not in meta          # a local folder is not a hub id
    m = json.loads((run["dir"] / "metrics.json").read_text())
    results = {x["type"]: x["value"] for r in meta["model-index"][0]["results"] for x in r["metrics"]}
    assert results["accuracy"] == pytest.approx(m["test_accuracy"], abs=1e-4)
    assert results["f1"] == pytest.approx(m["test_macro_f1"], abs=1e-4)
    assert f"| macro-F1 | {m['test_macro_f1']:.4f} |" in text
    assert "| `gamma` | `0.7` |" in text and "| `lam` | `0.5` |" in text
    assert "gloss-ray train --train-file" in text and "--max-length 24" in text  # the command that made it


def test_model_card_without_command_or_test_split(tiny_model_dir):
    from gloss_ray.config import TrainConfig
    from gloss_ray.model_card import render

    cfg = TrainConfig(benchmark="mr", model=None, loss="scl")
    text = render(cfg, {"benchmark": "mr", "best_epoch": 1, "epochs_run": 1}, ["negative", "positive"])
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and "model-index" not in meta
    assert "not recorded" in text and "| accuracy | n/a |" in text and "| `temperature` | `0.07` |" in text
    assert yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])["loss"] == "scl"   # reusable as --config



def test_model_card_sections_and_dense_graph():
    """The card's sections in order; the dense batch graph (k None) shows as options.DENSE."""
    from gloss_ray.config import TrainConfig
    from gloss_ray.model_card import loss_settings, render
    from gloss_ray.options import DENSE

    cfg = TrainConfig(benchmark="r8", model=None, loss="gloss", k=None)
    assert loss_settings(cfg)["k"] == DENSE
    text = render(cfg, {"benchmark": "r8", "test_accuracy": 0.9, "test_macro_f1": 0.8}, ["a", "b"])
    assert text.startswith("---\n") and "\n---\n\n# r8 text classifier (gloss, gloss-ray)\n" in text
    assert [ln for ln in text.splitlines() if ln.startswith("## ")] == [
        "## Results (test split)", "## Training", "## Usage"]
    assert f"| `k` | `{DENSE}` |" in text and "| accuracy | 0.9000 |" in text


# --------------------------------------------------------------------------------- no Ray below
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_forward_equals_the_saved_folder(tiny_model_dir, tmp_path, pooling):
    """Training-time forward == transformers' logits and sentence-transformers' embeddings, both poolings."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForSequenceClassification

    with no_warnings():                      # a new head on an encoder checkpoint is no surprise
        model = TextClassifier.from_encoder(tiny_model_dir, 2, pooling).eval()
    tok = load_tokenizer(tiny_model_dir)
    model.save_pretrained(tmp_path, tok, ["no", "yes"], max_length=MAX_LENGTH)
    b = tok(TEXTS, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        logits, emb = model(b["input_ids"], b["attention_mask"])
        with no_warnings():
            hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
            st = SentenceTransformer(str(tmp_path), device="cpu")
        torch.testing.assert_close(hf(**b).logits, logits, atol=1e-6, rtol=0)
    np.testing.assert_allclose(st.encode(TEXTS), emb.numpy(), atol=1e-5, rtol=0)


def test_every_parameter_trains_and_the_head_is_the_classifier_only_part(tiny_model_dir):
    """DDP needs a gradient for every parameter; ``head`` (--head-lr) = pooler + classifier."""
    model = TextClassifier.from_encoder(tiny_model_dir, 3).train()
    tok = load_tokenizer(tiny_model_dir)
    b = tok(TEXTS[:2], padding=True, return_tensors="pt")
    logits, emb = model(b["input_ids"], b["attention_mask"])
    assert logits.shape == (2, 3) and emb.shape == (2, model.encoder.config.hidden_size)
    (logits.sum() + emb.sum()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    head = {id(p) for p in model.head.parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in head}
    assert names == {"model.bert.pooler.dense.weight", "model.bert.pooler.dense.bias",
                     "model.classifier.weight", "model.classifier.bias"}


def test_a_pre_release_folder_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    """A folder of gloss-ray's pre-release format (encoder without pooler, head.safetensors) is not read."""
    from safetensors.torch import save_file

    from gloss_ray import cli

    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in torch.nn.Linear(32, 2).state_dict().items()}, tmp_path / LEGACY_HEAD_FILE)
    (tmp_path / META_FILE).write_text(json.dumps({"pooling": "cls", "num_classes": 2, "label_names": ["neg", "pos"],
                                                  "format": "gloss-ray/1"}))
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS[:3]) + "\n")
    assert cli.main(["predict", "--model-dir", str(tmp_path), "--input", str(texts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pre-release format (head.safetensors" in err[0] and "retrain" in err[0], err


def test_encode_keeps_no_batch_activations_alive():
    """A CLS embedding is a view into the batch's last hidden state: ``encode`` must copy it, or every
    batch's whole hidden state stays alive until the end (4.9 GB when a worker encoded 50k documents)."""
    import weakref

    import torch

    from gloss_ray.model import encode

    class Viewing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bases, self.alive = [], []

        def forward(self, input_ids, attention_mask):
            self.alive.append(sum(ref() is not None for ref in self.bases))
            hidden = torch.randn(input_ids.shape[0], input_ids.shape[1], 8)
            self.bases.append(weakref.ref(hidden))
            return hidden[:, 0, :3], hidden[:, 0]

    batches = [{"input_ids": torch.zeros(4, 16, dtype=torch.long), "attention_mask": torch.ones(4, 16)}] * 6
    for given in (batches, iter(batches)):      # row count known (one output buffer) / unknown (copies)
        net = Viewing()
        logits, emb = encode(net, given, torch.device("cpu"))
        assert logits.shape == (24, 3) and emb.shape == (24, 8)
        assert max(net.alive) <= 1          # at most the previous batch's, still bound to the loop variables


def test_encode_fills_one_buffer_in_order_when_the_loader_is_sized():
    """A DataLoader over a sized dataset: the rows come back in order and equal the unsized path's."""
    import torch
    from torch.utils.data import DataLoader

    from gloss_ray.model import _row_count, encode

    class Rowwise(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            x = input_ids.float()
            return x[:, :2] * 2, x

    rows = [{"input_ids": torch.full((5,), i), "attention_mask": torch.ones(5)} for i in range(11)]
    loader = DataLoader(rows, batch_size=4)
    assert _row_count(loader) == 11 and _row_count(iter(loader)) is None
    logits, emb = encode(Rowwise(), loader, torch.device("cpu"))
    assert torch.equal(emb[:, 0], torch.arange(11.0))
    ref_logits, ref_emb = encode(Rowwise(), iter(loader), torch.device("cpu"))
    assert torch.equal(emb, ref_emb) and torch.equal(logits, ref_logits)
