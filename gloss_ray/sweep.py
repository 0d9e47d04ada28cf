"""Sweeps over benchmarks x losses: ``gloss-ray tune`` and ``gloss-ray bench`` (``main(args)``).

``tune``: for every benchmark x loss, a Ray Tune search (Optuna sampler, ASHA early stopping on the
space's metric, one Ray Train run per trial), then the best configuration retrained with seeds
``0..S-1`` (stage ``final``), then the report. ``bench``: the base configuration for every
benchmark x loss x seed (stage ``bench``), then the report. The base configuration is
``--config`` YAML < ``--workers``/``--gpu`` < ``--set KEY=VALUE`` (VALUE read as YAML).

Layout of a sweep folder ``<storage>/<name>`` (default name ``sweep-<timestamp>``)::

    search/<benchmark>__<loss>/                 the Tune experiment (restorable) and trials.json
    search/<benchmark>__<loss>/<trial_id>/run/  that trial's Ray Train run (stage "trial")
    runs/<benchmark>/<loss>/seed<k>/            final / bench runs (metrics.json, history.csv, model)
    report/                                     report.md, report.html, results.csv, results.json

Ray Train V2 + Tune: each trial is a function (``_trial``) that launches its own ``TorchTrainer``
through :func:`gloss_ray.trainer.fit` with Tune's ``TuneReportCallback``, which forwards every
epoch's row to Tune (so ASHA sees ``val_macro_f1`` per epoch, keyed on ``epoch``). The trial
function itself reserves no CPU (:data:`TRIAL_RESOURCES`); the Train workers reserve theirs, and ``max_concurrent_trials``
(default: cluster GPUs or CPUs / run) keeps the trials from queueing for workers. A trial that ASHA
stops has its actor removed; the Train controller and workers it owns go with it.

Resuming: run the same command with the same ``--storage``/``--name``. A search whose trials.json
exists is not run again; an interrupted one is restored with ``Tuner.restore`` (finished and
errored trials are kept, unfinished ones restart and their Train run resumes from its last
checkpoint); final/bench runs whose metrics.json exists are skipped.

Exit status 0 when every benchmark x loss has all its final (or bench) runs; 1 when the sweep went
through but some have none (all trials failed) or a run failed -- both are printed and reported.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import threading

import yaml
from ray.tune import Callback
from ray.train.v2._internal.execution.callback import WorkerGroupCallback  # as Train's own PG cleaner

from .config import TrainConfig
from .errors import ConfigError
from .storage import exists, join, read_json

PREFIX = "[gloss-ray]"
ASHA_REDUCTION = 4          # ASHA keeps the top 1/4 of the trials at each rung (Ray's default)
# The trial function only drives its Train run (whose workers reserve their own CPUs/GPUs): it
# reserves no CPU. Tune needs a non-empty bundle, hence a 1-byte logical memory placeholder.
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}
# per-epoch keys reported by the train loop that a space's ``metric`` may name
REPORTED = ("val_macro_f1", "val_accuracy", "train_loss", "train_ce", "train_aux")


def log(msg: str) -> None:
    print(f"{PREFIX} {msg}", flush=True)


def _last_line(err: BaseException | str | None) -> str:
    lines = [ln.strip() for ln in str(err or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


# --------------------------------------------------------------------------- configuration
def parse_sets(items: list[str]) -> dict:
    """``["lr=1e-4", "k=dense"]`` -> ``{"lr": 1e-4, "k": None}`` (values read with yaml.safe_load)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: not valid YAML ({str(e).splitlines()[0]})") from None
        out[key] = None if key == "k" and parsed == "dense" else parsed
    return out


def base_configs(args, benchmarks: list[str], losses: list[str]) -> dict[tuple, dict]:
    """Validated base option dicts per (benchmark, loss); bad options fail here, before Ray."""
    overrides = {"workers": args.workers, **({"gpu": True} if args.gpu else {}), **parse_sets(args.set)}
    return {(b, l): TrainConfig.from_sources(args.config, {**overrides, "benchmark": b, "loss": l}).to_dict()
            for b in benchmarks for l in losses}


def _split(text: str) -> list[str]:
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if not items:
        raise ConfigError(f"expected a comma-separated list, got {text!r}")
    return list(dict.fromkeys(items))


