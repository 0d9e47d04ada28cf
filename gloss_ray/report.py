"""Experiment report from a results directory: ``build_report(results_dir, out_dir)``.

Inputs (found by recursive glob, so any nesting works):

* ``**/metrics.json`` -- one finished run (benchmark, loss, seed, test metrics, config, stage ...),
  with ``history.csv`` (one row per epoch) and optionally ``plots/embedding_map.png`` beside it.
  Runs of stage ``final`` or ``bench`` (or no stage) are aggregated; ``trial`` runs are not.
  Unreadable or incomplete files are skipped and listed in the report. When one seed of one
  row has several runs, a ``final`` run wins over ``bench``, then the newest file.
* ``**/trials.json`` -- a sweep's trial records (list of dicts, see :func:`load_trials`).

A row of the results is a *key*: the loss, plus ``/variant`` when runs of that loss used
several G-Loss variants, ``+global`` with the global graph and ``@fraction`` when trained on a
label fraction below 1 (e.g. ``gloss+global@0.1``).

Outputs in ``out_dir`` (default ``results_dir/report``): ``report.md`` (figures linked from
``figures/``), a self-contained ``report.html`` (inline CSS, figures as base64 data URIs, no
script and no external reference), ``results.csv`` (one row per benchmark x key) and
``results.json`` (everything, numbers unrounded; std is the sample std, ddof=1, ``null`` for a
single seed; differences are ``ours - CE`` as fractions). Percentages are for display only.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from gloss_ray.errors import ConfigError

BENCHMARKS = ("mr", "r8", "r52", "ohsumed", "20ng")
BENCH_LABEL = {"mr": "MR", "r8": "R8", "r52": "R52", "ohsumed": "Ohsumed", "20ng": "20NG"}
LOSS_ORDER = ("ce", "gloss", "scl", "triplet", "contrastive")
METRICS = ("test_accuracy", "test_macro_f1", "best_val_macro_f1", "silhouette", "best_epoch",
           "wall_time_s")
DIFF_METRICS = ("test_accuracy", "test_macro_f1")
REQUIRED = ("benchmark", "loss", "seed", "test_accuracy", "test_macro_f1")
PAPER_CITATION = "G-Loss paper (arXiv 2604.25853), Table: G-Loss test accuracy"
PAPER_ACCURACY = {  # test accuracy (%) of G-Loss as published, per encoder
    "BERT-base": {"mr": 87.14, "r8": 98.04, "r52": 96.48, "ohsumed": 71.48, "20ng": 85.13},
    "RoBERTa-large": {"mr": 90.82, "r8": 98.18, "r52": 96.65, "ohsumed": 75.76, "20ng": 85.33},
}
N_BOOTSTRAP = 10_000
SEARCH_PARAMS = ("lam", "sigma", "k", "lr")


# --------------------------------------------------------------------------- loading
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


def _num(v: Any) -> float | None:
    """A finite number as float, else None (bools are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        return None
    return float(v) if math.isfinite(v) else None


def run_key(m: dict, multi_variant: bool = False) -> str:
    """Row key of a run: loss [/variant] [+global] [@label_fraction]."""
    key = str(m["loss"])
    if multi_variant:
        key += f"/{(m.get('config') or {}).get('variant') or 'default'}"
    if m.get("global_graph"):
        key += "+global"
    lf = _num(m.get("label_fraction"))
    if lf is not None and lf < 1:
        key += f"@{lf:g}"
    return key


def load_runs(results_dir: Path, skipped: list) -> list[Run]:
    """All aggregatable runs under results_dir, keyed and de-duplicated (see module doc)."""
    runs = []
    for path in sorted(results_dir.rglob("metrics.json")):
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            skipped.append((str(path), f"unreadable: {e}"))
            continue
        if isinstance(m, dict) and m.get("stage", "final") not in ("final", "bench"):
            continue                                    # search trials are not results
        missing = [k for k in REQUIRED if not isinstance(m, dict) or m.get(k) is None]
        if missing:
            skipped.append((str(path), f"missing {', '.join(missing)}"))
            continue
        m = {**m, "benchmark": str(m["benchmark"]), "loss": str(m["loss"]),
             "config": m["config"] if isinstance(m.get("config"), dict) else {}}
        run = Run(path.parent, m, mtime=path.stat().st_mtime)
        hist = path.parent / "history.csv"
        if hist.is_file():
            try:
                run.history = pd.read_csv(hist)
            except (OSError, ValueError) as e:
                skipped.append((str(hist), f"unreadable: {e}"))
        runs.append(run)
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
    return sorted(best.values(), key=lambda r: (_bench_rank(r.m["benchmark"]),
                                                _key_rank(r.key), str(r.m["seed"])))


def load_trials(results_dir: Path, skipped: list) -> list[dict]:
    """Trial records of every ``trials.json``; benchmark/loss fall back to the folder name
    ``<benchmark>__<loss>``."""
    out = []
    for path in sorted(results_dir.rglob("trials.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            skipped.append((str(path), f"unreadable: {e}"))
            continue
        if isinstance(data, dict):
            data = data.get("trials", [])
        bench, _, loss = path.parent.name.partition("__")
        for t in data if isinstance(data, list) else []:
            if isinstance(t, dict):
                out.append({**t, "benchmark": str(t.get("benchmark") or bench),
                            "loss": str(t.get("loss") or loss), "source": str(path),
                            "config": t["config"] if isinstance(t.get("config"), dict) else {}})
    return out


def _bench_rank(b: str):
    return (BENCHMARKS.index(b), "") if b in BENCHMARKS else (len(BENCHMARKS), b)


def _key_rank(key: str):
    loss = re.split(r"[/+@]", key)[0]
    return (LOSS_ORDER.index(loss) if loss in LOSS_ORDER else len(LOSS_ORDER), key)


# --------------------------------------------------------------------------- statistics
def _stats(values: list) -> dict:
    """mean, sample std (ddof=1; None below 2 values) and count of the numeric values."""
    v = [x for x in map(_num, values) if x is not None]
    return {"mean": float(np.mean(v)) if v else None,
            "std": float(np.std(v, ddof=1)) if len(v) >= 2 else None, "n": len(v)}


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
        idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
        lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
        out.update(ci_low=float(lo), ci_high=float(hi))
        if np.ptp(d) > 0:
            t = stats.ttest_rel(a, b)
            out.update(t_stat=float(t.statistic), p_value=float(t.pvalue))
    return out


def aggregate(runs: list[Run]) -> tuple[list[dict], list[dict]]:
    """Rows (one per benchmark x key) and paired differences to CE (ours - CE, fractions)."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.m["benchmark"], r.key)].append(r)
    rows, diffs = [], []
    for (bench, key), rs in groups.items():
        cfg = rs[0].m.get("config") or {}
        row = {"benchmark": bench, "key": key, "loss": rs[0].m["loss"],
               "variant": cfg.get("variant"), "global_graph": bool(rs[0].m.get("global_graph")),
               "label_fraction": rs[0].m.get("label_fraction", 1.0),
               # a run without --model used the packaged default encoder
               "encoder": next((cfg[k] for k in ("model", "encoder", "model_name") if cfg.get(k)),
                               "all-MiniLM-L6-v2" if "model" in cfg else None),
               "n_seeds": len(rs), "seeds": [r.m["seed"] for r in rs]}
        for name in METRICS:
            s = _stats([r.m.get(name) for r in rs])
            row.update({f"{name}_mean": s["mean"], f"{name}_std": s["std"], f"{name}_n": s["n"]})
        rows.append(row)
    for row in rows:
        bench, key = row["benchmark"], row["key"]
        lf = _num(row["label_fraction"])
        base = "ce" + (f"@{lf:g}" if lf is not None and lf < 1 else "")
        if key == base:
            continue
        # against CE; a global-graph row also against the same loss without the global graph
        bases = [base] + ([key.replace("+global", "")] if "+global" in key
                          and (bench, key.replace("+global", "")) in groups else [])
        for b in bases:
            for name in DIFF_METRICS:
                d = {"benchmark": bench, "key": key, "baseline": b, "metric": name}
                if (bench, b) not in groups:
                    d.update(n_pairs=0, seeds=[], mean_diff=None, ci_low=None, ci_high=None,
                             t_stat=None, p_value=None, note="CE missing")
                else:
                    val = lambda rs: {r.m["seed"]: _num(r.m[name]) for r in rs  # noqa: E731
                                      if _num(r.m[name]) is not None}
                    d.update(paired_difference(val(groups[(bench, key)]), val(groups[(bench, b)])))
                    d["note"] = "" if d["n_pairs"] else "no common seeds"
                diffs.append(d)
                prefix = "delta" if b == base else "delta_batch"     # delta_*: vs CE (results.csv)
                row.update({f"{prefix}_{name}_{k}": d[k]
                            for k in ("mean_diff", "ci_low", "ci_high", "p_value", "n_pairs")})
    return rows, diffs


def convergence(runs: list[Run]) -> tuple[list[dict], dict]:
    """Per benchmark x key: mean epochs (and seconds) to reach 99% of each run's best validation
    macro-F1, and mean-over-seeds curves by epoch (val_macro_f1, elapsed_s, homophily ...)."""
    per: dict[tuple, list] = defaultdict(list)
    curves: dict[tuple, pd.DataFrame] = {}
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
    rows = []
    for (bench, key), vals in per.items():
        rows.append({"benchmark": bench, "key": key, "n_runs": len(vals),
                     "epochs_to_99": float(np.mean([v[0] for v in vals])),
                     "time_to_99_s": _stats([v[1] for v in vals])["mean"]})
        cols = [c for c in ("val_macro_f1", "elapsed_s", "homophily", "recall_at_k")
                if any(c in f for f in frames[(bench, key)])]
        curves[(bench, key)] = (pd.concat(frames[(bench, key)])[["epoch", *cols]]
                                .apply(pd.to_numeric, errors="coerce").groupby("epoch").mean())
    return rows, curves


def search_summary(trials: list[dict]) -> dict:
    """Best trial per benchmark x loss, status counts, errors and device-hours spent."""
    groups: dict[tuple, list] = defaultdict(list)
    for t in trials:
        groups[(t["benchmark"], t["loss"])].append(t)
    best, counts, errors = [], [], []
    hours: dict[str, float] = defaultdict(float)
    for (bench, loss), ts in sorted(groups.items(), key=lambda kv: (_bench_rank(kv[0][0]),
                                                                     _key_rank(kv[0][1]))):
        status = defaultdict(int)
        spent = defaultdict(float)
        for t in ts:
            status[t.get("status") or "UNKNOWN"] += 1
            h = (_num(t.get("time_s")) or 0.0) * (_num(t.get("num_workers")) or 1.0) / 3600
            spent[t.get("device") or "cpu"] += h
            hours[t.get("device") or "cpu"] += h
            if t.get("status") == "ERROR":
                errors.append({k: t.get(k) for k in ("benchmark", "loss", "trial_id", "error")})
        counts.append({"benchmark": bench, "loss": loss, "trials": len(ts),
                       "terminated": status["TERMINATED"], "stopped_early": status["STOPPED_EARLY"],
                       "errored": status["ERROR"],
                       "other": len(ts) - status["TERMINATED"] - status["STOPPED_EARLY"]
                       - status["ERROR"], "hours_by_device": dict(spent)})
        ok = [t for t in ts if t.get("status") != "ERROR" and _num(t.get("best_val_macro_f1"))
              is not None]
        if ok:
            top = max(ok, key=lambda t: t["best_val_macro_f1"])
            cfgs = [t.get("config") or {} for t in ts]
            varied = sorted(k for k in set().union(*cfgs)
                            if len({json.dumps(c.get(k), sort_keys=True, default=str)
                                    for c in cfgs}) > 1)
            best.append({"benchmark": bench, "loss": loss, "trial_id": top.get("trial_id"),
                         "best_val_macro_f1": top["best_val_macro_f1"],
                         "config": top.get("config") or {}, "searched": varied})
    return {"best": best, "counts": counts, "errors": errors, "hours_by_device": dict(hours)}


# --------------------------------------------------------------------------- figures
def _fmt(v: Any, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _pct(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)


class _Figures:
    """Writes PNGs to ``figures/`` with one colour per key across all figures."""

    def __init__(self, out: Path):
        self.dir = out / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.colours: dict[str, Any] = {}
        self.written: list[Path] = []

    def colour(self, key: str):
        import matplotlib
        cmap = matplotlib.colormaps["tab10"]
        return self.colours.setdefault(key, cmap(len(self.colours) % 10))

    def new(self, ncols: int, width: float = 5.0, height: float = 3.6):
        fig = Figure(figsize=(width * ncols, height), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, ncols, squeeze=False)[0]
        return fig, axes

    def save(self, fig: Figure, name: str) -> Path:
        path = self.dir / name
        fig.savefig(path, dpi=90)
        self.written.append(path)
        return path

    def copy(self, src: Path, name: str) -> Path:
        path = self.dir / name
        shutil.copyfile(src, path)
        self.written.append(path)
        return path


def _curve_figure(figs: _Figures, bench: str, curves: dict, col: str, label: str) -> Path | None:
    """Mean-over-seeds `col` vs epoch (and vs elapsed_s for val_macro_f1) for one benchmark."""
    mine = {k: c for (b, k), c in curves.items()
            if b == bench and col in c and c[col].notna().any()}
    if not mine:
        return None
    by_time = col == "val_macro_f1" and any("elapsed_s" in c for c in mine.values())
    fig, axes = figs.new(2 if by_time else 1)
    for key in sorted(mine, key=_key_rank):
        c = mine[key].dropna(subset=[col])
        axes[0].plot(c.index, c[col], marker="o", ms=3, label=key, color=figs.colour(key))
        if by_time and "elapsed_s" in c:
            axes[1].plot(c["elapsed_s"], c[col], marker="o", ms=3, label=key,
                         color=figs.colour(key))
    axes[0].set_xlabel("epoch")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    if by_time:
        axes[1].set_xlabel("wall time (s)")
    for ax in axes:
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{BENCH_LABEL.get(bench, bench)}: {label} (mean over seeds)")
    return figs.save(fig, f"{col}_{_slug(bench)}.png")


def _search_figure(figs: _Figures, bench: str, trials: list[dict]) -> Path | None:
    """Hyper-parameter vs best validation macro-F1 scatter plots for one benchmark's trials."""
    pts = [t for t in trials if t["benchmark"] == bench and t.get("status") != "ERROR"
           and _num(t.get("best_val_macro_f1")) is not None]
    panels = []  # (title, kind, [(loss, x, y)])
    for p in SEARCH_PARAMS:
        vals = [(t["loss"], t["config"][p], t["best_val_macro_f1"])
                for t in pts if p in (t.get("config") or {})]
        if len({repr(v[1]) for v in vals}) < 2:     # not searched here
            continue
        num = [v for v in vals if _num(v[1]) is not None]
        cat = [(lo, _short(p, x), y) for lo, x, y in vals if _num(x) is None]
        if p == "k":   # discrete: all categories, dense first, then by size
            cat += [(lo, str(int(x)), y) for lo, x, y in num]
            num = []
        if num:
            panels.append((p if not cat else f"{p} (value)", "log" if p == "lr" else "num", num))
        if cat:
            panels.append((p if not num else f"{p} (strategy)", "cat", cat))
    if not panels:
        return None
    fig, axes = figs.new(len(panels), width=3.6, height=3.2)
    jitter = np.random.default_rng(0)
    for ax, (title, kind, vals) in zip(axes, panels):
        if kind == "cat":
            names = sorted({v[1] for v in vals}, key=lambda s: (s != "dense", _num_or_inf(s), s))
            pos = {n: i for i, n in enumerate(names)}
            xs = [pos[v[1]] + jitter.uniform(-0.15, 0.15) for v in vals]
            ax.set_xticks(range(len(names)), names)
            ax.set_xlim(-0.5, len(names) - 0.5)
        else:
            xs = [float(v[1]) for v in vals]
            if kind == "log":
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
                ax.xaxis.set_minor_formatter(NullFormatter())     # matplotlib's minor labels overlap
        for loss in sorted({v[0] for v in vals}, key=_key_rank):
            sel = [i for i, v in enumerate(vals) if v[0] == loss]
            ax.scatter([xs[i] for i in sel], [vals[i][2] for i in sel], s=18, alpha=0.8,
                       label=loss, color=figs.colour(loss))
        ax.set_xlabel(title)
        ax.set_ylabel("best val macro-F1")
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes:                             # one legend with every loss, wherever it appears
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    axes[-1].legend(list(handles.values()), list(handles), fontsize=8)
    fig.suptitle(f"{BENCH_LABEL.get(bench, bench)}: search trials")
    return figs.save(fig, f"search_{_slug(bench)}.png")


def _num_or_inf(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return math.inf


# --------------------------------------------------------------------------- document
class _Doc:
    """A tiny document model rendered both as Markdown and as self-contained HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list], quoted: int = 0):
        """A table; its last ``quoted`` rows are figures quoted from elsewhere (set apart)."""
        self.blocks.append(("table", headers, [[str(c) for c in r] for r in rows], quoted))

    def img(self, path: Path, alt: str):
        self.blocks.append(("img", path, alt))

    def markdown(self, out: Path) -> str:
        lines = []
        cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        for b in self.blocks:
            if b[0] == "h":
                lines += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                lines += [b[1], ""]
            elif b[0] == "table":
                lines += ["| " + " | ".join(map(cell, b[1])) + " |",
                          "|" + "---|" * len(b[1])]
                lines += ["| " + " | ".join(map(cell, r)) + " |" for r in b[2]] + [""]
            else:
                lines += [f"![{b[2]}]({b[1].relative_to(out).as_posix()})", ""]
        return "\n".join(lines)

    def html(self, title: str) -> str:
        e = html.escape
        parts = []
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{e(c)}</th>" for c in b[1])
                first_quoted = len(b[2]) - b[3]
                body = "".join(("<tr class=\"quoted\">" if i >= first_quoted else "<tr>")
                               + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                               for i, r in enumerate(b[2]))
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(b[2])}">'
                             f"<figcaption>{e(b[2])}</figcaption></figure>")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
                + "\n".join(parts) + "\n</body></html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1150px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}tbody tr:nth-child(even){background:#fafafa}
figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}p{margin:.5em 0}
tr.quoted td{font-style:italic;color:#555;background:#f4f7fb}
"""


# --------------------------------------------------------------------------- report
def _write_results(rows: list[dict], out: Path, payload: dict) -> tuple[Path, Path]:
    csv_path, json_path = out / "results.csv", out / "results.json"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (";".join(map(str, v)) if isinstance(v, list) else
                            "" if v is None else v) for k, v in r.items()})
    json_path.write_text(json.dumps(_clean(payload), indent=2, allow_nan=False, default=str) + "\n",
                         encoding="utf-8")
    return csv_path, json_path


def _clean(v: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None, Paths to str."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v) if isinstance(v, Path) else v


def build_report(results_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.html, results.csv, results.json and figures/*.png.

    Returns ``{name relative to out_dir: path}`` for every file written. Raises
    :class:`ConfigError` naming ``results_dir`` if it is missing or holds no metrics.json.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ConfigError(f"{results_dir}: results directory does not exist")
    if next(results_dir.rglob("metrics.json"), None) is None:
        raise ConfigError(f"{results_dir}: no metrics.json found under the results directory")
    out = Path(out_dir) if out_dir is not None else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[tuple[str, str]] = []
    runs = load_runs(results_dir, skipped)
    trials = load_trials(results_dir, skipped)
    rows, diffs = aggregate(runs)
    conv_rows, curves = convergence(runs)
    search = search_summary(trials)
    run_hours: dict[str, float] = defaultdict(float)
    for r in runs:
        run_hours[r.m.get("device") or "cpu"] += ((_num(r.m.get("wall_time_s")) or 0.0)
                                                  * (_num(r.m.get("num_workers")) or 1.0) / 3600)
    benches = sorted({r["benchmark"] for r in rows} | {t["benchmark"] for t in trials},
                     key=_bench_rank)
    figs = _Figures(out)
    doc = _Doc()

    doc.h(1, "gloss-ray experiment report")
    doc.p(f"Results from {results_dir}: {len(runs)} runs (stage final/bench), "
          f"{len(rows)} benchmark x loss rows, {len(trials)} search trials. "
          "Test metrics in %, mean ± sample std over seeds.")

    # ---- test results
    doc.h(2, "Test results")
    doc.p("Paper rows are the published G-Loss test accuracy, quoted from the "
          f"{PAPER_CITATION}; they are the paper's numbers with the paper's encoder, not ours.")
    overview = [[k] + [next((_pct(r["test_accuracy_mean"], r["test_accuracy_std"]) for r in rows
                             if r["benchmark"] == b and r["key"] == k), "") for b in benches]
                for k in sorted({r["key"] for r in rows}, key=_key_rank)]
    overview += [[f"G-Loss, paper ({enc})"] + [_fmt(acc.get(b)) for b in benches]
                 for enc, acc in PAPER_ACCURACY.items()]
    doc.table(["Test accuracy (%)"] + [BENCH_LABEL.get(b, b) for b in benches], overview,
              quoted=len(PAPER_ACCURACY))
    for bench in benches:
        brows = [r for r in rows if r["benchmark"] == bench]
        if not brows:
            continue
        doc.h(3, BENCH_LABEL.get(bench, bench))
        table = [[r["key"], r["encoder"] or "", r["n_seeds"], ", ".join(map(str, r["seeds"])),
                  _pct(r["test_accuracy_mean"], r["test_accuracy_std"]),
                  _pct(r["test_macro_f1_mean"], r["test_macro_f1_std"]),
                  _pct(r["best_val_macro_f1_mean"], r["best_val_macro_f1_std"])] for r in brows]
        table += [[f"G-Loss, paper ({enc})", enc, "", "", _fmt(acc.get(bench)), "", ""]
                  for enc, acc in PAPER_ACCURACY.items() if bench in acc]
        doc.table(["Loss", "Encoder", "n", "Seeds", "Test acc. (%)", "Test macro-F1 (%)",
                   "Best val macro-F1 (%)"], table, quoted=len(table) - len(brows))
        dt = [[d["key"], d["baseline"], d["metric"], d["n_pairs"],
               "n/a" if d["mean_diff"] is None else f"{100 * d['mean_diff']:+.2f}",
               "n/a" if d["ci_low"] is None else
               f"[{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]",
               _fmt(d["t_stat"], ".3f"), _fmt(d["p_value"], ".4f"), d["note"]]
              for d in diffs if d["benchmark"] == bench]
        if dt:
            doc.p("Differences (loss - baseline, percentage points; the baseline is CE, and for a "
                  "global-graph row also the same loss without the global graph), paired by seed: "
                  "bootstrap 95% CI of the mean difference and paired t-test (scipy.stats.ttest_rel).")
            doc.table(["Loss", "vs", "Metric", "Pairs", "Mean diff (pp)", "95% CI (pp)", "t", "p",
                       "Note"], dt)

    # ---- convergence
    doc.h(2, "Convergence")
    if not conv_rows:
        doc.p("No history.csv with epoch and val_macro_f1 columns found.")
    for bench in benches:
        crow = [c for c in conv_rows if c["benchmark"] == bench]
        if not crow:
            continue
        doc.h(3, BENCH_LABEL.get(bench, bench))
        path = _curve_figure(figs, bench, curves, "val_macro_f1", "val macro-F1")
        if path:
            doc.img(path, f"{BENCH_LABEL.get(bench, bench)}: validation macro-F1 vs epoch "
                          "and wall time")
        doc.table(["Loss", "Runs", "Epochs to 99% of best val macro-F1", "Time to 99% (s)"],
                  [[c["key"], c["n_runs"], f"{c['epochs_to_99']:.2f}",
                    _fmt(c["time_to_99_s"], ".1f")] for c in crow])

    # ---- search
    doc.h(2, "Hyper-parameter search")
    if not trials:
        doc.p("No trials.json found.")
    else:
        doc.p("Device-hours = sum(time_s x num_workers) / 3600.")
        devices = sorted(set(search["hours_by_device"]) | set(run_hours))
        doc.table(["Device", "Search hours", "Final/bench run hours"],
                  [[d, f"{search['hours_by_device'].get(d, 0.0):.3f}",
                    f"{run_hours.get(d, 0.0):.3f}"] for d in devices])
        doc.table(["Benchmark", "Loss", "Trials", "Terminated", "Stopped early", "Errored",
                   "Hours"],
                  [[c["benchmark"], c["loss"], c["trials"], c["terminated"], c["stopped_early"],
                    c["errored"], f"{sum(c['hours_by_device'].values()):.3f}"]
                   for c in search["counts"]])
        doc.h(3, "Best configuration per benchmark and loss")
        doc.table(["Benchmark", "Loss", "Trial", "Best val macro-F1 (%)", "Searched parameters"],
                  [[b["benchmark"], b["loss"], b["trial_id"], _pct(b["best_val_macro_f1"]),
                    ", ".join(f"{k}={_short(k, b['config'].get(k))}" for k in b["searched"])
                    or "(none varied)"] for b in search["best"]])
        if search["errors"]:
            doc.h(3, "Errored trials")
            doc.table(["Benchmark", "Loss", "Trial", "Error"],
                      [[x["benchmark"], x["loss"], x["trial_id"],
                        " ".join(str(x["error"]).split())[:300]] for x in search["errors"]])
        doc.h(3, "Hyper-parameter effects")
        for bench in benches:
            path = _search_figure(figs, bench, trials)
            if path:
                doc.img(path, f"{BENCH_LABEL.get(bench, bench)}: hyper-parameters vs best "
                              "validation macro-F1 (errored trials excluded)")

    # ---- embeddings
    doc.h(2, "Embedding quality")
    sil = [r for r in rows if r["silhouette_n"]]
    if sil:
        doc.table(["Benchmark", "Loss", "Silhouette", "n"],
                  [[BENCH_LABEL.get(r["benchmark"], r["benchmark"]), r["key"],
                    _fmt(r["silhouette_mean"], ".4f") + ("" if r["silhouette_std"] is None
                                                         else f" ± {r['silhouette_std']:.4f}"),
                    r["silhouette_n"]] for r in sil])
    else:
        doc.p("No silhouette scores in metrics.json.")
    shown = set()
    for r in runs:
        ident = (r.m["benchmark"], r.key)
        if r.embedding_map and ident not in shown:
            shown.add(ident)
            path = figs.copy(r.embedding_map, f"embedding_{_slug(r.m['benchmark'])}_"
                                              f"{_slug(r.key)}_seed{_slug(str(r.m['seed']))}.png")
            doc.img(path, f"{BENCH_LABEL.get(ident[0], ident[0])}, {r.key}, seed {r.m['seed']}: "
                          "2-D embedding map")
    for bench in benches:
        path = _curve_figure(figs, bench, curves, "homophily", "global-graph homophily")
        if path:
            doc.img(path, f"{BENCH_LABEL.get(bench, bench)}: global-graph homophily vs epoch")

    if skipped:
        doc.h(2, "Skipped files")
        doc.table(["File", "Reason"], [[p, " ".join(why.split())[:300]] for p, why in skipped])

    payload = {"results_dir": str(results_dir), "std_ddof": 1, "results": rows,
               "differences": diffs, "convergence": conv_rows, "search": search,
               "run_hours_by_device": dict(run_hours),
               "paper": {"citation": PAPER_CITATION, "test_accuracy_percent": PAPER_ACCURACY},
               "runs": [{"dir": str(r.dir), "key": r.key, **{k: r.m.get(k) for k in (
                   "benchmark", "loss", "seed", "stage", "device", "num_workers", *METRICS)}}
                   for r in runs],
               "skipped": [{"path": p, "reason": why} for p, why in skipped]}
    csv_path, json_path = _write_results(rows, out, payload)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(doc.markdown(out), encoding="utf-8")
    html_path.write_text(doc.html("gloss-ray experiment report"), encoding="utf-8")
    written = [md_path, html_path, csv_path, json_path, *figs.written]
    return {p.relative_to(out).as_posix(): p for p in written}


def _short(name: str, v: Any) -> str:
    """Display form of a config value (``k = None`` is the dense graph)."""
    if v is None:
        return "dense" if name == "k" else "None"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    """``python -m gloss_ray.report RESULTS_DIR [OUT_DIR]``."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m gloss_ray.report RESULTS_DIR [OUT_DIR]", file=sys.stderr)
        return 2
    try:
        paths = build_report(*args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paths["report.html"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
