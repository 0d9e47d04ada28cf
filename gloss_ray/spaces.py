"""Ray Tune search spaces read from YAML files (``tune_spaces/*.yaml``).

Schema
------
A space file is a mapping with these top-level keys (any other key is an error):

``loss``        name of the loss the file tunes (single-loss form), one of :data:`LOSSES`.
``losses``      several losses in one file (multi-loss form), ``{loss: block}``. A block is
                either a plain ``{param: spec}`` mapping, or ``{params: {...}, overrides: {...}}``
                when it needs its own per-benchmark overrides. Exactly one of ``loss`` /
                ``losses`` must be given.
``params``      ``{param: spec}``. In the single-loss form, the loss's space; in the multi-loss
                form, parameters shared by every loss (a loss's own block wins).
``overrides``   ``{benchmark: {param: spec}}``: per-benchmark replacements or additions, benchmark
                one of :data:`BENCHMARKS`. In the multi-loss form they apply to every loss, and a
                loss's own ``overrides`` win over them.
``metric``      metric to optimise (default ``val_macro_f1``).
``mode``        ``max`` (default) or ``min``.
``description`` free text, ignored.

So for one run the space is ``shared params < loss params < shared overrides[benchmark] < loss
overrides[benchmark]`` (later wins), see :meth:`Space.for_run`.

A *spec* is a plain constant (number, string or ``null``) or a one-key mapping naming a
distribution (bounds as in :mod:`ray.tune`):

* ``{choice: [a, b, ...]}``            one of the listed values;
* ``{uniform: [lo, hi]}``              float in [lo, hi], lo < hi;
* ``{loguniform: [lo, hi]}``           float, log-uniform, 0 < lo < hi;
* ``{randint: [lo, hi]}``              integer in [lo, hi) -- *hi is exclusive* (``tune.randint``);
* ``{quniform: [lo, hi, q]}``          float in [lo, hi] rounded to a multiple of q > 0.

Parameter names and valid values are in :data:`KNOWN_PARAMS`; every constant, choice and range
bound is checked against them. Integer parameters (``k``, ``batch_size``, ``epochs``,
``global_k``) take constants, ``choice`` or ``randint`` only. ``k: null`` and ``k: dense`` both
mean the dense graph and load as ``None``; Ray Tune's Optuna searcher (Ray 2.60, Optuna 5) accepts
``None`` inside ``tune.choice``, so :func:`to_tune` keeps it. :func:`decode_params` still maps a
``"dense"`` string (e.g. from a hand-written config or a CSV round-trip) back to ``None``.

Numbers such as ``1e-5`` (no dot) are read as floats, unlike plain YAML 1.1, and a repeated key in
one mapping is an error rather than silently overwriting. Every error is a
:class:`~gloss_ray.errors.ConfigError` whose one-line message names the file and the key path,
e.g. ``tune_spaces/x.yaml: overrides.r52.k: randint low 0 is invalid: must be >= 1``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from gloss_ray.errors import ConfigError

BENCHMARKS = ("mr", "r8", "r52", "ohsumed", "20ng")
LOSSES = ("ce", "gloss", "scl", "triplet", "contrastive")
SCHEDULES = ("constant", "linear_warmup", "cosine", "step")
SIGMA_STRATEGIES = ("root", "dicm", "batch", "batch-dicm")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "quniform")
TOP_LEVEL_KEYS = ("loss", "losses", "params", "overrides", "metric", "mode", "description")
DENSE = "dense"


# --------------------------------------------------------------------------- parameter checks
def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False,
            integer=False) -> Callable[[Any], None]:
    """Validator for a number in the interval given by lo/hi (None = unbounded)."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    what = "an integer" if integer else "a number"
    if hi is None:
        bounds = f"{'>' if lo_open else '>='} {lo}"
    else:
        bounds = f"in {left}{'-inf' if lo is None else lo}, {hi}{right}"

    def check(v: Any) -> None:
        if not _is_num(v) or (integer and not isinstance(v, int)):
            raise ValueError(f"must be {what}")
        if lo is not None and (v < lo or (lo_open and v == lo)) or \
                hi is not None and (v > hi or (hi_open and v == hi)):
            raise ValueError(f"must be {what} {bounds}")
    return check


def _one_of(options: tuple[str, ...]) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if v not in options or not isinstance(v, str):
            raise ValueError(f"must be one of {', '.join(options)}")
    return check


def _sigma(v: Any) -> None:
    if isinstance(v, str):
        _one_of(SIGMA_STRATEGIES)(v)
    elif not _is_num(v) or v <= 0:
        raise ValueError(f"must be a number > 0 or one of {', '.join(SIGMA_STRATEGIES)}")


def _k(v: Any) -> None:
    if v is not None:
        _number(1, integer=True)(v)


@dataclass(frozen=True)
class Param:
    """A known hyper-parameter: ``check(value)`` raises ValueError(reason) for a bad value;
    ``integer`` parameters reject the float distributions (uniform, loguniform, quniform)."""
    check: Callable[[Any], None]
    integer: bool = False
    doc: str = ""


