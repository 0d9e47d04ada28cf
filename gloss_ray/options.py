"""Every name and range an option can take, and what each loss reads, defined once.

:class:`gloss_ray.config.TrainConfig` declares each option in one line with :func:`option` (its
default, its check, its ``--help`` text); the CLI, YAML configs, search spaces
(:mod:`gloss_ray.sweep.spaces`) and the report read them from there. Names that belong to the maths
stay with it and are re-exported: sigma strategies (:mod:`gloss_ray.losses.sigma`), G-Loss variants
and masks (:mod:`gloss_ray.losses.gloss`), schedule kinds (:mod:`gloss_ray.schedules`), poolings
(:mod:`gloss_ray.model`) and kNN index backends (:mod:`gloss_ray.graph.index`).

    >>> number(0, 1, True, True)(0.7)          # fine
    >>> number(0, 1, True, True)(1.0)
    Traceback (most recent call last):
    ...
    ValueError: must be a number in (0, 1)
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from .graph.index import BACKENDS
from .losses.gloss import MASKS, VARIANTS
from .losses.sigma import NAMES as SIGMA_STRATEGIES
from .model import POOLINGS
from .schedules import KINDS as SCHEDULE_KINDS

BENCHMARKS = ("mr", "r8", "r52", "ohsumed", "20ng")
BENCHMARK_LABELS = {"mr": "MR", "r8": "R8", "r52": "R52", "ohsumed": "Ohsumed", "20ng": "20NG"}
SPLITS = ("train", "validation", "test")       # a corpus's splits, <benchmark>/<split>.parquet on disk
CLASS_WEIGHTS = ("balanced", "none")
INDEXES = ("auto", *BACKENDS)
STAGES = ("trial", "final", "bench")            # a sweep's kinds of run
DENSE = "dense"     # k: the dense batch graph (None)
TRACKERS = ("mlflow", "tensorboard", "wandb")   # --report-to (gloss_ray.train.tracking)


@dataclass(frozen=True)
class Loss:
    """What a loss is and reads: its name in the model card, the options that shape it (besides
    ``class_weights``, which every loss reads), its default ``margin`` and whether the global document
    graph (:data:`GLOBAL_GRAPH_OPTIONS`) feeds it."""
    title: str
    options: tuple[str, ...] = ()
    margin: float | None = None
    global_graph: bool = False


_AUX = ("lam", "lam_schedule")      # every auxiliary loss is weighted by lam: (1 - lam) * CE + lam * aux
LOSS_INFO: dict[str, Loss] = {
    "ce": Loss("cross-entropy"),
    "gloss": Loss("G-Loss (graph-guided loss: label propagation over the batch's document graph)",
                  _AUX + ("gamma", "sigma", "sigma_schedule", "k", "k_schedule", "variant", "mask"), global_graph=True),
    "scl": Loss("supervised contrastive loss (SCL)", _AUX + ("temperature",)),
    "triplet": Loss("batch-all triplet loss", _AUX + ("margin",), margin=5.0),
    "contrastive": Loss("contrastive (pairwise margin) loss", _AUX + ("margin",), margin=1.0),
}
GLOBAL_GRAPH_OPTIONS = ("global_k", "global_max_nodes", "global_weight", "refresh_every", "index")
LOSSES = tuple(LOSS_INFO)
DEFAULT_MARGIN = {name: loss.margin for name, loss in LOSS_INFO.items() if loss.margin is not None}

__all__ = ["BENCHMARKS", "BENCHMARK_LABELS", "CLASS_WEIGHTS", "DEFAULT_MARGIN", "DENSE", "GLOBAL_GRAPH_OPTIONS",
           "INDEXES", "LOSSES", "LOSS_INFO", "MASKS", "POOLINGS", "SCHEDULE_KINDS", "SIGMA_STRATEGIES", "SPLITS",
           "STAGES", "TRACKERS", "VARIANTS", "Loss", "Option", "boolean", "dense_to_none", "is_number", "load_yaml", "number",
           "one_of", "option", "path", "report_to", "schedule_spec", "sigma_spec", "text",
           "trackers_spec"]


# --------------------------------------------------------------------------- value checks
def is_number(v: Any) -> bool:
    """A finite int or float, not a bool."""
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
    reason = f"must be {what} {bounds}" + (f" or null ({nullable})" if nullable else "")

    def check(v: Any) -> None:
        if v is None and nullable:
            return
        if not is_number(v) or (integer and not isinstance(v, int)):
            raise ValueError(reason)
        if (lo is not None and (v < lo or (lo_open and v == lo))) or \
                (hi is not None and (v > hi or (hi_open and v == hi))):
            raise ValueError(reason)
    return check


def one_of(names: tuple[str, ...], nullable: str | None = None, ignore_case=False) -> Callable[[Any], None]:
    """A check for one of ``names`` (any case with ``ignore_case``); ``nullable`` as in :func:`number`."""
    def check(v: Any) -> None:
        if v is None and nullable:
            return
        if not isinstance(v, str) or (v.lower() if ignore_case else v) not in names:
            raise ValueError(f"must be one of {', '.join(names)}" + (f" or null ({nullable})" if nullable else ""))
    return check


def text(nullable: str | None = None) -> Callable[[Any], None]:
    """A check for a non-empty string (a name, a column, a command); ``nullable`` as in :func:`number`."""
    def check(v: Any) -> None:
        if v is None and nullable:
            return
        if not isinstance(v, str) or not v.strip():
            raise ValueError("must be a non-empty string" + (f" or null ({nullable})" if nullable else ""))
    return check


def path(nullable: str | None = None) -> Callable[[Any], None]:
    """A check for a local path or an ``s3://`` / ``gs://`` URI (a string or a path object)."""
    as_text = text(nullable)
    return lambda v: as_text(os.fspath(v) if isinstance(v, os.PathLike) else v)


