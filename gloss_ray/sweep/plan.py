"""A sweep's plan, checked before anything starts: the options (:class:`SweepOptions`), ``--set``
and ``--losses`` parsing, the base configuration of every benchmark x loss (:func:`base_configs`),
the search space (tune), the sweep folder, and the final / bench runs (:meth:`Plan.runs`).

Every problem here is a :class:`~gloss_ray.errors.ConfigError` (one line, exit status 2) raised
before Ray starts or anything is written."""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass

import yaml

from ..config import TrainConfig, read_sources
from ..errors import ConfigError
from ..options import dense_to_none, load_yaml
from ..storage import absolute, join
from . import algorithms
from .spaces import Space, load_space

GLOBAL_K_DEFAULT = 16      # global_k of a LOSS+global spec when the options set none
DEFAULT_SAMPLES = 8        # --samples when not given (not used by --search-alg grid)
REPORTED = ("val_macro_f1", "val_accuracy", "train_loss", "train_ce", "train_aux")  # metrics a space may name
_SPEC = re.compile(r"^(?P<loss>[a-z_]+)(?P<glob>\+global)?(?:@(?P<frac>[0-9.]+))?$")


def last_line(err) -> str:
    """An error's last non-empty line (Ray's wrapped errors end with the cause), else its type."""
    lines = [ln.strip() for ln in str(err or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


@dataclass(frozen=True)
class SweepOptions:
    """What ``gloss-ray tune`` / ``gloss-ray bench`` was asked for; the CLI fills it from its flags
    (same names, defaults there). ``space``, ``samples``, ``grace_epochs``, ``search_alg`` and
    ``scheduler`` are for ``tune`` (None: the default; :mod:`gloss_ray.sweep.algorithms`)."""
    command: str                  # "tune": search, then final runs; "bench": the base configs as they are
    benchmarks: str               # comma-separated
    losses: str                   # comma-separated loss specs, LOSS[+global][@FRACTION]
    seeds: int
    storage: str
    name: str | None
    config: str | None            # YAML of base TrainConfig options
    set: list[str]                # "KEY=VALUE" overrides of the base options (--set)
    workers: int
    gpu: bool
    concurrency: int | None       # runs (trials) at a time; None: what the cluster holds
    keep_checkpoints: bool
    space: str | None = None
    samples: int | None = None
    grace_epochs: int | None = None
    search_alg: str | None = None   # optuna (default), hyperopt, random, grid, bohb
    scheduler: str | None = None    # asha (default; bohb with --search-alg bohb), fifo, pbt, bohb
    report_to: str | None = None    # trackers of every run (gloss_ray.train.tracking); None: none
    tracking_uri: str | None = None  # MLflow store or server; None: sqlite:///<storage>/mlflow.db


# --------------------------------------------------------------------------- parsing
def parse_sets(items: list[str]) -> dict:
    """``["lr=1e-4", "k=dense"]`` -> ``{"lr": 1e-4, "k": None}``: values read as YAML with
    :func:`gloss_ray.options.load_yaml` (``1e-4`` is a float), ``k=dense`` is the dense graph."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            parsed = load_yaml(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: not valid YAML ({str(e).splitlines()[0]})") from None
        out[key] = dense_to_none(key, parsed)
    return out


def parse_loss_spec(spec: str) -> tuple[str, bool, float | None]:
    """``"gloss+global@0.2"`` -> ``("gloss", True, 0.2)``: a loss, ``+global`` for the global graph
    and ``@F`` for training on a fraction F of the labels -- the report's row keys."""
    m = _SPEC.match(spec)
    frac = None
    if m and m["frac"]:
        try:
            frac = float(m["frac"])
        except ValueError:
            m = None
    if not m:
        raise ConfigError(f"--losses: {spec!r}: expected LOSS[+global][@FRACTION], e.g. ce, gloss+global, ce@0.2")
    return m["loss"], bool(m["glob"]), frac


def split_list(text: str) -> list[str]:
    """``"mr, r8,mr"`` -> ``["mr", "r8"]`` (order kept, repeats dropped)."""
    items = list(dict.fromkeys(x.strip() for x in (text or "").split(",") if x.strip()))
    if not items:
        raise ConfigError(f"expected a comma-separated list, got {text!r}")
    return items


# --------------------------------------------------------------------------- configurations
def base_configs(opts: SweepOptions, benchmarks: list[str], losses: list[str]) -> dict[tuple, dict]:
    """Validated base options per (benchmark, loss spec), as dicts, with the data folder pinned
    (trial actors and workers may not share the driver's environment). ``opts`` gives ``config``,
    ``workers``, ``gpu`` and ``set``. A spec's ``+global`` turns the global graph on (``global_k``
    from the options, else 16); when some spec has it, the specs without it run without the global
    graph (so ``ce,gloss,gloss+global`` compares the three). ``@F`` sets ``label_fraction``. Bad
    options fail here, in one line, before any run starts; the data and the model are checked by
    :meth:`Plan.preflight`, once the driver has the data (:func:`gloss_ray.cli.fetch_data`)."""
    overrides = {"workers": opts.workers, **({"gpu": True} if opts.gpu else {}),
                 **{k: v for k in ("report_to", "tracking_uri") if (v := getattr(opts, k, None))},
                 **parse_sets(opts.set)}
    options, source = read_sources(opts.config, overrides)
    bases = {}
    specs = {spec: parse_loss_spec(spec) for spec in losses}
    compare_global = any(glob for _, glob, _ in specs.values())
    for b in benchmarks:
        for spec, (loss, glob, frac) in specs.items():
            d = {**options, "benchmark": b, "loss": loss}
            if compare_global:
                d["global_k"] = (d.get("global_k") or GLOBAL_K_DEFAULT) if glob else 0
            if frac is not None:
                d["label_fraction"] = frac
            bases[(b, spec)] = TrainConfig.from_dict(d, source=f"{source} with --losses {spec}").resolved().to_dict()
    return bases


def run_config(base: dict, params: dict, seed: int, storage: str, name: str, stage: str,
               trial_id: str | None = None) -> TrainConfig:
    """One run of a sweep: ``base`` + ``params`` (a trial's sample or the best one), written to
    ``<storage>/<name>``, of ``stage`` (trial, final, bench) and, for a trial or the final runs of the
    best one, ``trial_id``."""
    d = {**base, **params, "seed": seed, "storage": storage, "name": name, "stage": stage, "trial_id": trial_id}
    return TrainConfig.from_dict(d, source=f"{stage} run {name}")


# --------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """A checked sweep; nothing has started. ``bases``: ``(benchmark, loss spec) -> base options``
    (a dict of TrainConfig fields); ``space``: the search space (tune), None for bench."""
    options: SweepOptions
    benchmarks: list[str]
    losses: list[str]
    bases: dict[tuple[str, str], dict]
    space: Space | None
    name: str
    sweep_dir: str
    search_alg: str = algorithms.DEFAULT_SEARCH_ALG
    scheduler: str = algorithms.DEFAULT_SCHEDULER

    def preflight(self) -> None:
        """Check every benchmark's data and the model on the driver (one line on a problem), before Ray
        starts: the first loss spec's base configuration of each benchmark."""
        from ..train.launch import preflight

        for b in self.benchmarks:
            preflight(TrainConfig.from_dict(self.bases[(b, self.losses[0])]))

    @property
    def stage(self) -> str:
        return "final" if self.space is not None else "bench"

    def runs(self, benchmark: str, loss: str, params: dict | None = None,
             trial_id: str | None = None) -> list[tuple[str, TrainConfig]]:
        """``(label, cfg)`` of one benchmark x loss's final (``params`` of the best trial
        ``trial_id``) or bench runs, one per seed, in ``runs/<benchmark>/<loss>/seed<k>``."""
        base = self.bases[(benchmark, loss)]
        where = join(self.sweep_dir, "runs", benchmark, loss)
        return [(f"{self.stage} {benchmark} x {loss} seed {k}",
                 run_config(base, params or {}, k, where, f"seed{k}", self.stage, trial_id))
                for k in range(self.options.seeds)]


def _samples(opts: SweepOptions, search_alg: str) -> int:
    """``--samples``, else :data:`DEFAULT_SAMPLES`; a grid search takes none (it runs each combination once)."""
    if search_alg == "grid":
        if opts.samples is not None:
            raise ConfigError("--samples: not used by --search-alg grid, which runs every combination of the "
                              "space's choice values once; leave it out")
        return 1
    return DEFAULT_SAMPLES if opts.samples is None else opts.samples


def _search_space(opts: SweepOptions, bases: dict, search_alg: str, scheduler: str) -> Space:
    """tune: the space file, checked against every benchmark x loss of the sweep and the search
    algorithm and scheduler."""
    if _samples(opts, search_alg) < 1 or (opts.grace_epochs or 0) < 1:
        raise ConfigError("--samples and --grace-epochs must be >= 1")
    space = load_space(opts.space)
    if space.metric not in REPORTED:
        raise ConfigError(f"{opts.space}: metric: {space.metric!r} is not reported each epoch "
                          f"(one of {', '.join(REPORTED)})")
    for b, spec in bases:
        if parse_loss_spec(spec)[1:] != (False, None):
            raise ConfigError(f"--losses: {spec!r}: +global and @FRACTION are for gloss-ray bench; in a "
                              "search put global_k / label_fraction in --set or the space file")
        algorithms.check_space(search_alg, scheduler, space.for_run(b, spec),   # unknown benchmark, loss not in
                               f"{opts.space} for {b} x {spec}")                  # the space, or no fit
    return space


def _tracking(opts: SweepOptions, bases: dict, name: str) -> None:
    """Every run of the sweep logs to the same trackers, MLflow's under one experiment (default: the
    sweep's name) in one store (default: ``sqlite:///<storage>/mlflow.db``): filled into the bases,
    checked, the experiment created. Step checkpoints are refused in a search: each would reach Tune
    as a result without the epoch's metrics."""
    from ..train import tracking

    for d in bases.values():
        if opts.command == "tune" and d.get("checkpoint_every"):
            raise ConfigError("--set checkpoint_every: not in gloss-ray tune, whose trials report to Tune once per "
                              "epoch and checkpoint then; use it with gloss-ray train or bench")
        tracking.fill_defaults(d, absolute(opts.storage), name)
        cfg = TrainConfig.from_dict(d, source="--report-to")
        tracking.prepare(cfg)
        d.update(experiment=cfg.experiment, tracking_uri=cfg.tracking_uri, git_commit=cfg.git_commit)


def make_plan(opts: SweepOptions) -> Plan:
    """Check every option, base configuration and (tune) the space; name the sweep folder
    ``<storage>/<name>`` (default name ``sweep-<timestamp>``)."""
    benchmarks, losses = split_list(opts.benchmarks), split_list(opts.losses)
    if opts.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {opts.seeds}")
    if opts.command != "tune" and (opts.search_alg or opts.scheduler):
        raise ConfigError("--search-alg / --scheduler: for gloss-ray tune only")
    alg, sched = algorithms.resolve(opts.search_alg, opts.scheduler) if opts.command == "tune" else (None, None)
    bases = base_configs(opts, benchmarks, losses)
    space = None
    if opts.command == "tune":
        space = _search_space(opts, bases, alg, sched)
        opts = dataclasses.replace(opts, samples=_samples(opts, alg))
    name = opts.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = join(absolute(opts.storage), name)
    _tracking(opts, bases, name)
    for b, spec in bases if space is not None else ():     # an interrupted search resumes with its own choice
        algorithms.check_resume(join(sweep_dir, "search", f"{b}__{spec}"), alg, sched)
    return Plan(opts, benchmarks, losses, bases, space, name, sweep_dir,
                *((alg, sched) if space is not None else ()))
