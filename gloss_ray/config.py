"""One flat, validated configuration for a fine-tuning run (CLI flags, YAML files and Tune trials all
map onto it). ``TrainConfig.from_sources(yaml_path, overrides)`` merges a YAML file with explicit
overrides; unknown keys and bad values raise :class:`ConfigError` naming the file and key."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .losses.sigma import SigmaStrategy
from .options import DEFAULT_MARGIN, OPTIONS, dense_to_none, load_yaml, report_to
from .schedules import Schedule
from .storage import absolute, is_uri

# options that name a local file or folder (or a URI); made absolute on the driver by ``resolved``
PATH_FIELDS = ("data_dir", "train_file", "validation_file", "test_file", "storage", "cache_dir")


@dataclass
class TrainConfig:
    # data
    benchmark: str | None = None
    data_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    hf_dataset: str | None = None
    max_train: int | None = None
    max_eval: int | None = None
    max_length: int = 128
    label_fraction: float = 1.0
    # model
    model: str | None = None
    pooling: str = "cls"
    dropout: float = 0.1
    # loss
    loss: str = "gloss"
    lam: float = 0.5
    lam_schedule: Any = "constant"
    gamma: float = 0.7
    sigma: Any = "root"
    sigma_schedule: Any = "constant"
    k: int | None = None
    k_schedule: Any = None
    variant: str = "nll"
    mask: str = "random"
    temperature: float = 0.07
    margin: float | None = None
    class_weights: str = "balanced"
    # global document graph (FAISS / PyTorch kNN over the whole training corpus)
    global_k: int = 0
    global_max_nodes: int = 256
    global_weight: float = 1.0
    refresh_every: int = 1
    index: str = "auto"
    pseudo_confidence: float = 0.0    # low-label setting: keep a pseudo-label only at this confidence or above
    # graph prediction at the end of training (issue 25, gloss_ray.graph.predict): validation and test also
    # scored by propagation over the training corpus and by a blend with the classifier; the graph files saved
    graph_predict: bool = False
    graph_transductive: bool = False  # with graph_predict: validation and test documents join the graph
    # optimisation
    epochs: int = 3
    max_steps: int | None = None      # stop after this many optimiser steps in all (None: epochs decide)
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 3e-5
    head_lr: float | None = None      # the classifier head's learning rate (None: the same as lr)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    patience: int = 3
    balanced_batches: bool = False
    seed: int = 0
    # Ray
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float | None = None  # None: 1 with --gpu; else the node's CPUs shared by the workers
    gpus_per_worker: float = 1.0          # with --gpu; below 1 packs several small runs on one GPU
    storage: str = "runs"
    name: str | None = None
    max_failures: int = 2
    cache_dir: str | None = None
    progress: bool = True
    # experiment tracking, per-step metrics and step checkpoints (issue 24; gloss_ray.train.tracking)
    report_to: str | None = None      # comma-separated trackers: mlflow, tensorboard, wandb (None: none)
    tracking_uri: str | None = None   # MLflow store or server (None: sqlite:///<storage>/mlflow.db)
    experiment: str | None = None     # MLflow experiment / W&B project (None: gloss-ray; a sweep: its name)
    log_model: bool = False           # also log the model folder as a tracker artifact
    log_every: int = 10               # optimiser steps between per-step metric rows (0: none)
    checkpoint_every: int | None = None  # optimiser steps between step checkpoints (None: per epoch only)
    extra: dict = field(default_factory=dict)
    source: InitVar[str] = "config"   # where the values came from, named in error messages

    def __post_init__(self, source: str = "config"):
        self.validate(source)

    # ------------------------------------------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        """Check every option against its range in :data:`gloss_ray.options.OPTIONS`, then the
        rules that tie options together; the first problem raises :class:`ConfigError` naming
        ``source`` and the option."""
        def bad(key, msg):
            raise ConfigError(f"{source}: {key}: {msg}")

        for key, option in OPTIONS.items():
            value = getattr(self, key)
            try:
                option.check(value)
            except ValueError as e:
                bad(key, f"{e}, got {value!r}")
        if sum(x is not None for x in (self.benchmark, self.train_file, self.hf_dataset)) != 1:
            bad("benchmark", "give exactly one of --benchmark, --train-file or --hf-dataset")
        if self.batch_size * self.workers < 2:
            bad("batch_size", "the global batch (batch_size x workers) must hold at least 2 documents")
        if self.global_k > 0 and self.loss != "gloss":
            bad("global_k", "the global graph feeds G-Loss: use it with --loss gloss")
        for key in ("graph_predict", "graph_transductive"):
            if not isinstance(getattr(self, key), bool):
                bad(key, f"must be true or false, got {getattr(self, key)!r}")
        try:
            report_to(self.report_to)
        except ValueError as e:
            bad("report_to", str(e))
        if self.graph_transductive and not self.graph_predict:
            bad("graph_transductive", "is a mode of graph prediction: give --graph-predict too")
        try:
            SigmaStrategy.parse(self.sigma)
        except ValueError as e:
            bad("sigma", str(e))
        for key in ("lam_schedule", "sigma_schedule", "k_schedule"):
            try:
                Schedule.parse(getattr(self, key))
            except ConfigError as e:
                bad(key, str(e))

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
        return dataclasses.replace(self, **changes, extra=dict(self.extra))

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
        return cls.from_dict(data, source)