def boolean(v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")


def sigma_spec(v: Any) -> None:
    """A kernel width > 0 or a sigma strategy's name."""
    if isinstance(v, str):
        one_of(SIGMA_STRATEGIES)(v)
    elif not is_number(v) or v <= 0:
        raise ValueError(f"must be a number > 0 or one of {', '.join(SIGMA_STRATEGIES)}")


def schedule_spec(v: Any) -> None:
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
    """One option of a run: ``check(value)`` raises ``ValueError(reason)`` for a bad value; ``help`` is
    its ``gloss-ray train --help`` text; an ``integer`` option takes no float distribution in a search
    space; ``searchable`` options may appear in a search-space file; ``words``: the flag also takes a
    word (read as YAML; ``dense`` / ``none`` / ``null`` = None); a ``path`` is made absolute on the
    driver; ``flag=False``: set by gloss-ray itself (a sweep's stage, the command line), not a flag."""
    check: Callable[[Any], None]
    help: str
    integer: bool = False
    searchable: bool = False
    words: bool = False
    path: bool = False
    flag: bool = True


def option(default: Any, check: Callable[[Any], None], help: str, **kind: Any) -> Any:
    """A :class:`~gloss_ray.config.TrainConfig` field: its default, its check, its help and its
    :class:`Option` flags (``integer``, ``searchable``, ``words``, ``path``, ``flag``), in one place."""
    return dataclasses.field(default=default, metadata={"option": Option(check, help, **kind)})


def report_to(value: Any) -> tuple[str, ...]:
    """``--report-to``: ``"mlflow,tensorboard"`` (or a YAML list) -> ``("mlflow", "tensorboard")``;
    None or ``"none"`` -> ``()``. An unknown name raises ``ValueError`` naming the choices."""
    if value is None or value == "none":
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = tuple(dict.fromkeys(str(x).strip() for x in items if str(x).strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or not names:
        raise ValueError(f"must be a comma-separated list of {', '.join(TRACKERS)} (or none)")
    return names


def trackers_spec(v: Any) -> None:
    """A ``--report-to`` value (:func:`report_to`)."""
    report_to(v)


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
