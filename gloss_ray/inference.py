"""Classify or embed texts with a saved gloss-ray model (``gloss-ray predict`` / ``embed``).

* :class:`Predictor`: a saved model folder loaded once, on the CPU or a GPU (:func:`device`), that maps
  a list of texts to labels and confidences (:meth:`Predictor.predict`) or to embeddings
  (:meth:`Predictor.embed`). It is what runs in each Ray Data actor of
  :mod:`gloss_ray.batch_inference` (files, folders of shards, ``s3://`` / ``gs://``) and in this
  process for one local file (:func:`predict_file`, :func:`embed_file`: the texts read by
  :func:`gloss_ray.data.read_texts`, one output file).

The numbers are those of the saved folder loaded by the ecosystem: ``predict``'s labels and
confidences are ``AutoModelForSequenceClassification`` / ``pipeline("text-classification")``'s
softmax, ``embed``'s vectors ``SentenceTransformer(model_dir).encode``'s (see ``gloss_ray.model``).
``max_length=None`` truncates where the model was trained (and where sentence-transformers does)."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import PadCollator, read_texts
from .errors import ConfigError
from .log import say
from .model import DEFAULT_MAX_LENGTH, TextClassifier, encode, token_budget_batches
from .storage import download_dir, is_uri


def device(gpu: bool) -> torch.device:
    """``cuda`` with ``gpu`` (an error in one line when PyTorch sees no GPU), else the CPU."""
    if not gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"--gpu: PyTorch sees no CUDA GPU on this machine (torch {torch.__version__}, {build}); "
                          "leave out --gpu to run on the CPU")
    return torch.device("cuda")


class Predictor:
    """A saved model folder (a run's ``model/``; a local path, or an ``s3://`` / ``gs://`` URI, then
    copied to a local temporary folder first) loaded once on ``device``. Texts are tokenised and
    encoded in length-sorted batches of at most ``batch_size x max_length`` padded tokens
    (:func:`~gloss_ray.model.token_budget_batches`), outputs in input order. With ``graph``, labels
    come from the blend of the classifier with propagation over the training corpus's kNN graph
    (:mod:`gloss_ray.graph.predict`, saved by ``--graph-predict``); a folder without the graph files
    predicts with the classifier and says so in one line on stderr."""

    def __init__(self, model_dir: str, batch_size: int = 64, max_length: int | None = None,
                 device: torch.device = torch.device("cpu"), graph: bool = False):
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()    # loading takes a moment; the progress worth showing is the encoding's
        self._copy = None
        if is_uri(model_dir):
            self._copy = tempfile.TemporaryDirectory(prefix="gloss_ray_model_")
            download_dir(model_dir, self._copy.name)
            model_dir = self._copy.name
        self.device = device
        self.model = TextClassifier.from_pretrained(model_dir).to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.batch_size = batch_size
        self.max_length = max_length or self.model.meta.get("max_length") or DEFAULT_MAX_LENGTH
        self.label_names = list(self.model.label_names or [])    # empty: the class ids are the names
        self.graph = None
        if graph:
            from .graph.predict import load_graph_predictor

            self.graph = load_graph_predictor(model_dir)
            if self.graph is None:
                say(f"{model_dir} has no graph-prediction files (train with --graph-predict): "
                    "predicting with the classifier alone", file=sys.stderr)

    def encode(self, texts: list[str], progress=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, embeddings)`` of ``texts``, float32 on the CPU, in input order."""
        batches = _batches(self.tokenizer, texts, self.batch_size * self.max_length, self.max_length)
        return encode(self.model, batches, self.device, rows=len(texts), progress=progress)

    def predict(self, texts: list[str], progress=None) -> tuple[list[str], np.ndarray]:
        """The label (class name) and its probability, the confidence, of every text."""
        logits, embs = self.encode(texts, progress)
        prob = logits.softmax(1) if self.graph is None else self.graph.blend_proba(logits, embs)
        names = self.label_names or [str(i) for i in range(prob.shape[1])]
        return [names[i] for i in prob.argmax(1).tolist()], prob.max(1).values.numpy()

    def embed(self, texts: list[str], progress=None) -> np.ndarray:
        """The document embedding of every text, float32 ``[len(texts), dim]``."""
        return self.encode(texts, progress)[1].numpy()


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


def _progress(what: str, texts: list[str], batch_size: int):
    """A progress bar (stderr) over the texts encoded, when there is more than one batch."""
    from tqdm.auto import tqdm

    return tqdm(total=len(texts), desc=what, unit="text", disable=len(texts) <= batch_size)


def predict_file(model_dir, input_path, output=None, text_column="text", batch_size=64, max_length=None,
                 graph=False, gpu=False) -> Path:
    """Labels and confidences of the texts of one local file, in this process: a CSV (or, for an
    ``output`` ending in .jsonl, JSON lines) of ``text``, ``label``, ``confidence``."""
    texts = read_texts(input_path, text_column)
    predictor = Predictor(model_dir, batch_size, max_length, device(gpu), graph)
    with _progress("predict", texts, batch_size) as progress:
        labels, confidence = predictor.predict(texts, progress)
    frame = pd.DataFrame({"text": texts, "label": labels, "confidence": confidence})
    out = Path(output or Path(input_path).with_suffix(".predictions.csv"))
    frame.to_json(out, orient="records", lines=True) if out.suffix == ".jsonl" else frame.to_csv(out, index=False)
    return out


def embed_file(model_dir, input_path, output=None, text_column="text", batch_size=64, max_length=None,
               gpu=False) -> Path:
    """Embeddings of the texts of one local file, in this process: a ``.npy`` array, or for an
    ``output`` ending in .parquet, a table of ``text``, ``embedding``."""
    texts = read_texts(input_path, text_column)
    predictor = Predictor(model_dir, batch_size, max_length, device(gpu))
    with _progress("embed", texts, batch_size) as progress:
        emb = predictor.embed(texts, progress)
    out = Path(output or Path(input_path).with_suffix(".embeddings.npy"))
    if out.suffix == ".parquet":
        pd.DataFrame({"text": texts, "embedding": list(emb)}).to_parquet(out)
    else:
        np.save(out, emb)
    return out
