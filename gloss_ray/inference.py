"""Classify or embed a file of texts with a saved gloss-ray model (``gloss-ray predict`` / ``embed``).

The numbers are those of the saved folder loaded by the ecosystem: ``predict``'s labels and
confidences are ``AutoModelForSequenceClassification`` / ``pipeline("text-classification")``'s
softmax, ``embed``'s vectors ``SentenceTransformer(model_dir).encode``'s (see ``gloss_ray.model``).
``max_length=None`` truncates where the model was trained (and where sentence-transformers does)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import DataError
from .data import PadCollator
from .model import DEFAULT_MAX_LENGTH, TextClassifier, encode, token_budget_batches


def read_texts(path: str, text_column: str = "text") -> list[str]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"--input: file not found: {p}")
    if p.suffix == ".txt":
        texts = p.read_text(encoding="utf-8").splitlines()
    else:
        readers = {".csv": pd.read_csv, ".jsonl": lambda f: pd.read_json(f, lines=True), ".parquet": pd.read_parquet}
        if p.suffix not in readers:
            raise DataError(f"{p}: unsupported file type {p.suffix!r} (use .txt, .csv, .jsonl or .parquet)")
        try:
            frame = readers[p.suffix](p)
        except pd.errors.EmptyDataError:
            raise DataError(f"{p}: holds no texts (the file is empty)") from None
        if text_column not in frame.columns:
            raise DataError(f"{p}: column {text_column!r} not found (columns: {', '.join(map(str, frame.columns))}); use --text-column")
        texts = frame[text_column].tolist()
    if not texts:
        raise DataError(f"{p}: holds no texts (the file is empty)")
    empty = [i + 1 for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise DataError(f"{p}: empty text in row(s) {', '.join(map(str, empty[:5]))}")
    return texts


def _run(model_dir: str, texts: list[str], batch_size: int, max_length: int | None, what: str):
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()    # loading takes a moment; the progress worth showing is the encoding's
    model = TextClassifier.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    max_length = max_length or model.meta.get("max_length") or DEFAULT_MAX_LENGTH
    # a progress bar (stderr) over the texts encoded, when there is more than one batch
    with tqdm(total=len(texts), desc=what, unit="text", disable=len(texts) <= batch_size) as progress:
        logits, embs = encode(model, _batches(tok, texts, batch_size * max_length, max_length), torch.device("cpu"),
                              rows=len(texts), progress=progress)
    return model, logits, embs


def _batches(tok, texts: list[str], max_tokens: int, max_length: int):
    """Tokenised batches of ``texts`` in order of length, ``max_tokens`` padded tokens at most
    (:func:`~gloss_ray.model.token_budget_batches`), right-padded as in training, each with the
    ``position`` of its texts (where :func:`~gloss_ray.model.encode` puts their outputs)."""
    ids = tok(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    collate = PadCollator(tok.pad_token_id)
    for rows in token_budget_batches([len(x) for x in ids], max_tokens):
        batch = collate([{"input_ids": ids[i], "attention_mask": [1] * len(ids[i])} for i in rows])
        batch["position"] = torch.tensor(rows, dtype=torch.long)
        yield batch


def predict_file(model_dir, input_path, output=None, text_column="text", batch_size=64, max_length=None,
                 graph=False) -> Path:
    """Labels and confidences of the texts in ``input_path``: the classifier's softmax, or with ``graph``
    the blend of the classifier with propagation over the training corpus that the run chose on
    validation (:mod:`gloss_ray.graph.predict`, saved by ``--graph-predict``); a folder without the
    graph files predicts with the classifier and says so in one line."""
    texts = read_texts(input_path, text_column)
    model, logits, embs = _run(model_dir, texts, batch_size, max_length, "predict")
    prob = logits.softmax(1)
    if graph:
        from .graph.predict import load_graph_predictor

        gp = load_graph_predictor(model_dir)
        if gp is None:
            print(f"[gloss-ray] {model_dir} has no graph-prediction files (train with --graph-predict): "
                  "predicting with the classifier alone", file=sys.stderr, flush=True)
        else:
            prob = gp.blend_proba(logits, embs)
    names = model.label_names or [str(i) for i in range(logits.shape[1])]
    frame = pd.DataFrame({"text": texts, "label": [names[i] for i in prob.argmax(1).tolist()],
                          "confidence": prob.max(1).values.numpy()})
    out = Path(output or Path(input_path).with_suffix(".predictions.csv"))
    frame.to_json(out, orient="records", lines=True) if out.suffix == ".jsonl" else frame.to_csv(out, index=False)
    return out


def embed_file(model_dir, input_path, output=None, text_column="text", batch_size=64, max_length=None) -> Path:
    texts = read_texts(input_path, text_column)
    _, _, emb = _run(model_dir, texts, batch_size, max_length, "embed")
    out = Path(output or Path(input_path).with_suffix(".embeddings.npy"))
    if out.suffix == ".parquet":
        pd.DataFrame({"text": texts, "embedding": list(emb.numpy())}).to_parquet(out)
    else:
        np.save(out, emb.numpy())
    return out