KNOWN_PARAMS: dict[str, Param] = {
    "lr": Param(_number(0, 1, True, True), doc="learning rate, (0, 1)"),
    "lam": Param(_number(0, 1), doc="weight of the auxiliary loss, [0, 1]"),
    "lam_schedule": Param(_one_of(SCHEDULES), doc="schedule of lam"),
    "sigma": Param(_sigma, doc="kernel width > 0 or a strategy name"),
    "sigma_schedule": Param(_one_of(SCHEDULES), doc="schedule of sigma"),
    "k": Param(_k, integer=True, doc="k-NN sparsification of the batch graph; null/dense = dense"),
    "k_schedule": Param(_one_of(SCHEDULES), doc="schedule of k"),
    "gamma": Param(_number(0, 1, True, True), doc="fraction of visible nodes, (0, 1)"),
    "variant": Param(_one_of(("nll", "paper")), doc="G-Loss scoring variant"),
    "mask": Param(_one_of(("random", "stratified")), doc="how visible nodes are drawn"),
    "temperature": Param(_number(0, lo_open=True), doc="SCL temperature > 0"),
    "margin": Param(_number(0, lo_open=True), doc="triplet/contrastive margin > 0"),
    "batch_size": Param(_number(2, integer=True), integer=True, doc="integer >= 2"),
    "weight_decay": Param(_number(0), doc=">= 0"),
    "warmup_ratio": Param(_number(0, 1, hi_open=True), doc="[0, 1)"),
    "epochs": Param(_number(1, integer=True), integer=True, doc="integer >= 1"),
    "global_k": Param(_number(0, integer=True), integer=True, doc="global-graph neighbours, >= 0"),
    "global_weight": Param(_number(0), doc="weight of global-graph edges, >= 0"),
}


# --------------------------------------------------------------------------- spec objects
@dataclass(frozen=True)
class Dist:
    """A distribution: ``kind`` in :data:`DISTRIBUTIONS` and its arguments (the choice options,
    or the bounds ``(lo, hi)`` / ``(lo, hi, q)``)."""
    kind: str
    args: tuple

    def to_tune(self):
        from ray import tune
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


@dataclass
class LossSpace:
    """One loss's parameters and per-benchmark overrides, already merged with the shared ones."""
    params: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Space:
    """A validated search-space file."""
    path: str
    losses: dict[str, LossSpace]
    metric: str = "val_macro_f1"
    mode: str = "max"

    def for_run(self, benchmark: str, loss: str) -> dict[str, Any]:
        """Specs (constants or :class:`Dist`) for one benchmark x loss, overrides applied."""
        if benchmark not in BENCHMARKS:
            raise ConfigError(f"{self.path}: unknown benchmark {benchmark!r} "
                              f"(known: {', '.join(BENCHMARKS)})")
        if loss not in self.losses:
            raise ConfigError(f"{self.path}: losses.{loss}: loss not in this space file "
                              f"(it has: {', '.join(self.losses)})")
        ls = self.losses[loss]
        return {**ls.params, **ls.overrides.get(benchmark, {})}


# --------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float and refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


