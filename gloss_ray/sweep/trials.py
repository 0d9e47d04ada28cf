"""The best trial of a search, defined once: the sweep retrains it and the report names it.

A trial record (``trials.json``, written by :func:`gloss_ray.sweep.search.trial_records`) carries
its search's objective: ``metric`` (a per-epoch metric of the search space), ``mode`` (``max`` or
``min``) and ``best_metric`` (the trial's best epoch on that metric). Records written before
``mode`` was recorded are read as maximised; records without ``best_metric`` as ``val_macro_f1``.
"""
from __future__ import annotations

import math

DEFAULT_METRIC, DEFAULT_MODE = "val_macro_f1", "max"


def objective(record: dict) -> tuple[str, str, float | None]:
    """``(metric, mode, value)`` of one trial record; value None when it has none (or not finite)."""
    metric = record.get("metric") or DEFAULT_METRIC
    mode = record.get("mode") or DEFAULT_MODE
    value = record.get("best_metric", record.get(f"best_{metric}"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        value = None
    return metric, mode, value


def best_trial(records: list[dict]) -> dict | None:
    """The non-errored trial of one search with the best value of the search's objective (the
    largest for ``mode: max``, the smallest for ``min``; the first of equals), or None."""
    ok = [t for t in records if t.get("status") != "ERROR" and objective(t)[2] is not None]
    if not ok:
        return None
    sign = -1.0 if objective(ok[0])[1] == "min" else 1.0
    return max(ok, key=lambda t: sign * objective(t)[2])
