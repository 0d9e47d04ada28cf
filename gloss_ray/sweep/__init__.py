"""Sweeps over benchmarks x losses: ``gloss-ray tune`` and ``gloss-ray bench`` (:func:`main`).

``tune``: for every benchmark x loss, a Ray Tune search (``--search-alg``, default Optuna;
``--scheduler``, default ASHA early stopping: :mod:`~gloss_ray.sweep.algorithms`; on the space
file's ``metric``/``mode``; one Ray Train run per trial), then the best configuration
retrained with seeds ``0..S-1`` (stage ``final``), then the report. ``bench``: the base
configuration for every benchmark x loss x seed (stage ``bench``), then the report. The base
configuration is ``--config`` YAML < ``--workers``/``--gpu`` < ``--set KEY=VALUE`` (VALUE is YAML).

The parts: :mod:`~gloss_ray.sweep.plan` (options, base configs, the runs to do),
:mod:`~gloss_ray.sweep.spaces` (search-space files), :mod:`~gloss_ray.sweep.search` (one search),
:mod:`~gloss_ray.sweep.runs` (final / bench runs) and :mod:`~gloss_ray.sweep.ray_cleanup` (stopped
trials give their Train resources back).

A sweep folder ``<storage>/<name>`` (default name ``sweep-<timestamp>``) holds::

    search/<benchmark>__<loss>/                 the Tune experiment (restorable), search.json (search
                                                algorithm, scheduler) and trials.json
    search/<benchmark>__<loss>/<trial_id>/run/  that trial's Ray Train run (stage "trial"; PBT: also run-1, ...)
    runs/<benchmark>/<loss>/seed<k>/            final / bench runs (metrics.json, history.csv, model)
    report/                                     report.md, report.html, results.csv, results.json
                                                (on s3:// / gs://: built in a temporary folder, uploaded)

Runs at a time (``max_concurrent_trials`` too): ``--concurrency``, else the cluster's GPUs or CPUs
divided by what one run takes.

Resume: Ctrl-C (or a crash) leaves the sweep resumable; run the same command with the same
``--storage``/``--name``. A search with a trials.json is done; an interrupted one is restored with
``Tuner.restore`` (finished and errored trials are kept; unfinished ones restart, and their Train
run resumes from its last checkpoint); final/bench runs whose metrics.json exists are skipped.

Exit status 0 when every benchmark x loss got all its final (or bench) runs, 1 when the sweep went
through but some did not (every trial failed, or a run failed) -- both printed and in the report.
"""
from __future__ import annotations

from ..log import say
from .plan import Plan, SweepOptions, base_configs, make_plan, parse_loss_spec, parse_sets

__all__ = ["Plan", "SweepOptions", "base_configs", "main", "make_plan", "parse_loss_spec", "parse_sets"]


def _searches(plan: Plan, concurrency: int) -> tuple[list, list[str]]:
    """tune: every benchmark x loss's search; returns the final runs of the best trials and the
    benchmark x loss pairs without one (every trial failed)."""
    from .ray_cleanup import run_registry
    from .search import run_search

    jobs, missing = [], []
    with run_registry(plan.sweep_dir) as registry:
        for (b, loss), base in plan.bases.items():
            _, best = run_search(plan.sweep_dir, b, loss, base, plan.space, registry=registry,
                                 samples=plan.options.samples, grace_epochs=plan.options.grace_epochs,
                                 concurrency=concurrency, keep_checkpoints=plan.options.keep_checkpoints,
                                 search_alg=plan.search_alg, scheduler=plan.scheduler)
            if best is None:
                say(f"final {b} x {loss}: skipped (no successful trial)")
                missing.append(f"{b} x {loss}")
            else:
                jobs += plan.runs(b, loss, best["config"], best["trial_id"])
    return jobs, missing