def _run_config(base: dict, params: dict, seed: int, storage: str, name: str, stage: str, **extra) -> TrainConfig:
    d = {**base, **params, "seed": seed, "storage": storage, "name": name,
         "extra": {**(base.get("extra") or {}), **extra, "stage": stage}}
    return TrainConfig.from_dict(d, source=f"{stage} run {name}")


# --------------------------------------------------------------------------- trial runs
class RunRegistry:
    """Ray actor (no CPU) that knows the Train run of every live trial, so stopping a trial also
    shuts its run down cleanly.

    Each trial's TorchTrainer has a controller actor owned by the trial actor, and the workers'
    placement group is created by that controller -- Ray frees such a group only when the *job*
    (the sweep driver) ends. When Tune stops a trial (ASHA, or max_t) it removes the trial actor,
    and the controller and workers die with it but their CPUs/GPUs would stay reserved. So the
    driver calls :meth:`stop` first (from :class:`_SearchCallback`), which aborts the run through
    its controller (workers, placement group and Train's cleaner actor go). As a fallback for trial
    actors that die some other way, a thread frees the group of any registered run whose controller
    is dead (``__ray_ready__`` fails). Train's own PlacementGroupCleaner does that via the state API,
    which needs the dashboard and one Ray instance per machine."""

    def __init__(self, interval_s: float = 1.0):
        self._runs: dict = {}          # trial id -> (controller handle, placement group)
        self._lock = threading.Lock()
        self.freed = 0
        threading.Thread(target=self._watch, args=(interval_s,), daemon=True).start()

    def register(self, trial_id: str, controller, pg) -> None:
        with self._lock:
            self._runs[trial_id] = (controller, pg)

    def stop(self, trial_id: str, timeout_s: float = 60.0) -> None:
        """Abort the trial's Train run (no-op when it already finished) and wait for it."""
        import ray

        with self._lock:
            controller, _ = self._runs.get(trial_id, (None, None))
        if controller is not None:
            try:
                ray.get(controller.abort.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass                   # it exits itself once aborted; the watcher frees what is left

    def status(self) -> tuple[int, int]:
        """(runs whose placement group is still reserved, groups freed by the watcher so far)."""
        return len(self._runs), self.freed

    def _watch(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            try:
                self._free_dead()
            except Exception as e:  # keep watching
                print(f"{PREFIX} run registry: {e}", flush=True)

    def _free_dead(self) -> None:
        import ray
        from ray.util.placement_group import placement_group_table, remove_placement_group

        with self._lock:
            items = list(self._runs.items())
        for key, (controller, pg) in items:
            if placement_group_table(pg).get("state", "REMOVED") != "REMOVED":
                ready, _ = ray.wait([controller.__ray_ready__.remote()], timeout=5)
                if not ready:
                    continue                           # alive and busy
                try:
                    ray.get(ready[0])
                    continue                           # alive
                except ray.exceptions.ActorDiedError:
                    remove_placement_group(pg)
                    self.freed += 1
            with self._lock:                           # group gone: forget the run
                self._runs.pop(key, None)


def registry_name(sweep_dir: str) -> str:
    """Name of the sweep's :class:`RunRegistry` (stable, so a restored Tuner's callbacks find it)."""
    return "gloss-ray-runs-" + hashlib.sha1(sweep_dir.encode()).hexdigest()[:12]


def _registry(name: str):
    import ray

    try:
        return ray.get_actor(name)
    except ValueError:
        return None


class _RegisterRun(WorkerGroupCallback):
    """Train callback (runs in the controller): registers each new worker group's placement group
    and the controller's handle with the sweep's :class:`RunRegistry`."""

    def __init__(self, registry: str, trial_id: str):
        self.registry, self.trial_id = registry, trial_id

    def after_worker_group_start(self, worker_group) -> None:
        import ray

        reg = _registry(self.registry)
        if reg is not None:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            ray.get(reg.register.remote(self.trial_id, ray.get_runtime_context().current_actor, pg), timeout=30)


def _trial(config: dict, base: dict, registry: str) -> None:
    """One Tune trial: a Ray Train run of ``base`` + the sampled ``config``; epochs reach Tune via
    ``TuneReportCallback``. Its outputs go to ``<trial dir>/run`` (stage ``trial``)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .spaces import decode_params
    from .trainer import fit

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = _run_config(base, decode_params(config), base["seed"], ctx.get_trial_dir(), "run", "trial",
                      trial_id=trial_id)
    fit(cfg, callbacks=[TuneReportCallback(), _RegisterRun(registry, trial_id)])


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _trial_status(errored: bool, last_epoch: int, epochs: int, finished: bool) -> str:
    """TERMINATED, ERROR, or STOPPED_EARLY (ASHA stopped it before its last epoch; a run that
    ended early through its own patience wrote metrics.json and counts as TERMINATED)."""
    if errored:
        return "ERROR"
    return "STOPPED_EARLY" if last_epoch < epochs and not finished else "TERMINATED"


class _SearchCallback(Callback):
    """Driver side of a search: when Tune ends a trial, shut its Train run down (see
    :class:`RunRegistry`) before Tune removes the trial actor, then print
    ``search mr x gloss: 3/4 trials done (1 stopped early, 0 failed)``. Counts come from the trial
    list each time, so a restored search counts its earlier trials too."""

    def __init__(self, label: str, total: int, epochs: int, registry: str):
        self.label, self.total, self.epochs, self.registry = label, total, epochs, registry

    def _report(self, trials, current, errored: bool) -> None:
        done = stopped = failed = 0
        for t in trials:
            status = ("ERROR" if errored else "TERMINATED") if t is current else t.status
            if status not in ("ERROR", "TERMINATED"):
                continue
            done += 1
            if status == "ERROR":
                failed += 1
            else:
                epochs = int(t.config.get("epochs", self.epochs))
                finished = exists(join(t.path, "run", "metrics.json"))
                stopped += _trial_status(False, int(t.last_result.get("epoch", 0)), epochs, finished) == "STOPPED_EARLY"
        log(f"search {self.label}: {done}/{self.total} trials done ({stopped} stopped early, {failed} failed)")

    def on_trial_complete(self, iteration, trials, trial, **info):
        import ray

        reg = _registry(self.registry)     # called before Tune removes the trial actor
        if reg is not None:
            ray.get(reg.stop.remote(trial.trial_id))
        self._report(trials, trial, False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._report(trials, trial, True)


def trial_records(results, benchmark: str, loss: str, epochs: int, device: str, workers: int) -> list[dict]:
    """The trials.json records of a Tune ResultGrid (schema: :func:`gloss_ray.report.load_trials`)."""
    from .spaces import decode_params

    records = []
    for r in results:
        df = r.metrics_dataframe
        m = r.metrics or {}
        f1 = df["val_macro_f1"].dropna() if df is not None and "val_macro_f1" in df else []
        last_epoch = int(df["epoch"].max()) if df is not None and "epoch" in df and len(df) else int(m.get("epoch") or 0)
        config = decode_params(r.config or {})
        trial_id = os.path.basename(str(r.path).rstrip("/"))
        status = _trial_status(r.error is not None, last_epoch, int(config.get("epochs", epochs)),
                               exists(join(r.path, "run", "metrics.json")))
        time_s = m.get("time_total_s", m.get("elapsed_s"))
        records.append({
            "trial_id": trial_id, "benchmark": benchmark, "loss": loss, "status": status, "config": config,
            "best_val_macro_f1": float(max(f1)) if len(f1) else None, "iterations": last_epoch,
            "time_s": float(time_s) if time_s is not None else None, "device": device, "num_workers": workers,
            "error": _last_line(r.error) if r.error is not None else None,
        })
    return sorted(records, key=lambda t: t["trial_id"])


def best_trial(records: list[dict], metric_values: dict[str, float], mode: str) -> dict | None:
    """The non-errored trial with the best value of the space's metric (``metric_values`` by id)."""
    ok = [t for t in records if t["status"] != "ERROR" and metric_values.get(t["trial_id"]) is not None]
    if not ok:
        return None
    pick = max if mode == "max" else min
    return pick(ok, key=lambda t: metric_values[t["trial_id"]])


def _metric_values(results, metric: str, mode: str) -> dict[str, float]:
    """Best value (over epochs) of ``metric`` per trial id."""
    out = {}
    for r in results:
        df = r.metrics_dataframe
        if df is not None and metric in df and df[metric].notna().any():
            v = df[metric].max() if mode == "max" else df[metric].min()
            out[os.path.basename(str(r.path).rstrip("/"))] = float(v)
    return out


def _write_json(uri: str, obj) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write((json.dumps(obj, indent=2, default=str) + "\n").encode())


def _max_epochs(spec, base_epochs: int) -> int:
    """ASHA's max_t: the largest number of epochs a trial of this space can run."""
    from .spaces import Dist

    e = spec.get("epochs", base_epochs)
    if isinstance(e, Dist):
        return int(max(e.args) if e.kind == "choice" else e.args[1] - 1)
    return int(e)


def run_search(sweep_dir: str, benchmark: str, loss: str, base: dict, space, args, concurrency: int):
    """One benchmark x loss search (new, restored, or already done); returns (records, best record)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from .spaces import Dist, to_tune

    label = f"{benchmark} x {loss}"
    exp_dir = join(sweep_dir, "search", f"{benchmark}__{loss}")
    trials_file = join(exp_dir, "trials.json")
    if exists(trials_file):
        records = read_json(trials_file)
        best = max((t for t in records if t.get("best_metric") is not None),
                   key=lambda t: t["best_metric"] * (1 if space.mode == "max" else -1), default=None)
        log(f"search {label}: done earlier ({len(records)} trials in {trials_file})")
        return records, best

    spec = space.for_run(benchmark, loss)
    epochs = _max_epochs(spec, base["epochs"])
    registry = registry_name(sweep_dir)
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base, registry=registry), TRIAL_RESOURCES)
    if tune.Tuner.can_restore(exp_dir):
        log(f"search {label}: resuming the interrupted search in {exp_dir}")
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        searchable = any(isinstance(v, Dist) for v in spec.values())
        samples = args.samples if searchable else 1      # nothing to sample: one trial
        log(f"search {label}: {samples} trial(s), up to {concurrency} at a time, ASHA on {space.metric} "
            f"({space.mode}), {epochs} epochs, grace {args.grace_epochs}")
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune(spec),
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(metric=space.metric, mode=space.mode, seed=base["seed"]) if searchable else None,
                scheduler=ASHAScheduler(time_attr="epoch", metric=space.metric, mode=space.mode, max_t=epochs,
                                        grace_period=min(args.grace_epochs, epochs), reduction_factor=ASHA_REDUCTION),
                num_samples=samples, max_concurrent_trials=concurrency, reuse_actors=False,
                trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=f"{benchmark}__{loss}", storage_path=join(sweep_dir, "search"), verbose=0,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[_SearchCallback(label, samples, epochs, registry)]),
        )
    results = tuner.fit()     # trial errors are collected in the ResultGrid, not raised
    _wait_for_release(registry)
    device = "gpu" if base["gpu"] else "cpu"
    records = trial_records(results, benchmark, loss, epochs, device, base["workers"])
    values = _metric_values(results, space.metric, space.mode)
    for t in records:
        t["metric"], t["best_metric"] = space.metric, values.get(t["trial_id"])
    _write_json(trials_file, records)
    best = best_trial(records, values, space.mode)
    n = {s: sum(t["status"] == s for t in records) for s in ("TERMINATED", "STOPPED_EARLY", "ERROR")}
    log(f"search {label}: {len(records)} trials ({n['TERMINATED']} finished, {n['STOPPED_EARLY']} stopped early, "
        f"{n['ERROR']} failed) -> {trials_file}")
    for t in records:
        if t["error"]:
            log(f"  trial {t['trial_id']} failed: {t['error']}")
    if best:
        log(f"search {label}: best trial {best['trial_id']} {space.metric} {best['best_metric']:.4f} {best['config']}")
    return records, best


def start_registry(sweep_dir: str):
    import ray

    return ray.remote(num_cpus=0, max_concurrency=8)(RunRegistry).options(
        name=registry_name(sweep_dir), get_if_exists=True).remote()


def _wait_for_release(registry: str, timeout_s: float = 60.0) -> None:
    """Block until the trials' Train runs have given their workers back (the next search needs them)."""
    import ray

    reg = _registry(registry)
    if reg is None:
        return
    deadline = time.time() + timeout_s
    left, freed = ray.get(reg.status.remote())
    while left and time.time() < deadline:
        time.sleep(1.0)
        left, freed = ray.get(reg.status.remote())
    if freed:
        log(f"freed the placement groups of {freed} trial run(s) whose controller died")
    if left:
        log(f"warning: {left} trial run(s) still hold their workers' resources")


# --------------------------------------------------------------------------- final / bench runs
def run_many(jobs: list[tuple[str, TrainConfig]], concurrency: int) -> tuple[int, int, int]:
    """Run ``(label, cfg)`` jobs with ``fit`` (``concurrency`` at a time); a job whose metrics.json
    exists is skipped. Returns (done, skipped, failed)."""
    from .trainer import fit, storage_root

    todo, skipped, failed = [], 0, 0
    for label, cfg in jobs:
        if exists(join(storage_root(cfg.storage), cfg.name, "metrics.json")):
            skipped += 1
            log(f"{label}: skipped (metrics.json exists)")
        else:
            todo.append((label, cfg))
    done = 0
    pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(todo) or 1)))
    try:
        futures = {pool.submit(fit, cfg): label for label, cfg in todo}
        for fut in as_completed(futures):
            label = futures[fut]
            try:
                m = fut.result()
                log(f"{label}: test acc {m.get('test_accuracy', math.nan):.4f} macro-F1 {m.get('test_macro_f1', math.nan):.4f}")
                done += 1
            except Exception as e:  # one failed run does not stop the others
                failed += 1
                log(f"{label}: FAILED: {_last_line(e)}")
            log(f"runs: {done + skipped + failed}/{len(jobs)} done ({skipped} skipped, {failed} failed)")
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return done, skipped, failed


