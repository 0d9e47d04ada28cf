"""The search algorithm and trial scheduler of a ``gloss-ray tune`` search (``--search-alg``,
``--scheduler``), all Ray Tune's own:

============  =====================================================================================
search alg    what samples the trials' configurations
============  =====================================================================================
``optuna``    ``ray.tune.search.optuna.OptunaSearch`` (TPE), seeded per benchmark x loss -- the default
``hyperopt``  ``ray.tune.search.hyperopt.HyperOptSearch`` (TPE), seeded; needs the ``hyperopt`` package
``random``    ``ray.tune.search.basic_variant.BasicVariantGenerator``: independent random samples, seeded
``grid``      the same generator over every combination of the space's ``choice`` values (each run
              once; ``--samples`` is not used); a continuous range in the space is refused
``bohb``      ``ray.tune.search.bohb.TuneBOHB`` with its scheduler ``HyperBandForBOHB``; needs the
              ``hpbandster`` and ``ConfigSpace`` packages
============  =====================================================================================

============  =====================================================================================
scheduler     what decides, per epoch, whether a trial goes on
============  =====================================================================================
``asha``      ``ASHAScheduler``: stops the worse trials at each rung (--grace-epochs, reduction 4) -- the default
``fifo``      ``FIFOScheduler``: every trial runs all its epochs
``pbt``       ``PopulationBasedTraining`` (synchronous: every ``--grace-epochs`` epochs, once all
              trials got there, the worst quarter of the
              trials continue from a copy of a best-quarter trial's checkpoint with mutated values
              of the parameters that can change mid-run (:data:`PBT_MUTABLE`: lambda and the
              lambda / sigma / k schedules, gamma, k, ...); with ``random`` or ``grid`` only (Ray
              refuses a search algorithm beside PBT); never at a trial's last epoch
              (:class:`gloss_ray.sweep.search.SynchronousPBT`). Needs
              ``gloss_ray.train.launch.fit(start_checkpoint=...)`` (:func:`pbt_supported`)
``bohb``      ``HyperBandForBOHB``: the only scheduler of ``--search-alg bohb`` (its default there)
============  =====================================================================================

Every wrong combination is a one-line :class:`~gloss_ray.errors.ConfigError` naming the option,
raised before Ray starts. A search writes its choice into ``<search>/search.json``
(:data:`META`); the trial records and the report carry the names, and a resumed search must be
run with the choice it was started with (a search without ``search.json`` was started before the
choice existed: optuna + asha).
"""
from __future__ import annotations

import functools
import importlib.util
import math

from ..errors import ConfigError
from ..storage import exists, join, read_json, write_json
from .spaces import Dist

SEARCH_ALGS = ("optuna", "hyperopt", "random", "grid", "bohb")
SCHEDULERS = ("asha", "fifo", "pbt", "bohb")
DEFAULT_SEARCH_ALG, DEFAULT_SCHEDULER = "optuna", "asha"
NO_SEARCH = "none"          # recorded when the space holds constants only: one trial, nothing sampled
ASHA_REDUCTION = 4          # ASHA (and BOHB's HyperBand) keep the best 1/4 of the trials at each rung
# Parameters PBT may change while a trial runs: those a run resumed from a checkpoint takes from its
# new configuration. Not the others: lr, head_lr, weight_decay and warmup_ratio live in the restored
# optimiser / LR-scheduler state, sigma's strategy value is restored from the checkpoint, and
# epochs / batch_size fix the number of steps the schedules run over.
PBT_MUTABLE = ("lam", "lam_schedule", "sigma_schedule", "k", "k_schedule", "gamma", "temperature", "margin",
               "global_weight")
PBT_CHECKPOINTS_KEPT = 4    # Tune checkpoints kept per PBT trial (Ray warns that <= 2 may be too few)
META = "search.json"
_PACKAGES = {"hyperopt": ("hyperopt",), "bohb": ("hpbandster", "ConfigSpace")}


