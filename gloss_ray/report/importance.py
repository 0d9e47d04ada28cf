"""Which searched parameters mattered: :func:`parameter_effects` over a search's trials.

Every trial is scored at one *rung*, the first epoch (``RUNG_EPOCH``), because that is the epoch
that every trial of an ASHA search reaches: comparing each trial's best epoch would favour the
trials that ASHA let run longer. The scores come from the metric rows Ray Tune wrote for the
trial (``<trial folder>/result.json``, one JSON object per reported epoch).

For each parameter that varied across the trials the result gives
* ``importance``: Optuna's fANOVA importance (the share of the metric's variance explained by that
  parameter, a seeded random forest over the trials; the importances sum to 1), or None when the
  scores do not vary enough for the forest to explain anything (every trial scored the same), and
* ``levels``: for a categorical parameter the mean score per value, and for a numeric one the
  Spearman rank correlation with the score -- the direction, which fANOVA does not give.

With a few dozen trials these are indications, not measurements: the report says how many trials
they rest on.

    >>> trials = [{"config": {"lam": l, "variant": v}, "rung_metric": 0.5 + 0.1 * (v == "paper")}
    ...           for l in (0.2, 0.5, 0.8) for v in ("nll", "paper")]
    >>> effects = parameter_effects(trials)
    >>> effects[0]["param"]
    'variant'
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

RUNG_EPOCH = 1


def rung_metric(trial_dir: Path, metric: str, epoch: int = RUNG_EPOCH) -> float | None:
    """The trial's ``metric`` at ``epoch`` from Tune's ``result.json`` in ``trial_dir``, or None
    when the trial did not report that epoch (it failed before, or the file is missing)."""
    from .collect import tune_result_rows

    for row in tune_result_rows(trial_dir):
        if row.get("epoch") == epoch and _finite(row.get(metric)):
            return float(row[metric])
    return None


def with_rung_metrics(trials: list[dict], metric: str = "val_macro_f1") -> list[dict]:
    """``trials`` (records of :func:`gloss_ray.report.collect.load_trials`, each with the
    ``source`` trials.json; a trial's folder is the ``trial_id`` beside that file) with
    ``rung_metric`` added where Tune recorded it."""
    out = []
    for t in trials:
        src, tid = t.get("source"), t.get("trial_id")
        value = rung_metric(Path(src).parent / str(tid), metric) if src and tid else None
        out.append({**t, "rung_metric": value})
    return out


def parameter_effects(trials: list[dict], mode: str = "max", seed: int = 0) -> list[dict]:
    """Per varied parameter: ``{"param", "importance", "kind", "levels" | "spearman", "n"}``,
    most important first. ``trials`` need ``config`` and ``rung_metric`` (trials without a score
    are left out). Returns [] with fewer than 3 scored trials or nothing varied."""
    scored = [t for t in trials if _finite(t.get("rung_metric"))]
    if len(scored) < 3:
        return []
    configs = [t.get("config") or {} for t in scored]
    values = np.array([float(t["rung_metric"]) for t in scored])
    params = sorted(k for k in set().union(*configs)
                    if len({_key(c.get(k)) for c in configs}) > 1)
    if not params:
        return []
    importance = _fanova(params, configs, values, mode, seed) if np.ptp(values) > 0 else None
    effects = []
    for p in params:
        column = [c.get(p) for c in configs]
        effect = {"param": p, "importance": None if importance is None else importance.get(p, 0.0),
                  "n": len(scored)}
        if _numeric(column):
            from scipy.stats import spearmanr

            rho = spearmanr(np.asarray(column, dtype=float), values).statistic if np.ptp(values) > 0 else None
            effect.update(kind="numeric", spearman=float(rho) if _finite(rho) else None,
                          range=[float(min(column)), float(max(column))])
        else:
            effect.update(kind="categorical", levels=_levels(column, values))
        effects.append(effect)
    return sorted(effects, key=lambda e: -(e["importance"] or 0.0))


def _fanova(params: list[str], configs: list[dict], values: np.ndarray, mode: str,
            seed: int) -> dict | None:
    """Optuna's fANOVA importances of ``params`` over the scored trials, or None where every tree
    of its forest has zero variance (Optuna raises then; it happens with very few distinct
    scores, where each bootstrap sample can draw one score only)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists: dict[str, Any] = {}
    for p in params:
        column = [c.get(p) for c in configs]
        dists[p] = (FloatDistribution(float(min(column)), float(max(column))) if _numeric(column)
                    else CategoricalDistribution(sorted({_key(v) for v in column})))
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for c, v in zip(configs, values):
        study.add_trial(optuna.trial.create_trial(
            params={p: (float(c.get(p)) if isinstance(dists[p], FloatDistribution) else _key(c.get(p)))
                    for p in params},
            distributions=dists, value=float(v)))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=True))
    except RuntimeError as e:
        if "zero total variance" not in str(e):
            raise
        return None


def _levels(column: list, values: np.ndarray) -> list[dict]:
    """Mean score per value of a categorical parameter, best first."""
    groups: dict[str, list[float]] = {}
    for v, s in zip(column, values):
        groups.setdefault(_key(v), []).append(float(s))
    rows = [{"value": k, "n": len(s), "mean": float(np.mean(s))} for k, s in groups.items()]
    return sorted(rows, key=lambda r: -r["mean"])


def _key(v: Any) -> str:
    """A hashable, printable label for a parameter value (``None`` is the dense graph: ``dense``;
    floats to 4 significant digits)."""
    if v is None:
        return "dense"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _numeric(column: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in column) and \
        len({float(v) for v in column}) > 2


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