class _Ctx:
    """Builds one-line errors naming the file and the key path."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, msg: str) -> ConfigError:
        return ConfigError(" ".join(f"{self.path}: {where}: {msg}".split()))

    def mapping(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where, f"key {key!r} must be a string")
        return value


def _check_value(ctx: _Ctx, where: str, name: str, value: Any, what: str = "value") -> None:
    try:
        KNOWN_PARAMS[name].check(value)
    except ValueError as e:
        raise ctx.fail(where, f"{what} {value!r} is invalid: {e}") from None


def _parse_spec(ctx: _Ctx, where: str, name: str, raw: Any) -> Any:
    """Validate one parameter spec; returns a constant or a :class:`Dist`."""
    if name not in KNOWN_PARAMS:
        raise ctx.fail(where, f"unknown parameter {name!r} (known: {', '.join(KNOWN_PARAMS)})")
    param = KNOWN_PARAMS[name]
    fix = (lambda v: None if v == DENSE else v) if name == "k" else (lambda v: v)
    if isinstance(raw, list):
        raise ctx.fail(where, "a list is not a spec; write {choice: [...]}")
    if not isinstance(raw, dict):
        _check_value(ctx, where, name, fix(raw))
        return fix(raw)
    if len(raw) != 1 or next(iter(raw)) not in DISTRIBUTIONS:
        raise ctx.fail(where, f"must be a constant or a mapping with one key of "
                              f"{', '.join(DISTRIBUTIONS)}, got keys {', '.join(map(str, raw))}")
    kind, args = next(iter(raw.items()))
    if not isinstance(args, list) or not args:
        raise ctx.fail(where, f"{kind} needs a non-empty list")
    if kind == "choice":
        opts = [fix(v) for v in args]
        for v in opts:
            _check_value(ctx, where, name, v, "choice")
        return Dist("choice", tuple(opts))
    if param.integer and kind != "randint":
        raise ctx.fail(where, f"{name} is an integer: use randint or choice, not {kind}")
    nargs = 3 if kind == "quniform" else 2
    if len(args) != nargs or not all(_is_num(a) for a in args):
        raise ctx.fail(where, f"{kind} needs {nargs} numbers, got {args!r}")
    lo, hi = args[0], args[1]
    if lo >= hi:
        raise ctx.fail(where, f"{kind} low {lo} >= high {hi}")
    if kind == "loguniform" and lo <= 0:
        raise ctx.fail(where, f"loguniform low {lo} must be > 0")
    if kind == "quniform" and args[2] <= 0:
        raise ctx.fail(where, f"quniform step {args[2]} must be > 0")
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise ctx.fail(where, f"randint needs integers, got {args!r}")
        hi = hi - 1                      # tune.randint excludes its upper bound
    _check_value(ctx, where, name, lo, f"{kind} low")
    _check_value(ctx, where, name, hi, f"{kind} high" + (" - 1" if kind == "randint" else ""))
    return Dist(kind, tuple(args))


def _parse_params(ctx: _Ctx, where: str, raw: Any) -> dict[str, Any]:
    raw = {} if raw is None else ctx.mapping(raw, where)
    return {k: _parse_spec(ctx, f"{where}.{k}", k, v) for k, v in raw.items()}


def _parse_overrides(ctx: _Ctx, where: str, raw: Any) -> dict[str, dict[str, Any]]:
    raw = {} if raw is None else ctx.mapping(raw, where)
    out = {}
    for bench, params in raw.items():
        if bench not in BENCHMARKS:
            raise ctx.fail(f"{where}.{bench}",
                           f"unknown benchmark {bench!r} (known: {', '.join(BENCHMARKS)})")
        out[bench] = _parse_params(ctx, f"{where}.{bench}", params)
    return out


def load_space(path: str | Path) -> Space:
    """Read and validate a search-space file (schema in the module docstring)."""
    ctx = _Ctx(str(path))
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read search space: {e.strerror or e}") from None
    try:
        doc = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "yaml"
        raise ctx.fail(where, f"invalid YAML: {getattr(e, 'problem', None) or e}") from None
    doc = ctx.mapping(doc, "top level")
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            raise ctx.fail(key, f"unknown top-level key (known: {', '.join(TOP_LEVEL_KEYS)})")
    if ("loss" in doc) == ("losses" in doc):
        raise ctx.fail("loss", "give exactly one of 'loss' (one loss) or 'losses' (several)")
    metric = doc.get("metric", "val_macro_f1")
    if not isinstance(metric, str) or not metric:
        raise ctx.fail("metric", "must be a non-empty string")
    mode = doc.get("mode", "max")
    if mode not in ("max", "min"):
        raise ctx.fail("mode", f"must be max or min, got {mode!r}")
    shared = _parse_params(ctx, "params", doc.get("params"))
    shared_over = _parse_overrides(ctx, "overrides", doc.get("overrides"))

    if "loss" in doc:
        if not isinstance(doc["loss"], str):
            raise ctx.fail("loss", f"must be a loss name ({', '.join(LOSSES)})")
        blocks = {doc["loss"]: ("", {})}
    else:
        raw = ctx.mapping(doc["losses"], "losses")
        if not raw:
            raise ctx.fail("losses", "is empty")
        blocks = {name: (f"losses.{name}", b) for name, b in raw.items()}

    losses = {}
    for name, (where, block) in blocks.items():
        if name not in LOSSES:
            raise ctx.fail(where or "loss", f"unknown loss {name!r} (known: {', '.join(LOSSES)})")
        block = {} if block is None else ctx.mapping(block, where)
        if block.keys() & {"params", "overrides"}:     # full form: {params:, overrides:}
            extra = set(block) - {"params", "overrides"}
            if extra:
                raise ctx.fail(f"{where}.{sorted(extra)[0]}",
                               "a block with params/overrides takes no other keys")
            own = _parse_params(ctx, f"{where}.params", block.get("params"))
            own_over = _parse_overrides(ctx, f"{where}.overrides", block.get("overrides"))
        else:                                           # short form: {param: spec}
            own, own_over = _parse_params(ctx, where, block), {}
        over = {b: {**shared_over.get(b, {}), **own_over.get(b, {})}
                for b in BENCHMARKS if b in shared_over or b in own_over}
        losses[name] = LossSpace({**shared, **own}, over)
    return Space(str(path), losses, metric, mode)


# --------------------------------------------------------------------------- Ray Tune
def to_tune(spec: dict[str, Any]) -> dict[str, Any]:
    """Turn ``Space.for_run`` specs into a ``ray.tune`` param space (constants stay as they are)."""
    return {k: v.to_tune() if isinstance(v, Dist) else v for k, v in spec.items()}


def decode_params(params: dict[str, Any]) -> dict[str, Any]:
    """A sampled config back to trainer values: ``k == "dense"`` becomes ``None``."""
    out = dict(params)
    if out.get("k") == DENSE:
        out["k"] = None
    return out