def resolve(search_alg: str | None, scheduler: str | None) -> tuple[str, str]:
    """The ``(search alg, scheduler)`` of ``--search-alg`` / ``--scheduler`` (None: the default),
    checked: names, the packages they need, and the combinations Ray Tune accepts."""
    alg = search_alg or DEFAULT_SEARCH_ALG
    if alg not in SEARCH_ALGS:
        raise ConfigError(f"--search-alg {alg}: unknown (one of {', '.join(SEARCH_ALGS)})")
    sched = scheduler or ("bohb" if alg == "bohb" else DEFAULT_SCHEDULER)
    if sched not in SCHEDULERS:
        raise ConfigError(f"--scheduler {sched}: unknown (one of {', '.join(SCHEDULERS)})")
    if (alg == "bohb") != (sched == "bohb"):
        raise ConfigError(f"--scheduler {sched}: --search-alg bohb runs with --scheduler bohb (HyperBandForBOHB) "
                          "and that scheduler with it only")
    if sched == "pbt" and alg not in ("random", "grid"):
        raise ConfigError(f"--scheduler pbt: takes --search-alg random or grid, not {alg} (Ray Tune refuses a "
                          "search algorithm beside PBT, which explores by mutating the trials itself)")
    # after the combination checks: a wrong combination is wrong whatever is installed
    missing = [p for p in _PACKAGES.get(alg, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"--search-alg {alg}: needs the Python package(s) {', '.join(missing)}, not installed "
                          f"(pip install {' '.join(missing)})")
    if sched == "pbt" and not pbt_supported():
        raise ConfigError("--scheduler pbt: not available yet: a PBT trial must start a Train run from another "
                          "trial's checkpoint, which Ray Train 2.60 (V2) refuses as resume_from_checkpoint and "
                          "gloss_ray.train.launch.fit does not take yet (start_checkpoint)")
    return alg, sched


def pbt_supported() -> bool:
    """Whether a Train run can start from a given checkpoint (``fit(start_checkpoint=...)``), which a
    PBT trial continuing another trial's checkpoint needs (Train V2 has no ``resume_from_checkpoint``)."""
    import inspect

    from ..train.launch import fit

    return "start_checkpoint" in inspect.signature(fit).parameters


def label(alg: str, sched: str) -> str:
    """``optuna + asha``: how the logs and the report name a search's method."""
    return f"{alg} + {sched}"


# --------------------------------------------------------------------------- the space
def searched(spec: dict) -> list[str]:
    """The parameters of a space (``Space.for_run``) that are distributions."""
    return [k for k, v in spec.items() if isinstance(v, Dist)]


def check_space(alg: str, sched: str, spec: dict, where: str) -> None:
    """The space of one benchmark x loss (``where`` names it) suits the choice: ``grid`` takes
    ``choice`` values only; ``pbt`` needs a distribution over a parameter of :data:`PBT_MUTABLE`."""
    if alg == "grid":
        ranges = [k for k in searched(spec) if spec[k].kind != "choice"]
        if ranges:
            raise ConfigError(f"--search-alg grid: {where}: {ranges[0]} is a {spec[ranges[0]].kind} range; a grid "
                              "takes {choice: [...]} values only (use --search-alg random, optuna, ...)")
    if sched == "pbt" and searched(spec) and not set(searched(spec)) & set(PBT_MUTABLE):
        raise ConfigError(f"--scheduler pbt: {where}: searches none of {', '.join(PBT_MUTABLE)}, the parameters "
                          "PBT can change while a trial runs")


def grid_size(spec: dict) -> int:
    """Trials of a grid search: the product of the ``choice`` lengths."""
    return math.prod(len(v.args) for v in spec.values() if isinstance(v, Dist))


def param_space(alg: str, spec: dict) -> dict:
    """The Tune ``param_space``: the distributions, or for ``grid`` each choice as ``tune.grid_search``."""
    from ray import tune

    if alg == "grid":
        return {k: tune.grid_search(list(v.args)) if isinstance(v, Dist) else v for k, v in spec.items()}
    return {k: v.to_tune() if isinstance(v, Dist) else v for k, v in spec.items()}


# --------------------------------------------------------------------------- Ray Tune objects
def searcher(alg: str, metric: str, mode: str, seed: int | None):
    """The Tune search algorithm (None: Tune's default generator, for a space of constants)."""
    if seed is None:
        return None
    if alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=metric, mode=mode, seed=seed)
    if alg == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=metric, mode=mode, random_state_seed=seed)
    if alg == "bohb":
        from ray.tune.search.bohb import TuneBOHB

        return TuneBOHB(metric=metric, mode=mode, seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed)        # random and grid


def _clip(bounds: dict, config: dict) -> dict:
    """PBT's ``custom_explore_fn``: a perturbed value (x 0.8 / 1.2) put back inside its range."""
    out = dict(config)
    for key, (kind, args) in bounds.items():
        v = out.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lo, hi = (args[0], args[1] - 1) if kind == "randint" else (args[0], args[1])
            v = min(max(v, lo), hi)
            if kind == "quniform":
                v = min(max(round(v / args[2]) * args[2], lo), hi)
            out[key] = int(round(v)) if kind == "randint" else float(v)
    return out


def pbt_mutations(spec: dict) -> tuple[dict, functools.partial]:
    """``(hyperparam_mutations, custom_explore_fn)`` of PBT: choices as lists (PBT shifts to a neighbour
    or resamples), ranges as Tune domains (resampled, or x 0.8 / 1.2 then clipped by :func:`_clip`)."""
    mutations, ranges = {}, {}
    for k in searched(spec):
        if k not in PBT_MUTABLE:
            continue
        d = spec[k]
        if d.kind == "choice":
            mutations[k] = list(d.args)
        else:
            mutations[k] = d.to_tune()
            ranges[k] = (d.kind, tuple(d.args))
    return mutations, functools.partial(_clip, ranges)


# --------------------------------------------------------------------------- the search's record
def read_meta(exp_dir: str) -> dict | None:
    """``search.json`` of a search folder; the default choice for a search started before it was
    written (its Tune state exists); None for a search not started."""
    path = join(exp_dir, META)
    if exists(path):
        return read_json(path)
    if exists(exp_dir):
        return {"search_alg": DEFAULT_SEARCH_ALG, "scheduler": DEFAULT_SCHEDULER}
    return None


def write_meta(exp_dir: str, alg: str, sched: str, recorded_alg: str, metric: str, mode: str) -> dict:
    """Write ``search.json``: what was asked (``requested``) and what samples the trials
    (``search_alg``: :data:`NO_SEARCH` for a space of constants)."""
    meta = {"search_alg": recorded_alg, "scheduler": sched, "requested": {"search_alg": alg, "scheduler": sched},
            "metric": metric, "mode": mode}
    write_json(join(exp_dir, META), meta)
    return meta


def check_resume(exp_dir: str, alg: str, sched: str) -> None:
    """An interrupted search resumes with the choice it started with (Tune restores its own
    searcher and scheduler); another choice is refused rather than silently ignored."""
    meta = read_meta(exp_dir)
    if meta is None or exists(join(exp_dir, "trials.json")):
        return
    started = meta.get("requested") or meta
    if (started.get("search_alg"), started.get("scheduler")) != (alg, sched):
        raise ConfigError(f"--search-alg/--scheduler: {exp_dir} was started with --search-alg "
                          f"{started.get('search_alg')} --scheduler {started.get('scheduler')}; resume it with those, "
                          "or give a new --name")
