"""Every name and range an option can take, defined once.

The CLI, YAML configs (:class:`gloss_ray.config.TrainConfig`), search spaces
(:mod:`gloss_ray.sweep.spaces`) and the report read them from here. Names that belong to the maths
stay with it and are re-exported: sigma strategies (:mod:`gloss_ray.losses.sigma`), G-Loss variants
and masks (:mod:`gloss_ray.losses.gloss`), schedule kinds (:mod:`gloss_ray.schedules`).

    >>> from gloss_ray.options import check
    >>> check("gamma", 0.7)          # fine
    >>> check("gamma", 1.0)
    Traceback (most recent call last):
    ...
    ValueError: must be a number in (0, 1)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from .losses.gloss import MASKS, VARIANTS
from .losses.sigma import NAMES as SIGMA_STRATEGIES
from .schedules import KINDS as SCHEDULE_KINDS

BENCHMARKS = ("mr", "r8", "r52", "ohsumed", "20ng")
BENCHMARK_LABELS = {"mr": "MR", "r8": "R8", "r52": "R52", "ohsumed": "Ohsumed", "20ng": "20NG"}
LOSSES = ("ce", "gloss", "scl", "triplet", "contrastive")
DEFAULT_MARGIN = {"triplet": 5.0, "contrastive": 1.0}   # of the margin losses; 1.0 otherwise
CLASS_WEIGHTS = ("balanced", "none")
DENSE = "dense"     # k: the dense batch graph (None)
TRACKERS = ("mlflow", "tensorboard", "wandb")   # --report-to (gloss_ray.train.tracking)

__all__ = ["BENCHMARKS", "BENCHMARK_LABELS", "CLASS_WEIGHTS", "DEFAULT_MARGIN", "DENSE", "LOSSES", "MASKS",
           "OPTIONS", "SCHEDULE_KINDS", "SIGMA_STRATEGIES", "TRACKERS", "VARIANTS", "Option", "check",
           "dense_to_none", "load_yaml", "report_to"]


# --------------------------------------------------------------------------- value checks
def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False, integer=False,
           nullable: str | None = None) -> Callable[[Any], None]:
    """A check for a number in the interval lo..hi (None: unbounded); ``nullable`` names what
    ``None`` means (``None`` is refused when it is not given)."""
    what = "an integer" if integer else "a number"
    if hi is None:
        bounds = f"{'>' if lo_open else '>='} {lo}"
    else:
        bounds = f"in {'(' if lo_open else '['}{'-inf' if lo is None else lo}, {hi}{')' if hi_open else ']'}"

    def check(v: Any) -> None:
        if v is None and nullable:
            return
        if not _is_num(v) or (integer and not isinstance(v, int)):
            raise ValueError(f"must be {what} {bounds}" + (f" or null ({nullable})" if nullable else ""))
        if (lo is not None and (v < lo or (lo_open and v == lo))) or \
                (hi is not None and (v > hi or (hi_open and v == hi))):
            raise ValueError(f"must be {what} {bounds}" + (f" or null ({nullable})" if nullable else ""))
    return check


def one_of(names: tuple[str, ...]) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not isinstance(v, str) or v not in names:
            raise ValueError(f"must be one of {', '.join(names)}")
    return check


def _sigma(v: Any) -> None:
    if isinstance(v, str):
        one_of(SIGMA_STRATEGIES)(v)
    elif not _is_num(v) or v <= 0:
        raise ValueError(f"must be a number > 0 or one of {', '.join(SIGMA_STRATEGIES)}")


def _schedule(v: Any) -> None:
    """A schedule: a kind name, a number (constant), a mapping (``{kind: cosine, value: ...}``) or null."""
    from .errors import ConfigError
    from .schedules import Schedule

    if isinstance(v, str):
        one_of(SCHEDULE_KINDS)(v)
        return
    try:
        Schedule.parse(v)
    except (ConfigError, TypeError) as e:
        raise ValueError(str(e)) from None


@dataclass(frozen=True)
class Option:
    """A ranged option: ``check(value)`` raises ``ValueError(reason)`` for a bad value; an
    ``integer`` option takes no float distribution in a search space; ``searchable`` options may
    appear in a search-space file."""
    check: Callable[[Any], None]
    doc: str
    integer: bool = False
    searchable: bool = True


_INT1 = number(1, integer=True)
OPTIONS: dict[str, Option] = {
    # the loss
    "loss": Option(one_of(LOSSES), "the loss", searchable=False),
    "lam": Option(number(0, 1), "weight of the auxiliary loss, [0, 1]"),
    "lam_schedule": Option(_schedule, "schedule of lam"),
    "gamma": Option(number(0, 1, True, True), "fraction of visible nodes, (0, 1)"),
    "sigma": Option(_sigma, "kernel width > 0 or a strategy name"),
    "sigma_schedule": Option(_schedule, "schedule of sigma"),
    "k": Option(number(1, integer=True, nullable="dense"), "k-NN sparsification of the batch graph; null/dense = dense",
                integer=True),
    "k_schedule": Option(_schedule, "schedule of k"),
    "variant": Option(one_of(VARIANTS), "G-Loss scoring variant"),
    "mask": Option(one_of(MASKS), "how visible nodes are drawn"),
    "temperature": Option(number(0, lo_open=True), "SCL temperature > 0"),
    "margin": Option(number(0, lo_open=True, nullable="the loss's default"), "triplet/contrastive margin > 0"),
    "class_weights": Option(one_of(CLASS_WEIGHTS), "class weights of CE and G-Loss", searchable=False),
    # the global graph
    "global_k": Option(number(0, integer=True), "global-graph neighbours, >= 0", integer=True),
    "global_max_nodes": Option(number(0, integer=True), "extra graph nodes per batch, >= 0", integer=True),
    "global_weight": Option(number(0), "weight of global-graph edges, >= 0"),
    "refresh_every": Option(_INT1, "epochs between global-graph refreshes, >= 1", integer=True, searchable=False),
    "pseudo_confidence": Option(number(0, 1), "keep a pseudo-label at this confidence or above, [0, 1]",
                                searchable=False),
    # data and optimisation
    "label_fraction": Option(number(0, 1, lo_open=True), "fraction of training labels known, (0, 1]",
                             searchable=False),
    "max_length": Option(_INT1, "tokens per text, >= 1", integer=True, searchable=False),
    "epochs": Option(_INT1, "integer >= 1", integer=True),
    "max_steps": Option(number(1, integer=True, nullable="epochs decide"), "optimiser steps in all", integer=True,
                        searchable=False),
    "batch_size": Option(_INT1, "documents per worker and step, >= 1", integer=True),
    "eval_batch_size": Option(_INT1, "integer >= 1", integer=True, searchable=False),
    "lr": Option(number(0, lo_open=True), "learning rate > 0"),
    "head_lr": Option(number(0, lo_open=True, nullable="the same as lr"), "the classifier head's learning rate > 0"),
    "weight_decay": Option(number(0), ">= 0"),
    "warmup_ratio": Option(number(0, 1, hi_open=True), "[0, 1)"),
    # Ray
    "workers": Option(_INT1, "Ray Train workers, >= 1", integer=True, searchable=False),
    "cpus_per_worker": Option(number(0, lo_open=True, nullable="automatic"), "CPUs each worker reserves",
                              searchable=False),
    "gpus_per_worker": Option(number(0, 1, lo_open=True), "GPUs each worker reserves with --gpu, in (0, 1]",
                              searchable=False),
    # tracking and step checkpoints
    "log_every": Option(number(0, integer=True), "optimiser steps between per-step metric rows, >= 0 (0: none)",
                        integer=True, searchable=False),
    "checkpoint_every": Option(number(1, integer=True, nullable="per epoch only"),
                               "optimiser steps between step checkpoints", integer=True, searchable=False),
}


def check(name: str, value: Any) -> None:
    """Raise ``ValueError(reason)`` when ``value`` is not a valid ``name``."""
    OPTIONS[name].check(value)


def report_to(value: Any) -> tuple[str, ...]:
    """``--report-to``: ``"mlflow,tensorboard"`` (or a YAML list) -> ``("mlflow", "tensorboard")``;
    None or ``"none"`` -> ``()``. An unknown name raises ``ValueError`` naming the choices."""
    if value is None or value == "none":
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = tuple(dict.fromkeys(str(x).strip() for x in items if str(x).strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or not names:
        raise ValueError(f"must be a comma-separated list of {', '.join(TRACKERS)} (or none), got {value!r}")
    return names


def dense_to_none(name: str, value: Any) -> Any:
    """``k: dense`` (YAML, ``--set k=dense``, a Tune sample, a CSV round-trip) is the dense graph: None."""
    return None if name == "k" and value == DENSE else value


# --------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float (YAML 1.1 reads it as a string) and refuses a
    repeated key in one mapping instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def load_yaml(text: str) -> Any:
    """Parse YAML as every gloss-ray file and ``--set`` value is parsed (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)