def default_concurrency(args, base: dict) -> int:
    """Runs at a time: ``--concurrency``, else as many as the cluster's GPUs (with --gpu) or CPUs fit."""
    import ray

    if getattr(args, "concurrency", None):
        return int(args.concurrency)
    res = ray.cluster_resources()
    if base["gpu"]:
        return max(1, int(res.get("GPU", 0) // base["workers"]))
    return max(1, int(res.get("CPU", 1) // (base["workers"] * base["cpus_per_worker"])))


def _report(sweep_dir: str) -> None:
    from pathlib import Path

    from .report import build_report

    if "://" in sweep_dir:
        log(f"report: copy {sweep_dir} locally and run: gloss-ray report <folder>")
        return
    if next(Path(sweep_dir).glob("runs/**/metrics.json"), None) is None:
        log("report: no finished runs, nothing to report")
        return
    paths = build_report(sweep_dir)
    log(f"report: {paths.get('report.md') or next(iter(paths.values()))} (also report.html, results.csv, results.json)")


def main(args) -> int:
    """``gloss-ray tune`` / ``gloss-ray bench`` (see the module docstring). Returns the exit status."""
    from .spaces import load_space
    from .trainer import init_ray, storage_root

    benchmarks, losses = _split(args.benchmarks), _split(args.losses)
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    bases = base_configs(args, benchmarks, losses)
    space = None
    if args.command == "tune":
        if args.samples < 1 or args.grace_epochs < 1:
            raise ConfigError("--samples and --grace-epochs must be >= 1")
        space = load_space(args.space)
        if space.metric not in REPORTED:
            raise ConfigError(f"{args.space}: metric: {space.metric!r} is not reported per epoch "
                              f"(one of {', '.join(REPORTED)})")
        for b in benchmarks:
            for l in losses:
                space.for_run(b, l)          # unknown benchmark / loss missing from the space
    name = args.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = join(storage_root(args.storage), name)
    log(f"{args.command} {', '.join(benchmarks)} x {', '.join(losses)} -> {sweep_dir}")
    log(f"to resume after an interruption, run the same command with --name {name} --storage {args.storage}")
    init_ray()
    first = next(iter(bases.values()))
    concurrency = default_concurrency(args, first)

    registry = start_registry(sweep_dir) if space is not None else None  # noqa: F841 (kept alive)
    stage = "final" if args.command == "tune" else "bench"
    jobs, missing = [], []
    for (b, l), base in bases.items():
        params = {}
        if space is not None:
            _, best = run_search(sweep_dir, b, l, base, space, args, concurrency)
            if best is None:
                log(f"final {b} x {l}: skipped (no successful trial)")
                missing.append(f"{b} x {l}")
                continue
            params = best["config"]
        extra = {"trial_id": best["trial_id"]} if space is not None else {}
        run_root = join(sweep_dir, "runs", b, l)
        for k in range(args.seeds):
            jobs.append((f"{stage} {b} x {l} seed {k}", _run_config(base, params, k, run_root, f"seed{k}", stage, **extra)))
    log(f"{stage} runs: {len(jobs)} ({args.seeds} seed(s) x {len(bases) - len(missing)} benchmark x loss), "
        f"up to {concurrency} at a time")
    _, _, failed = run_many(jobs, concurrency)
    _report(sweep_dir)
    if missing or failed:
        log(f"finished with problems: {failed} failed run(s); no result for {', '.join(missing) or '-'}")
        return 1
    return 0