def _report(sweep_dir: str, tracked=None) -> None:
    """Write the sweep's report into ``<sweep_dir>/report``. On object storage it is built in a
    temporary folder from a copy of the result files (:func:`~gloss_ray.storage.fetch_report_inputs`),
    the temporary paths in it replaced by the sweep's URI, and uploaded. ``tracked(folder)`` (with
    ``--report-to mlflow``) logs the report folder as MLflow artifacts."""
    import tempfile
    from pathlib import Path

    from ..report import build_report
    from ..storage import fetch_report_inputs, is_uri, join, redact, upload_dir

    if not is_uri(sweep_dir):
        if next(Path(sweep_dir).glob("runs/**/metrics.json"), None) is None:
            say("report: no finished runs to report")
        else:
            paths = build_report(sweep_dir)
            say(f"report: {paths['report.md']} (also report.html, results.csv, results.json)")
            if tracked:
                tracked(paths["report.md"].parent)
        return
    dest = join(sweep_dir, "report")
    with tempfile.TemporaryDirectory(prefix="gloss_ray_report_") as tmp:
        local, out = Path(tmp) / "sweep", Path(tmp) / "report"
        fetch_report_inputs(sweep_dir, local)
        if next(local.glob("runs/**/metrics.json"), None) is None:
            say("report: no finished runs to report")
            return
        paths = build_report(local, out)
        for path in paths.values():            # results.json, report.md ... name the sweep, not the copy
            if path.suffix in (".md", ".html", ".json", ".csv"):
                path.write_text(path.read_text(encoding="utf-8").replace(str(local), redact(sweep_dir)),
                                encoding="utf-8")
        upload_dir(out, dest)
        if tracked:
            tracked(out)
    say(f"report: {join(dest, 'report.md')} (also report.html, results.csv, results.json), uploaded")


def _report_tracker(plan: Plan):
    """With ``--report-to mlflow``: the function that logs the report folder into the sweep's MLflow
    experiment (:func:`gloss_ray.train.tracking.log_report`); else None."""
    base = next(iter(plan.bases.values()))
    from ..options import report_to

    if "mlflow" not in report_to(base.get("report_to")):
        return None
    from ..train.tracking import log_report

    def tracked(folder) -> None:
        run_id = log_report(base["tracking_uri"], base["experiment"], plan.sweep_dir, folder)
        say(f"report: logged to MLflow experiment {base['experiment']!r}, run {run_id}")
    return tracked


def main(plan: Plan) -> int:
    """``gloss-ray tune`` / ``gloss-ray bench`` of a :func:`make_plan` whose benchmarks the driver has
    (:func:`gloss_ray.cli.fetch_data`; see the module docstring); returns the exit status."""
    from ..train.launch import init_ray
    from .runs import default_concurrency, fill_cpus, run_many

    opts = plan.options
    plan.preflight()                            # data and model; nothing started or written yet
    if plan.space is not None:
        from .ray_cleanup import check_ray_version

        check_ray_version()                     # the search's Train cleanup is tied to the Ray version
    say(f"{opts.command} {', '.join(plan.benchmarks)} x {', '.join(plan.losses)} -> {plan.sweep_dir}")
    say(f"to resume after an interruption, run the same command with --name {plan.name} --storage {opts.storage}")
    init_ray()
    concurrency = default_concurrency(opts.concurrency, next(iter(plan.bases.values())))
    fill_cpus(plan.bases, concurrency)
    if plan.space is not None:
        jobs, missing = _searches(plan, concurrency)
    else:
        jobs, missing = [job for b, loss in plan.bases for job in plan.runs(b, loss)], []
    say(f"{plan.stage} runs: {len(jobs)} ({opts.seeds} seed(s) x {len(plan.bases) - len(missing)} "
        f"benchmark x loss), up to {concurrency} at a time")
    failed = run_many(jobs, concurrency, keep_checkpoints=opts.keep_checkpoints)
    _report(plan.sweep_dir, _report_tracker(plan))
    if missing or failed:
        say(f"finished with problems: {failed} failed run(s); no result for {', '.join(missing) or '-'}")
        return 1
    return 0
