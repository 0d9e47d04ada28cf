"""Reading a results directory: finished runs (``**/metrics.json`` with ``history.csv`` and
``plots/embedding_map.png`` beside it) and search trials (``**/trials.json``).

Runs of stage ``final`` or ``bench`` (or no stage) are kept; ``trial`` runs are not. Unreadable or
incomplete files are not raised but appended to ``skipped`` as ``(path, reason)``. When one seed
of one row has several runs, a ``final`` run wins over ``bench``, then the newest file.

A row of the results is a *key* (:func:`run_key`): the loss, plus ``/variant`` when runs of that
loss used several G-Loss variants, ``+global`` with the global graph and ``@fraction`` when
trained on a label fraction below 1 (e.g. ``gloss+global@0.1``).
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..options import BENCHMARKS, LOSSES

REQUIRED = ("benchmark", "loss", "seed", "test_accuracy", "test_macro_f1")


@dataclass
class Run:
    """One finished run: its directory, metrics.json contents, row key and history."""
    dir: Path
    m: dict
    key: str = ""
    history: pd.DataFrame | None = None
    mtime: float = 0.0

    @property
    def embedding_map(self) -> Path | None:
        p = self.dir / "plots" / "embedding_map.png"
        return p if p.is_file() else None


@dataclass
class Results:
    """Everything read from one results directory."""
    dir: Path
    runs: list[Run]
    trials: list[dict]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def benchmarks(self) -> list[str]:
        """Every benchmark with a run or a trial, in the order of :data:`gloss_ray.options.BENCHMARKS`."""
        return sorted({r.m["benchmark"] for r in self.runs} | {t["benchmark"] for t in self.trials},
                      key=bench_rank)


def num(v: Any) -> float | None:
    """A finite number as float, else None (bools are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        return None
    return float(v) if math.isfinite(v) else None


def bench_rank(b: str):
    """Sort key of a benchmark: the known ones in their order, then the others by name."""
    return (BENCHMARKS.index(b), "") if b in BENCHMARKS else (len(BENCHMARKS), b)


def key_rank(key: str):
    """Sort key of a row key (or a loss): by loss in the order of :data:`gloss_ray.options.LOSSES`."""
    loss = re.split(r"[/+@]", key)[0]
    return (LOSSES.index(loss) if loss in LOSSES else len(LOSSES), key)


def run_key(m: dict, multi_variant: bool = False) -> str:
    """Row key of a run: loss [/variant] [+global] [@label_fraction]."""
    key = str(m["loss"])
    if multi_variant:
        key += f"/{(m.get('config') or {}).get('variant') or 'default'}"
    if m.get("global_graph"):
        key += "+global"
    lf = num(m.get("label_fraction"))
    if lf is not None and lf < 1:
        key += f"@{lf:g}"
    return key


def collect(results_dir: str | Path) -> Results:
    """Runs and trials under ``results_dir``; :class:`ConfigError` naming it if it is missing or
    holds neither a metrics.json nor a search (a search still running has trials and no runs yet)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ConfigError(f"{results_dir}: results directory does not exist")
    skipped: list[tuple[str, str]] = []
    runs, trials = load_runs(results_dir, skipped), load_trials(results_dir, skipped)
    if next(results_dir.rglob("metrics.json"), None) is None and not trials:
        raise ConfigError(f"{results_dir}: no metrics.json and no search trials found under the results directory")
    return Results(results_dir, runs, trials, skipped)


def load_runs(results_dir: Path, skipped: list) -> list[Run]:
    """All aggregatable runs under results_dir, keyed and de-duplicated (see the module doc)."""
    runs = [r for path in sorted(results_dir.rglob("metrics.json"))
            if (r := _read_run(path, skipped)) is not None]
    return sorted(_keep_one_per_seed(runs, skipped),
                  key=lambda r: (bench_rank(r.m["benchmark"]), key_rank(r.key), str(r.m["seed"])))


def _read_run(path: Path, skipped: list) -> Run | None:
    """The run of one metrics.json (with its history.csv), or None when it is no result."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        skipped.append((str(path), f"unreadable: {e}"))
        return None
    if isinstance(m, dict) and m.get("stage", "final") not in ("final", "bench"):
        return None                                     # search trials are not results
    missing = [k for k in REQUIRED if not isinstance(m, dict) or m.get(k) is None]
    if missing:
        skipped.append((str(path), f"missing {', '.join(missing)}"))
        return None
    m = {**m, "benchmark": str(m["benchmark"]), "loss": str(m["loss"]),
         "config": m["config"] if isinstance(m.get("config"), dict) else {}}
    run = Run(path.parent, m, mtime=path.stat().st_mtime)
    hist = path.parent / "history.csv"
    if hist.is_file():
        try:
            run.history = pd.read_csv(hist)
        except (OSError, ValueError) as e:
            skipped.append((str(hist), f"unreadable: {e}"))
    return run


def _keep_one_per_seed(runs: list[Run], skipped: list) -> list[Run]:
    """Set each run's key; of several runs of one benchmark x key x seed keep a ``final`` one,
    then the newest, and list the others as skipped."""
    variants = defaultdict(set)
    for r in runs:
        variants[r.m["loss"]].add(r.m["config"].get("variant"))
    best: dict[tuple, Run] = {}
    rank = lambda x: (x.m.get("stage", "final") == "final", x.mtime)  # noqa: E731
    for r in runs:
        r.key = run_key(r.m, len(variants[r.m["loss"]]) > 1)
        ident = (r.m["benchmark"], r.key, r.m["seed"])
        old = best.get(ident)
        if old is not None:
            keep, drop = (r, old) if rank(r) > rank(old) else (old, r)
            skipped.append((str(drop.dir / "metrics.json"), f"duplicate of {keep.dir}"))
            r = keep
        best[ident] = r
    return list(best.values())


def load_trials(results_dir: Path, skipped: list) -> list[dict]:
    """Trial records of every ``trials.json`` (a list of dicts), each
    with ``benchmark``, ``loss`` (falling back to the folder name ``<benchmark>__<loss>``),
    ``source`` (the file) and ``config`` (a dict); plus those of searches still running or
    interrupted (:func:`unfinished_search_trials`)."""
    out = []
    for exp_dir in sorted({s.parent for s in results_dir.rglob("experiment_state-*.json")}):
        if not (exp_dir / "trials.json").exists():       # one state file per (re)start of the search
            out += unfinished_search_trials(exp_dir)
    for path in sorted(results_dir.rglob("trials.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            skipped.append((str(path), f"unreadable: {e}"))
            continue
        bench, _, loss = path.parent.name.partition("__")
        for t in data if isinstance(data, list) else []:
            if isinstance(t, dict):
                out.append({**t, "benchmark": str(t.get("benchmark") or bench),
                            "loss": str(t.get("loss") or loss), "source": str(path),
                            "config": t["config"] if isinstance(t.get("config"), dict) else {}})
    return out


def tune_result_rows(trial_dir: Path) -> list[dict]:
    """The rows Ray Tune wrote for a trial (``<trial_dir>/result.json``, one JSON object per reported
    epoch); [] when there is no such file; unreadable lines are left out."""
    path = Path(trial_dir) / "result.json"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def unfinished_search_trials(exp_dir: Path) -> list[dict]:
    """Records of a Ray Tune search that has not written its ``trials.json`` yet (still running, or
    interrupted and waiting for the same command to resume it), read from Tune's own files: each
    trial folder's ``params.json`` and ``result.json`` (one row per reported epoch). A trial that Tune
    ended (``trial_ended.json``) is ``ERROR``, or ``TERMINATED`` when it ran as many epochs as the
    longest trial so far and ``STOPPED_EARLY`` when fewer (ASHA stopped it); the others are
    ``UNFINISHED``. The search's objective is not in these files: read as ``val_macro_f1``, max."""
    from ..sweep.spaces import decode_params

    bench, _, loss = exp_dir.name.partition("__")
    source = str(exp_dir / "trials.json")      # where the finished search will write them
    method = _search_meta(exp_dir)
    out = []
    for params in sorted(exp_dir.glob("*/params.json")):
        folder = params.parent
        rows = tune_result_rows(folder)
        f1 = [num(r.get("val_macro_f1")) for r in rows if num(r.get("val_macro_f1")) is not None]
        ended = folder / "trial_ended.json"
        errored = ended.exists() and json.loads(ended.read_text(encoding="utf-8")).get("status") == "ERROR"
        out.append({"trial_id": folder.name, "benchmark": bench, "loss": loss, "source": source,
                    "status": "ERROR" if errored else ("ENDED" if ended.exists() else "UNFINISHED"),
                    "config": decode_params(json.loads(params.read_text(encoding="utf-8"))),
                    "best_val_macro_f1": max(f1) if f1 else None,
                    "iterations": max((int(r.get("epoch", 0)) for r in rows), default=0),
                    "time_s": num(rows[-1].get("time_total_s")) if rows else None,
                    "metric": "val_macro_f1", "mode": "max", "best_metric": max(f1) if f1 else None,
                    "search_alg": method.get("search_alg"), "scheduler": method.get("scheduler")})
    longest = max((t["iterations"] for t in out), default=0)
    for t in out:
        if t["status"] == "ENDED":
            t["status"] = "TERMINATED" if t["iterations"] >= longest else "STOPPED_EARLY"
    return out


def _search_meta(exp_dir: Path) -> dict:
    """A search folder's ``search.json`` (its search algorithm and scheduler), {} when absent or unreadable."""
    try:
        meta = json.loads((exp_dir / "search.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


NOT_RECORDED = "not recorded"


def search_methods(trials: list[dict]) -> list[dict]:
    """The search algorithm and scheduler of each benchmark x loss search, from its trial records
    (``search_alg`` / ``scheduler``; "not recorded" for records written before they were, and
    the names joined by ", " when the records of one search disagree)."""
    groups: dict[tuple, dict] = defaultdict(lambda: {"search_alg": set(), "scheduler": set()})
    for t in trials:
        g = groups[(t["benchmark"], t["loss"])]
        for k in ("search_alg", "scheduler"):
            g[k].add(str(t.get(k) or NOT_RECORDED))
    return [{"benchmark": b, "loss": loss, **{k: ", ".join(sorted(v)) for k, v in g.items()}}
            for (b, loss), g in sorted(groups.items(), key=lambda kv: (bench_rank(kv[0][0]), key_rank(kv[0][1])))]
