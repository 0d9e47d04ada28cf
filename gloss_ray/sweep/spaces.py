"""Ray Tune search spaces read from YAML files (``tune_spaces/*.yaml``): :func:`load_space`.

Schema
------
A space file is a mapping with these top-level keys (any other key is an error):

``loss``        name of the loss the file tunes (single-loss form), one of
                :data:`gloss_ray.options.LOSSES`.
``losses``      several losses in one file (multi-loss form), ``{loss: block}``. A block is
                either a plain ``{param: spec}`` mapping, or ``{params: {...}, overrides: {...}}``
                when it needs its own per-benchmark overrides. Exactly one of ``loss`` /
                ``losses`` must be given.
``params``      ``{param: spec}``. In the single-loss form, the loss's space; in the multi-loss
                form, parameters shared by every loss (a loss's own block wins).
``overrides``   ``{benchmark: {param: spec}}``: per-benchmark replacements or additions, benchmark
                one of :data:`gloss_ray.options.BENCHMARKS`. In the multi-loss form they apply to
                every loss, and a loss's own ``overrides`` win over them.
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

Parameters are the options of :data:`gloss_ray.config.OPTIONS` marked ``searchable``
(:data:`KNOWN_PARAMS`); every constant, choice and range bound is checked with that option's own
check, so a space accepts exactly what a config file does. Integer options (``k``, ``batch_size``,
``epochs``, ``global_k``, ...) take constants, ``choice`` or ``randint`` only. ``k: null`` and
``k: dense`` both mean the dense graph and load as ``None``
(:func:`gloss_ray.options.dense_to_none`); Ray Tune's Optuna searcher (Ray 2.60, Optuna 5) accepts
``None`` inside ``tune.choice``, so :func:`to_tune` keeps it. :func:`decode_params` still maps a
``"dense"`` string (e.g. from a hand-written config or a CSV round-trip) back to ``None``.

The file is read with :func:`gloss_ray.options.load_yaml`, as every gloss-ray file: numbers such
as ``1e-5`` (no dot) are floats, unlike plain YAML 1.1, and a repeated key in one mapping is an
error rather than silently overwriting. Every error is a :class:`~gloss_ray.errors.ConfigError`
whose one-line message names the file and the key path,
e.g. ``tune_spaces/x.yaml: overrides.r52.k: randint low 0 is invalid: must be >= 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..config import OPTIONS
from ..options import BENCHMARKS, LOSSES, Option, dense_to_none, is_number, load_yaml

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "quniform")
TOP_LEVEL_KEYS = ("loss", "losses", "params", "overrides", "metric", "mode", "description")
# the parameters a space may set: the searchable options, with their checks
KNOWN_PARAMS: dict[str, Option] = {name: opt for name, opt in OPTIONS.items() if opt.searchable}


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
    if isinstance(raw, list):
        raise ctx.fail(where, "a list is not a spec; write {choice: [...]}")
    if not isinstance(raw, dict):
        value = dense_to_none(name, raw)
        _check_value(ctx, where, name, value)
        return value
    if len(raw) != 1 or next(iter(raw)) not in DISTRIBUTIONS:
        raise ctx.fail(where, f"must be a constant or a mapping with one key of "
                              f"{', '.join(DISTRIBUTIONS)}, got keys {', '.join(map(str, raw))}")
    kind, args = next(iter(raw.items()))
    if not isinstance(args, list) or not args:
        raise ctx.fail(where, f"{kind} needs a non-empty list")
    if kind == "choice":
        opts = [dense_to_none(name, v) for v in args]
        for v in opts:
            _check_value(ctx, where, name, v, "choice")
        return Dist("choice", tuple(opts))
    if param.integer and kind != "randint":
        raise ctx.fail(where, f"{name} is an integer: use randint or choice, not {kind}")
    nargs = 3 if kind == "quniform" else 2
    if len(args) != nargs or not all(is_number(a) for a in args):
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


def _read(ctx: _Ctx, path: str | Path) -> dict:
    """The file's top-level mapping, its keys checked."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read search space: {e.strerror or e}") from None
    try:
        doc = load_yaml(text)
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
    return doc


def _objective(ctx: _Ctx, doc: dict) -> tuple[str, str]:
    metric = doc.get("metric", "val_macro_f1")
    if not isinstance(metric, str) or not metric:
        raise ctx.fail("metric", "must be a non-empty string")
    mode = doc.get("mode", "max")
    if mode not in ("max", "min"):
        raise ctx.fail("mode", f"must be max or min, got {mode!r}")
    return metric, mode


def _blocks(ctx: _Ctx, doc: dict) -> dict[str, tuple[str, Any]]:
    """``{loss: (key path, raw block)}`` of either form."""
    if "loss" in doc:
        if not isinstance(doc["loss"], str):
            raise ctx.fail("loss", f"must be a loss name ({', '.join(LOSSES)})")
        return {doc["loss"]: ("", {})}
    raw = ctx.mapping(doc["losses"], "losses")
    if not raw:
        raise ctx.fail("losses", "is empty")
    return {name: (f"losses.{name}", b) for name, b in raw.items()}


def _loss_space(ctx: _Ctx, name: str, where: str, block: Any, shared: dict, shared_over: dict) -> LossSpace:
    """One loss's block, merged with the shared params and overrides."""
    if name not in LOSSES:
        raise ctx.fail(where or "loss", f"unknown loss {name!r} (known: {', '.join(LOSSES)})")
    block = {} if block is None else ctx.mapping(block, where)
    if block.keys() & {"params", "overrides"}:     # full form: {params:, overrides:}
        extra = set(block) - {"params", "overrides"}
        if extra:
            raise ctx.fail(f"{where}.{sorted(extra)[0]}", "a block with params/overrides takes no other keys")
        own = _parse_params(ctx, f"{where}.params", block.get("params"))
        own_over = _parse_overrides(ctx, f"{where}.overrides", block.get("overrides"))
    else:                                           # short form: {param: spec}
        own, own_over = _parse_params(ctx, where, block), {}
    over = {b: {**shared_over.get(b, {}), **own_over.get(b, {})}
            for b in BENCHMARKS if b in shared_over or b in own_over}
    return LossSpace({**shared, **own}, over)


def load_space(path: str | Path) -> Space:
    """Read and validate a search-space file (schema in the module docstring)."""
    ctx = _Ctx(str(path))
    doc = _read(ctx, path)
    metric, mode = _objective(ctx, doc)
    shared = _parse_params(ctx, "params", doc.get("params"))
    shared_over = _parse_overrides(ctx, "overrides", doc.get("overrides"))
    losses = {name: _loss_space(ctx, name, where, block, shared, shared_over)
              for name, (where, block) in _blocks(ctx, doc).items()}
    return Space(str(path), losses, metric, mode)


# --------------------------------------------------------------------------- Ray Tune
def to_tune(spec: dict[str, Any]) -> dict[str, Any]:
    """Turn ``Space.for_run`` specs into a ``ray.tune`` param space (constants stay as they are)."""
    return {k: v.to_tune() if isinstance(v, Dist) else v for k, v in spec.items()}


def decode_params(params: dict[str, Any]) -> dict[str, Any]:
    """A sampled config back to trainer values: ``k == "dense"`` becomes ``None``."""
    return {k: dense_to_none(k, v) for k, v in params.items()}
