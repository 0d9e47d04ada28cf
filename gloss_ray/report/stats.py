"""The numbers of a report: per-row aggregates over seeds, paired differences to CE (bootstrap CI
and paired t-test), convergence, the search summary and device-hours. No drawing, no writing.

All values are fractions (``0.8``, not ``80``); std is the sample std (ddof=1, None for one
value); differences are ``ours - baseline``.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..sweep.trials import best_trial, objective
from .collect import Results, Run, bench_rank, key_rank, num
from .importance import RUNG_EPOCH, parameter_effects, with_rung_metrics

METRICS = ("test_accuracy", "test_macro_f1", "best_val_macro_f1", "silhouette", "best_epoch",
           "wall_time_s")
DIFF_METRICS = ("test_accuracy", "test_macro_f1")
# graph prediction (issue 25, runs with graph_predict): in a row only when one of its runs has them
GRAPH_METRICS = ("test_classifier_macro_f1", "test_graph_accuracy", "test_graph_macro_f1", "test_blend_accuracy",
                 "test_blend_macro_f1", "val_classifier_macro_f1", "val_graph_macro_f1", "val_blend_macro_f1",
                 "graph_blend_alpha", "graph_blend_k", "graph_k", "graph_predict_s")
# training throughput (issue 26; metrics.json of runs since then): in a row only when one of its runs has them
THROUGHPUT_METRICS = ("train_tokens_per_s", "train_docs_per_s", "train_mfu", "train_padding", "device_peak_flops")
DIFF_FIELDS = ("mean_diff", "ci_low", "ci_high", "p_value", "n_pairs")   # copied into the row
N_BOOTSTRAP = 10_000
DEFAULT_ENCODER = "all-MiniLM-L6-v2"    # a run without --model used the packaged default encoder


@dataclass
class Summary:
    """What :func:`summarise` computes from one results directory."""
    rows: list[dict]            # one per benchmark x key (results.csv)
    diffs: list[dict]           # paired differences to the baselines
    convergence: list[dict]     # epochs / seconds to 99% of the best validation macro-F1
    curves: dict                # (benchmark, key) -> mean-over-seeds history by epoch
    search: dict                # see search_summary
    run_hours: dict[str, float]  # device -> hours of the final/bench runs


def summarise(results: Results) -> Summary:
    rows, diffs = aggregate(results.runs)
    conv_rows, curves = convergence(results.runs)
    return Summary(rows, diffs, conv_rows, curves, search_summary(results.trials),
                   run_hours(results.runs))


# --------------------------------------------------------------------------- basic statistics
def describe(values: list) -> dict:
    """mean, sample std (ddof=1; None below 2 values) and count of the numeric values."""
    v = [x for x in map(num, values) if x is not None]
    return {"mean": float(np.mean(v)) if v else None,
            "std": float(np.std(v, ddof=1)) if len(v) >= 2 else None, "n": len(v)}


def bootstrap_ci(d: np.ndarray, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the mean of ``d`` (``n_boot`` resamples)."""
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def paired_difference(ours: dict, base: dict, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> dict:
    """ours - base over the seeds both have: mean, bootstrap 95% CI of the mean (percentile,
    >= 2 pairs) and a paired t-test (``scipy.stats.ttest_rel``, >= 2 pairs, non-constant)."""
    from scipy import stats
    seeds = sorted(set(ours) & set(base), key=str)
    a = np.array([ours[s] for s in seeds], dtype=float)
    b = np.array([base[s] for s in seeds], dtype=float)
    d = a - b
    out = {"n_pairs": len(seeds), "seeds": seeds, "mean_diff": float(d.mean()) if len(d) else None,
           "ci_low": None, "ci_high": None, "t_stat": None, "p_value": None}
    if len(d) >= 2:
        lo, hi = bootstrap_ci(d, n_boot, seed)
        out.update(ci_low=lo, ci_high=hi)
        if np.ptp(d) > 0:
            t = stats.ttest_rel(a, b)
            out.update(t_stat=float(t.statistic), p_value=float(t.pvalue))
    return out


# --------------------------------------------------------------------------- results rows
def aggregate(runs: list[Run]) -> tuple[list[dict], list[dict]]:
    """Rows (one per benchmark x key) and paired differences to CE (ours - CE, fractions); each
    row also gets ``delta_*`` (vs CE) and ``delta_batch_*`` (a global-graph row vs the same loss
    without the global graph) columns."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.m["benchmark"], r.key)].append(r)
    rows = [_row(bench, key, rs) for (bench, key), rs in groups.items()]
    diffs = []
    for row in rows:
        for d in _differences(row, groups):
            diffs.append(d)
            prefix = "delta" if d["baseline"] == _ce_key(row) else "delta_batch"
            row.update({f"{prefix}_{d['metric']}_{k}": d[k] for k in DIFF_FIELDS})
    return rows, diffs


def _row(bench: str, key: str, rs: list[Run]) -> dict:
    """One benchmark x key: what the runs share, then mean/std/n of every metric."""
    cfg = rs[0].m.get("config") or {}
    row = {"benchmark": bench, "key": key, "loss": rs[0].m["loss"],
           "variant": cfg.get("variant"), "global_graph": bool(rs[0].m.get("global_graph")),
           "label_fraction": rs[0].m.get("label_fraction", 1.0),
           "encoder": next((cfg[k] for k in ("model", "encoder", "model_name") if cfg.get(k)),
                           DEFAULT_ENCODER if "model" in cfg else None),
           "n_seeds": len(rs), "seeds": [r.m["seed"] for r in rs]}
    optional = tuple(g for g in GRAPH_METRICS + THROUGHPUT_METRICS if any(g in r.m for r in rs))
    for name in METRICS + optional:
        s = describe([r.m.get(name) for r in rs])
        row.update({f"{name}_mean": s["mean"], f"{name}_std": s["std"], f"{name}_n": s["n"]})
    return row


def _ce_key(row: dict) -> str:
    """The CE row a row is compared with: ``ce``, or ``ce@fraction`` for a label fraction < 1."""
    lf = num(row["label_fraction"])
    return "ce" + (f"@{lf:g}" if lf is not None and lf < 1 else "")


def _differences(row: dict, groups: dict[tuple, list[Run]]) -> list[dict]:
    """A row against CE and, a global-graph row, also against the same loss without the global
    graph (when there is one): one dict per baseline x metric."""
    bench, key, base = row["benchmark"], row["key"], _ce_key(row)
    if key == base:
        return []
    batch = key.replace("+global", "")
    bases = [base] + ([batch] if "+global" in key and (bench, batch) in groups else [])
    out = []
    for b in bases:
        for name in DIFF_METRICS:
            d = {"benchmark": bench, "key": key, "baseline": b, "metric": name}
            if (bench, b) not in groups:
                d.update(n_pairs=0, seeds=[], mean_diff=None, ci_low=None, ci_high=None,
                         t_stat=None, p_value=None, note="CE missing")
            else:
                d.update(paired_difference(_by_seed(groups[(bench, key)], name),
                                           _by_seed(groups[(bench, b)], name)))
                d["note"] = "" if d["n_pairs"] else "no common seeds"
            out.append(d)
    return out


def _by_seed(rs: list[Run], name: str) -> dict:
    return {r.m["seed"]: num(r.m[name]) for r in rs if num(r.m[name]) is not None}


# --------------------------------------------------------------------------- convergence
def convergence(runs: list[Run]) -> tuple[list[dict], dict]:
    """Per benchmark x key: mean epochs (and seconds) to reach 99% of each run's best validation
    macro-F1, and mean-over-seeds curves by epoch (val_macro_f1, elapsed_s, homophily ...)."""
    per: dict[tuple, list] = defaultdict(list)
    frames: dict[tuple, list] = defaultdict(list)
    for r in runs:
        h = r.history
        if h is None or not {"epoch", "val_macro_f1"} <= set(h.columns) or h.empty:
            continue
        h = h.sort_values("epoch").reset_index(drop=True)
        f1 = pd.to_numeric(h["val_macro_f1"], errors="coerce").to_numpy(dtype=float)
        if not np.isfinite(f1).any():
            continue
        hit = int(np.argmax(f1 >= 0.99 * np.nanmax(f1)))
        per[(r.m["benchmark"], r.key)].append(
            (hit + 1, float(h["elapsed_s"].iloc[hit]) if "elapsed_s" in h else None))
        frames[(r.m["benchmark"], r.key)].append(h)
    rows, curves = [], {}
    for (bench, key), vals in per.items():
        rows.append({"benchmark": bench, "key": key, "n_runs": len(vals),
                     "epochs_to_99": float(np.mean([v[0] for v in vals])),
                     "time_to_99_s": describe([v[1] for v in vals])["mean"]})
        curves[(bench, key)] = _mean_curve(frames[(bench, key)])
    return rows, curves


def _mean_curve(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The histories' numeric curves averaged by epoch."""
    cols = [c for c in ("val_macro_f1", "elapsed_s", "homophily", "recall_at_k")
            if any(c in f for f in frames)]
    return (pd.concat(frames)[["epoch", *cols]]
            .apply(pd.to_numeric, errors="coerce").groupby("epoch").mean())


# --------------------------------------------------------------------------- search and hours
def device_hours(time_s, num_workers) -> float:
    """time x workers / 3600 (no time: 0; no worker count: 1)."""
    return (num(time_s) or 0.0) * (num(num_workers) or 1.0) / 3600


def run_hours(runs: list[Run]) -> dict[str, float]:
    """Device-hours of the final/bench runs, by device."""
    hours: dict[str, float] = defaultdict(float)
    for r in runs:
        hours[r.m.get("device") or "cpu"] += device_hours(r.m.get("wall_time_s"), r.m.get("num_workers"))
    return dict(hours)


def search_summary(trials: list[dict]) -> dict:
    """Best trial per benchmark x loss, status counts, errors and device-hours spent."""
    groups: dict[tuple, list] = defaultdict(list)
    for t in trials:
        groups[(t["benchmark"], t["loss"])].append(t)
    best, counts, errors, effects = [], [], [], []
    hours: dict[str, float] = defaultdict(float)
    for (bench, loss), ts in sorted(groups.items(), key=lambda kv: (bench_rank(kv[0][0]),
                                                                     key_rank(kv[0][1]))):
        counts.append(_trial_counts(bench, loss, ts))
        for t in ts:
            hours[t.get("device") or "cpu"] += device_hours(t.get("time_s"), t.get("num_workers"))
        errors += [{k: t.get(k) for k in ("benchmark", "loss", "trial_id", "error")}
                   for t in ts if t.get("status") == "ERROR"]
        top = _best_trial(bench, loss, ts)
        if top is not None:
            best.append(top)
        mode = top["mode"] if top is not None else "max"
        if found := parameter_effects(with_rung_metrics(ts), mode=mode):
            effects.append({"benchmark": bench, "loss": loss, "epoch": RUNG_EPOCH, "effects": found})
    return {"best": best, "counts": counts, "errors": errors, "effects": effects, "hours_by_device": dict(hours)}


def _trial_counts(bench: str, loss: str, ts: list[dict]) -> dict:
    """Trials by status and device-hours by device, of one benchmark x loss."""
    status = defaultdict(int)
    spent = defaultdict(float)
    for t in ts:
        status[t.get("status") or "UNKNOWN"] += 1
        spent[t.get("device") or "cpu"] += device_hours(t.get("time_s"), t.get("num_workers"))
    return {"benchmark": bench, "loss": loss, "trials": len(ts),
            "terminated": status["TERMINATED"], "stopped_early": status["STOPPED_EARLY"],
            "errored": status["ERROR"],
            "other": len(ts) - status["TERMINATED"] - status["STOPPED_EARLY"] - status["ERROR"],
            "hours_by_device": dict(spent)}


def _best_trial(bench: str, loss: str, ts: list[dict]) -> dict | None:
    """The search's best trial (:func:`gloss_ray.sweep.trials.best_trial`: the one the sweep
    retrained), its objective and the parameters that varied."""
    top = best_trial(ts)
    if top is None:
        return None
    metric, mode, value = objective(top)
    cfgs = [t.get("config") or {} for t in ts]
    varied = sorted(k for k in set().union(*cfgs)
                    if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in cfgs}) > 1)
    return {"benchmark": bench, "loss": loss, "trial_id": top.get("trial_id"),
            "best_val_macro_f1": num(top.get("best_val_macro_f1")), "metric": metric, "mode": mode,
            "best_metric": value, "config": top.get("config") or {}, "searched": varied}
