"""One flat, validated configuration for a fine-tuning run (CLI flags, YAML files and Tune trials all
map onto it). ``TrainConfig.from_sources(yaml_path, overrides)`` merges a YAML file with explicit
overrides; unknown keys and bad values raise :class:`ConfigError` naming the file and key."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .losses.sigma import SigmaStrategy
from .schedules import Schedule

LOSSES = ("ce", "gloss", "scl", "triplet", "contrastive")
# options that name a local file or folder (or a URI); made absolute on the driver by ``resolved``
PATH_FIELDS = ("data_dir", "train_file", "validation_file", "test_file", "storage", "cache_dir")
DEFAULT_MARGIN = {"triplet": 5.0, "contrastive": 1.0}


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
    storage: str = "runs"
    name: str | None = None
    max_failures: int = 2
    cache_dir: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        def bad(key, msg):
            raise ConfigError(f"{source}: {key}: {msg}")

        if self.loss not in LOSSES:
            bad("loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if sum(x is not None for x in (self.benchmark, self.train_file, self.hf_dataset)) != 1:
            bad("benchmark", "give exactly one of --benchmark, --train-file or --hf-dataset")
        if not 0.0 <= self.lam <= 1.0:
            bad("lam", f"must be in [0, 1], got {self.lam}")
        if not 0.0 < self.gamma < 1.0:
            bad("gamma", f"must be in (0, 1), got {self.gamma}")
        if self.k is not None and self.k < 1:
            bad("k", f"must be >= 1 or null (dense), got {self.k}")
        if self.variant not in ("nll", "paper"):
            bad("variant", f"must be 'nll' or 'paper', got {self.variant!r}")
        if self.mask not in ("random", "stratified"):
            bad("mask", f"must be 'random' or 'stratified', got {self.mask!r}")
        if self.class_weights not in ("balanced", "none"):
            bad("class_weights", f"must be 'balanced' or 'none', got {self.class_weights!r}")
        if not 0.0 < self.label_fraction <= 1.0:
            bad("label_fraction", f"must be in (0, 1], got {self.label_fraction}")
        for key in ("epochs", "batch_size", "eval_batch_size", "workers", "max_length", "refresh_every"):
            if int(getattr(self, key)) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"must be >= 1 or null, got {self.max_steps}")
        if self.batch_size * self.workers < 2:
            bad("batch_size", "the global batch (batch_size x workers) must hold at least 2 documents")
        for key in ("lr", "temperature"):
            if not getattr(self, key) > 0:
                bad(key, f"must be > 0, got {getattr(self, key)}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            bad("cpus_per_worker", f"must be > 0 or null (automatic), got {self.cpus_per_worker}")
        if self.head_lr is not None and not self.head_lr > 0:
            bad("head_lr", f"must be > 0 or null (the same as lr), got {self.head_lr}")
        if self.margin is not None and self.margin <= 0:
            bad("margin", f"must be > 0, got {self.margin}")
        if self.global_k < 0 or self.global_max_nodes < 0 or self.global_weight < 0:
            bad("global_k", "global_k, global_max_nodes and global_weight must be >= 0")
        if self.global_k > 0 and self.loss != "gloss":
            bad("global_k", "the global graph feeds G-Loss: use it with --loss gloss")
        if not 0.0 <= self.pseudo_confidence <= 1.0:
            bad("pseudo_confidence", f"must be in [0, 1], got {self.pseudo_confidence}")
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
        def absolute(value):
            if value is None or "://" in str(value):
                return value
            return os.path.abspath(os.path.expanduser(str(value)))

        changes = {key: absolute(getattr(self, key)) for key in PATH_FIELDS}
        if self.model and "://" not in self.model and Path(os.path.expanduser(self.model)).exists():
            changes["model"] = absolute(self.model)
        return dataclasses.replace(self, **changes, extra=dict(self.extra))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
        try:
            cfg = cls.__new__(cls)
            defaults = cls.__dataclass_fields__
            for name, f in defaults.items():
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                value = d.get(name, default)
                if str(f.type).startswith("float") and isinstance(value, str):
                    try:                                # YAML 1.1 reads 1e-4 (no dot) as a string
                        value = float(value)
                    except ValueError:
                        raise ConfigError(f"{source}: {name}: expected a number, got {value!r}") from None
                setattr(cfg, name, value)
            cfg.validate(source)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: {e}") from e
        return cfg

    @classmethod
    def from_sources(cls, yaml_path: str | None = None, overrides: dict | None = None) -> "TrainConfig":
        data: dict = {}
        source = "command line"
        if yaml_path:
            p = Path(yaml_path)
            if not p.exists():
                raise ConfigError(f"--config: file not found: {p}")
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from e
            if not isinstance(data, dict):
                raise ConfigError(f"{p}: expected a mapping of option: value")
            data = {k.replace("-", "_"): v for k, v in data.items()}
            source = str(p)
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(data, source)
