"""Experiment report from a results directory: ``build_report(results_dir, out_dir)``, also
``gloss-ray report RESULTS_DIR [--out OUT_DIR]`` and ``python -m gloss_ray.report RESULTS_DIR [OUT_DIR]``.

A pipeline of four steps, one module each:

* :mod:`~gloss_ray.report.collect` reads ``**/metrics.json`` (one finished run, with ``history.csv``
  and optionally ``plots/embedding_map.png`` beside it; stages ``final`` and ``bench`` only) and
  ``**/trials.json`` (a sweep's trial records), found by recursive glob so any nesting works, and
  keys the runs into rows (``gloss+global@0.1``: see :func:`run_key`);
* :mod:`~gloss_ray.report.stats` aggregates them: mean and sample std over seeds, paired
  differences to CE (bootstrap CI, paired t-test), convergence, the search summary, device-hours;
* :mod:`~gloss_ray.report.figures` draws the PNGs in ``figures/``;
* :mod:`~gloss_ray.report.render` lays out ``report.md`` and a self-contained ``report.html`` and
  writes ``results.csv`` (one row per benchmark x key) and ``results.json`` (everything, numbers
  unrounded; std is the sample std, ddof=1, ``null`` for a single seed; differences are
  ``ours - CE`` as fractions). Percentages are for display only.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import ConfigError
from ..log import fail
from .collect import collect, run_key
from .figures import draw
from .render import PAPER_CITATION, write
from .stats import summarise

__all__ = ["PAPER_CITATION", "build_report", "main", "run_key"]


def build_report(results_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.html, results.csv, results.json and figures/*.png to ``out_dir``
    (default ``results_dir/report``).

    Returns ``{name relative to out_dir: path}`` for every file written. Raises
    :class:`ConfigError` naming ``results_dir`` if it is missing or holds neither runs nor a search.
    """
    results = collect(results_dir)
    out = Path(out_dir) if out_dir is not None else results.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(results)
    drawn = draw(results, summary, out)
    return write(results, summary, drawn, out)


def main(argv: list[str] | None = None) -> int:
    """``python -m gloss_ray.report RESULTS_DIR [OUT_DIR]``."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m gloss_ray.report RESULTS_DIR [OUT_DIR]", file=sys.stderr)
        return 2
    try:
        paths = build_report(*args)
    except ConfigError as e:
        fail(f"error: {e}")
        return 2
    print(paths["report.html"])
    return 0
