"""The report's figures (PNGs in ``figures/``), drawn with matplotlib's object API (no pyplot
state): validation macro-F1 and global-graph homophily curves, hyper-parameter vs best
validation macro-F1 scatter plots, and copies of the runs' embedding maps. One colour per key
(or loss) across all figures, in the order the figures are drawn."""
from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ..options import BENCHMARK_LABELS, DENSE, dense_to_none
from .collect import Results, Run, key_rank, num
from .stats import Summary

SEARCH_PARAMS = ("lam", "sigma", "k", "lr")


@dataclass
class Drawn:
    """The figures of a report, by what they show (benchmark -> path), and every file written."""
    val_f1: dict[str, Path]
    search: dict[str, Path]
    embeddings: list[tuple[Run, Path]]    # the first run of each benchmark x key with a map
    homophily: dict[str, Path]
    written: list[Path]


def draw(results: Results, summary: Summary, out: Path) -> Drawn:
    """Every figure of the report, written to ``out/figures``."""
    figs = Figures(out)
    benches = results.benchmarks
    val_f1 = _each(benches, lambda b: curve_figure(figs, b, summary.curves, "val_macro_f1", "val macro-F1"))
    search = _each(benches, lambda b: search_figure(figs, b, results.trials))
    embeddings = copy_embedding_maps(figs, results.runs)
    homophily = _each(benches, lambda b: curve_figure(figs, b, summary.curves, "homophily",
                                                      "global-graph homophily"))
    return Drawn(val_f1, search, embeddings, homophily, figs.written)


def _each(benches: list[str], make) -> dict[str, Path]:
    return {b: p for b in benches if (p := make(b)) is not None}


def bench_label(b: str) -> str:
    return BENCHMARK_LABELS.get(b, b)


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)


def value_label(name: str, v: Any) -> str:
    """Display form of a config value (``k`` None or ``"dense"`` is the dense graph)."""
    v = dense_to_none(name, v)
    if v is None:
        return DENSE if name == "k" else "None"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Figures:
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


def curve_figure(figs: Figures, bench: str, curves: dict, col: str, label: str) -> Path | None:
    """Mean-over-seeds `col` vs epoch (and vs elapsed_s for val_macro_f1) for one benchmark."""
    mine = {k: c for (b, k), c in curves.items()
            if b == bench and col in c and c[col].notna().any()}
    if not mine:
        return None
    by_time = col == "val_macro_f1" and any("elapsed_s" in c for c in mine.values())
    fig, axes = figs.new(2 if by_time else 1)
    for key in sorted(mine, key=key_rank):
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
    fig.suptitle(f"{bench_label(bench)}: {label} (mean over seeds)")
    return figs.save(fig, f"{col}_{slug(bench)}.png")


def copy_embedding_maps(figs: Figures, runs: list[Run]) -> list[tuple[Run, Path]]:
    """The embedding map of the first run of each benchmark x key that has one, copied."""
    shown, out = set(), []
    for r in runs:
        ident = (r.m["benchmark"], r.key)
        if r.embedding_map and ident not in shown:
            shown.add(ident)
            out.append((r, figs.copy(r.embedding_map, f"embedding_{slug(r.m['benchmark'])}_"
                                                       f"{slug(r.key)}_seed{slug(str(r.m['seed']))}.png")))
    return out


# --------------------------------------------------------------------------- search figure
def search_figure(figs: Figures, bench: str, trials: list[dict]) -> Path | None:
    """Hyper-parameter vs best validation macro-F1 scatter plots for one benchmark's trials."""
    panels = _search_panels(bench, trials)
    if not panels:
        return None
    fig, axes = figs.new(len(panels), width=3.6, height=3.2)
    jitter = np.random.default_rng(0)
    for ax, panel in zip(axes, panels):
        _scatter_panel(figs, ax, *panel, jitter)
    handles = {}
    for ax in axes:                             # one legend with every loss, wherever it appears
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    axes[-1].legend(list(handles.values()), list(handles), fontsize=8)
    fig.suptitle(f"{bench_label(bench)}: search trials")
    return figs.save(fig, f"search_{slug(bench)}.png")


def _search_panels(bench: str, trials: list[dict]) -> list[tuple[str, str, list]]:
    """``(title, kind, [(loss, x, best val macro-F1)])`` per searched parameter of one benchmark's
    non-errored trials; kind is ``num``, ``log`` or ``cat`` (a parameter with both numbers and
    names, such as sigma, gets a panel of each)."""
    pts = [t for t in trials if t["benchmark"] == bench and t.get("status") != "ERROR"
           and num(t.get("best_val_macro_f1")) is not None]
    panels = []
    for p in SEARCH_PARAMS:
        vals = [(t["loss"], t["config"][p], t["best_val_macro_f1"])
                for t in pts if p in (t.get("config") or {})]
        if len({repr(v[1]) for v in vals}) < 2:     # not searched here
            continue
        numeric = [v for v in vals if num(v[1]) is not None]
        cat = [(lo, value_label(p, x), y) for lo, x, y in vals if num(x) is None]
        if p == "k":   # discrete: all categories, dense first, then by size
            cat += [(lo, str(int(x)), y) for lo, x, y in numeric]
            numeric = []
        if numeric:
            panels.append((p if not cat else f"{p} (value)", "log" if p == "lr" else "num", numeric))
        if cat:
            panels.append((p if not numeric else f"{p} (strategy)", "cat", cat))
    return panels


def _scatter_panel(figs: Figures, ax, title: str, kind: str, vals: list, jitter) -> None:
    if kind == "cat":
        names = sorted({v[1] for v in vals}, key=lambda s: (s != DENSE, _num_or_inf(s), s))
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
    for loss in sorted({v[0] for v in vals}, key=key_rank):
        sel = [i for i, v in enumerate(vals) if v[0] == loss]
        ax.scatter([xs[i] for i in sel], [vals[i][2] for i in sel], s=18, alpha=0.8,
                   label=loss, color=figs.colour(loss))
    ax.set_xlabel(title)
    ax.set_ylabel("best val macro-F1")
    ax.grid(alpha=0.3)


def _num_or_inf(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return math.inf
