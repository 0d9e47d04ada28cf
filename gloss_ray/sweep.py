"""Sweeps over benchmarks x losses: ``gloss-ray tune`` and ``gloss-ray bench`` (``main(args)``).

``tune``: for every benchmark x loss, a Ray Tune search (Optuna sampler, ASHA early stopping, on the
space file's ``metric``/``mode``; one Ray Train run per trial), then the best configuration
retrained with seeds ``0..S-1`` (stage ``final``), then the report. ``bench``: the base
configuration for every benchmark x loss x seed (stage ``bench``), then the report. The base
configuration is ``--config`` YAML < ``--workers``/``--gpu`` < ``--set KEY=VALUE`` (VALUE is YAML).

A sweep folder ``<storage>/<name>`` (default name ``sweep-<timestamp>``) holds::

    search/<benchmark>__<loss>/                 the Tune experiment (restorable) and trials.json
    search/<benchmark>__<loss>/<trial_id>/run/  that trial's Ray Train run (stage "trial")
    runs/<benchmark>/<loss>/seed<k>/            final / bench runs (metrics.json, history.csv, model)
    report/                                     report.md, report.html, results.csv, results.json

Train V2 + Tune: a trial is a function (:func:`_trial`) that runs its own ``TorchTrainer`` through
:func:`gloss_ray.train.launch.fit` with Tune's ``TuneReportCallback``, which forwards each epoch's row to
Tune, so ASHA acts per epoch (``time_attr="epoch"``). The trial function reserves no CPU
(:data:`TRIAL_RESOURCES`); the Train workers reserve their own, and ``max_concurrent_trials``
(default: the cluster's GPUs or CPUs divided by what one run takes) bounds how many run at once.
When Tune stops a trial, :class:`RunRegistry` first aborts its Train run, so no workers or
reserved resources stay behind.

Resume: Ctrl-C (or a crash) leaves the sweep resumable; run the same command with the same
``--storage``/``--name``. A search with a trials.json is done; an interrupted one is restored with
``Tuner.restore`` (finished and errored trials are kept; unfinished ones restart, and their Train
run resumes from its last checkpoint); final/bench runs whose metrics.json exists are skipped.

Exit status 0 when every benchmark x loss got all its final (or bench) runs, 1 when the sweep went
through but some did not (every trial failed, or a run failed) -- both printed and in the report.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import yaml
from ray.train.v2._internal.execution.callback import WorkerGroupCallback  # as Train's own PG cleaner
from ray.tune import Callback

from .config import TrainConfig
from .errors import ConfigError
from .storage import absolute, exists, join, read_json, remove_checkpoints, write_json

PREFIX = "[gloss-ray]"
ASHA_REDUCTION = 4   # ASHA keeps the best 1/4 of the trials at each rung (Ray's default)
# The trial function only drives its Train run, whose workers reserve their own CPUs/GPUs. Tune
# needs a non-empty resource bundle, hence a 1-byte (logical) memory placeholder instead of CPU.
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}
REPORTED = ("val_macro_f1", "val_accuracy", "train_loss", "train_ce", "train_aux")  # metrics a space may name
STATUSES = ("TERMINATED", "STOPPED_EARLY", "ERROR")
ENDED = "trial_ended.json"   # written into a trial's folder when Tune ends it (not when interrupted)


def log(msg: str) -> None:
    print(f"{PREFIX} {msg}", flush=True)


def _last_line(err) -> str:
    lines = [ln.strip() for ln in str(err or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


# --------------------------------------------------------------------------- configuration
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-4: a string to YAML 1.1


def parse_sets(items: list[str]) -> dict:
    """``["lr=1e-4", "k=dense"]`` -> ``{"lr": 1e-4, "k": None}``: values read with yaml.safe_load,
    except that ``1e-4`` (no dot) is a float, as in the space files."""
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
        if isinstance(parsed, str) and _EXP_FLOAT.fullmatch(parsed):
            parsed = float(parsed)
        out[key] = None if key == "k" and parsed == "dense" else parsed
    return out


GLOBAL_K_DEFAULT = 16
_SPEC = re.compile(r"^(?P<loss>[a-z_]+)(?P<glob>\+global)?(?:@(?P<frac>[0-9.]+))?$")


def parse_loss_spec(spec: str) -> tuple[str, bool, float | None]:
    """``"gloss+global@0.2"`` -> ``("gloss", True, 0.2)``: a loss, ``+global`` for the global graph
    and ``@F`` for training on a fraction F of the labels -- the report's row keys."""
    m = _SPEC.match(spec)
    frac = None
    if m and m["frac"]:
        try:
            frac = float(m["frac"])
        except ValueError:
            m = None
    if not m:
        raise ConfigError(f"--losses: {spec!r}: expected LOSS[+global][@FRACTION], e.g. ce, gloss+global, ce@0.2")
    return m["loss"], bool(m["glob"]), frac


def base_configs(args, benchmarks: list[str], losses: list[str]) -> dict[tuple, dict]:
    """Validated base options per (benchmark, loss spec), as dicts, with the data folder pinned
    (trial actors and workers may not share the driver's environment). A spec's ``+global`` turns
    the global graph on (``global_k`` from the options, else 16); when some spec has it, the specs
    without it run without the global graph (so ``ce,gloss,gloss+global`` compares the three).
    ``@F`` sets ``label_fraction``. Bad options, a missing benchmark or model fail here, in one
    line, before any run starts."""
    from .download import find_or_download
    from .train.launch import preflight

    overrides = {"workers": args.workers, **({"gpu": True} if args.gpu else {}), **parse_sets(args.set)}
    bases = {}
    specs = {spec: parse_loss_spec(spec) for spec in losses}
    compare_global = any(glob for _, glob, _ in specs.values())
    for b in benchmarks:
        for spec, (loss, glob, frac) in specs.items():
            # read the options as a G-Loss run (which accepts every option), then apply the spec
            d = TrainConfig.from_sources(args.config, {**overrides, "benchmark": b, "loss": "gloss"}).to_dict()
            d["loss"] = loss
            if compare_global:
                d["global_k"] = (d["global_k"] or GLOBAL_K_DEFAULT) if glob else 0
            if frac is not None:
                d["label_fraction"] = frac
            cfg = TrainConfig.from_dict(d, source=f"--losses {spec}").resolved()
            cfg.data_dir = str(find_or_download(b, cfg.data_dir))
            if spec == losses[0]:
                preflight(cfg)
            bases[(b, spec)] = cfg.to_dict()
    return bases


def _split(text: str) -> list[str]:
    items = list(dict.fromkeys(x.strip() for x in (text or "").split(",") if x.strip()))
    if not items:
        raise ConfigError(f"expected a comma-separated list, got {text!r}")
    return items


def _run_config(base: dict, params: dict, seed: int, storage: str, name: str, stage: str, **extra) -> TrainConfig:
    d = {**base, **params, "seed": seed, "storage": storage, "name": name,
         "extra": {**(base.get("extra") or {}), **extra, "stage": stage}}
    return TrainConfig.from_dict(d, source=f"{stage} run {name}")


# --------------------------------------------------------------------------- trials' Train runs
class RunRegistry:
    """Ray actor (no CPU) that knows each live trial's Train run, so that stopping a trial also
    shuts its run down cleanly.

    A trial's TorchTrainer controller is an actor owned by the trial actor, and the controller
    creates the workers' placement group -- which Ray frees only when the *job* (the sweep driver)
    ends. Tune stops a trial (ASHA, or max_t) by removing the trial actor: controller and workers
    die with it, but their CPUs/GPUs would stay reserved and starve later trials. So the driver
    calls :meth:`stop` before that (from :class:`_SearchCallback`): the controller aborts the run
    (workers, placement group and Train's cleaner actor go). As a fallback for trial actors that die
    otherwise, a thread frees the group of a registered run whose controller is dead
    (``__ray_ready__`` fails). Train's own PlacementGroupCleaner does this through the state API,
    which needs the dashboard and a single Ray instance on the machine."""

    def __init__(self, interval_s: float = 1.0):
        self._runs: dict = {}          # trial id -> (controller handle, placement group)
        self._lock = threading.Lock()
        self.freed = 0
        threading.Thread(target=self._watch, args=(interval_s,), daemon=True).start()

    def register(self, trial_id: str, controller, pg) -> None:
        with self._lock:
            self._runs[trial_id] = (controller, pg)

    def stop(self, trial_id: str, timeout_s: float = 60.0) -> None:
        """Abort the trial's Train run (a no-op once it has finished) and wait for it."""
        import ray

        with self._lock:
            controller = self._runs.get(trial_id, (None, None))[0]
        if controller is not None:
            try:
                ray.get(controller.abort.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass                   # the controller exits once aborted; the watcher frees the rest

    def status(self) -> tuple[int, int]:
        """(runs still holding their placement group, groups the watcher freed)."""
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
            with self._lock:                           # the group is gone: forget the run
                self._runs.pop(key, None)


def registry_name(sweep_dir: str) -> str:
    """The sweep's :class:`RunRegistry` actor name (stable, so a restored search finds it)."""
    return "gloss-ray-runs-" + hashlib.sha1(sweep_dir.encode()).hexdigest()[:12]


def start_registry(sweep_dir: str):
    import ray

    return ray.remote(num_cpus=0, max_concurrency=8)(RunRegistry).options(
        name=registry_name(sweep_dir), get_if_exists=True).remote()


def _registry(name: str):
    import ray

    try:
        return ray.get_actor(name)
    except ValueError:
        return None


class _RegisterRun(WorkerGroupCallback):
    """Train callback, run in the controller: registers each new worker group's placement group and
    the controller's handle with the sweep's :class:`RunRegistry`."""

    def __init__(self, registry: str, trial_id: str):
        self.registry, self.trial_id = registry, trial_id

    def after_worker_group_start(self, worker_group) -> None:
        import ray

        reg = _registry(self.registry)
        if reg is not None:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            ray.get(reg.register.remote(self.trial_id, ray.get_runtime_context().current_actor, pg), timeout=30)


def _trial(config: dict, base: dict, registry: str, exp_dir: str) -> None:
    """One Tune trial: a Train run of ``base`` + the sampled ``config`` (stage ``trial``, outputs in
    ``<exp_dir>/<trial_id>/run`` on the sweep's storage, so a restarted trial resumes from its
    checkpoint); ``TuneReportCallback`` passes each epoch's metrics on to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .spaces import decode_params
    from .train.launch import fit

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = _run_config(base, decode_params(config), base["seed"], join(exp_dir, trial_id), "run", "trial",
                      trial_id=trial_id)
    fit(cfg, callbacks=[TuneReportCallback(), _RegisterRun(registry, trial_id)])


def _trial_dirname(trial) -> str:
    return trial.trial_id


def trial_status(errored: bool, last_epoch: int, trial_path: str, epochs: int) -> str:
    """ERROR, STOPPED_EARLY or TERMINATED. Stopped early: Tune saw fewer epochs than the run has --
    ``epochs``, or fewer when the run's own patience ended it (``epochs_run`` in its metrics.json)."""
    if errored:
        return "ERROR"
    metrics = join(trial_path, "run", "metrics.json")
    try:
        epochs = int(read_json(metrics).get("epochs_run", epochs)) if exists(metrics) else epochs
    except (OSError, ValueError):
        pass
    return "STOPPED_EARLY" if last_epoch < epochs else "TERMINATED"


class _SearchCallback(Callback):
    """Driver side of a search. When Tune ends a trial: abort its Train run (:class:`RunRegistry`)
    before Tune removes the trial actor, mark the trial ended (:data:`ENDED`; a Ctrl-C leaves the
    running ones unmarked) and print ``search mr x gloss: 3/4 trials done (1 stopped early, 0
    failed)``, counted over all trials (so a restored search includes the earlier ones)."""

    def __init__(self, label: str, total: int, epochs: int, registry: str):
        self.label, self.total, self.epochs, self.registry = label, total, epochs, registry

    def _end(self, trials, trial, errored: bool) -> None:
        write_json(join(trial.path, ENDED), {"status": "ERROR" if errored else "TERMINATED",
                                              "epoch": trial.last_result.get("epoch")})
        n = dict.fromkeys(STATUSES, 0)
        for t in trials:
            status = ("ERROR" if errored else "TERMINATED") if t is trial else t.status
            if status == "TERMINATED":
                status = trial_status(False, int(t.last_result.get("epoch", 0)), t.path,
                                      int(t.config.get("epochs", self.epochs)))
            if status in n:
                n[status] += 1
        log(f"search {self.label}: {sum(n.values())}/{self.total} trials done "
            f"({n['STOPPED_EARLY']} stopped early, {n['ERROR']} failed)")

    def on_trial_complete(self, iteration, trials, trial, **info):
        import ray

        reg = _registry(self.registry)
        if reg is not None:        # Tune calls this before it removes the trial actor
            try:
                ray.get(reg.stop.remote(trial.trial_id), timeout=90)
            except Exception as e:
                log(f"trial {trial.trial_id}: could not stop its Train run cleanly: {_last_line(e)}")
        self._end(trials, trial, False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trials, trial, True)


def trial_records(results, benchmark: str, loss: str, epochs: int, metric: str, mode: str, device: str,
                  workers: int) -> list[dict]:
    """trials.json records of a Tune ResultGrid (schema: :func:`gloss_ray.report.load_trials`), plus
    ``metric`` and ``best_metric`` (the trial's best epoch on the space's metric)."""
    from .spaces import decode_params

    def best(df, col, how):
        v = df[col].dropna() if df is not None and col in df else []
        return float(v.max() if how == "max" else v.min()) if len(v) else None

    records = []
    for r in results:
        df, m = r.metrics_dataframe, r.metrics or {}
        config = decode_params(r.config or {})
        last_epoch = int(df["epoch"].max()) if df is not None and "epoch" in df and len(df) else 0
        time_s = m.get("time_total_s", m.get("elapsed_s"))
        records.append({
            "trial_id": os.path.basename(str(r.path).rstrip("/")), "benchmark": benchmark, "loss": loss,
            "status": trial_status(r.error is not None, last_epoch, r.path, int(config.get("epochs", epochs))),
            "config": config, "best_val_macro_f1": best(df, "val_macro_f1", "max"), "iterations": last_epoch,
            "time_s": float(time_s) if time_s is not None else None, "device": device, "num_workers": workers,
            "error": _last_line(r.error) if r.error is not None else None,
            "metric": metric, "best_metric": best(df, metric, mode)})
    return sorted(records, key=lambda t: t["trial_id"])


def best_trial(records: list[dict], mode: str) -> dict | None:
    """The non-errored trial with the best ``best_metric``, or None."""
    ok = [t for t in records if t["status"] != "ERROR" and t.get("best_metric") is not None]
    return (max if mode == "max" else min)(ok, key=lambda t: t["best_metric"]) if ok else None


def _max_epochs(spec: dict, base_epochs: int) -> int:
    """ASHA's max_t: the most epochs a trial of this space runs."""
    from .spaces import Dist

    e = spec.get("epochs", base_epochs)
    if isinstance(e, Dist):
        return int(max(e.args) if e.kind == "choice" else e.args[1] - 1)
    return int(e)


def _wait_for_release(registry: str, freed_before: int, timeout_s: float = 60.0) -> None:
    """Wait until the trials' Train runs have given their resources back (the next search needs them)."""
    import ray

    reg = _registry(registry)
    if reg is None:
        return
    deadline = time.time() + timeout_s
    left, freed = ray.get(reg.status.remote())
    while left and time.time() < deadline:
        time.sleep(1.0)
        left, freed = ray.get(reg.status.remote())
    if freed > freed_before:
        log(f"freed the placement groups of {freed - freed_before} trial run(s) whose controller had died")
    if left:
        log(f"warning: {left} trial run(s) still hold their workers' resources")


def run_search(sweep_dir: str, benchmark: str, loss: str, base: dict, space, args, concurrency: int):
    """One benchmark x loss search: new, restored, or done before. Returns (records, best record)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from .spaces import Dist, to_tune

    label = f"{benchmark} x {loss}"
    exp_dir = join(sweep_dir, "search", f"{benchmark}__{loss}")
    trials_file = join(exp_dir, "trials.json")
    if exists(trials_file):
        records = read_json(trials_file)
        log(f"search {label}: done earlier ({len(records)} trials in {trials_file})")
        return records, best_trial(records, space.mode)

    spec = space.for_run(benchmark, loss)
    epochs = _max_epochs(spec, base["epochs"])
    registry = registry_name(sweep_dir)
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base, registry=registry, exp_dir=exp_dir),
                                    TRIAL_RESOURCES)
    searchable = any(isinstance(v, Dist) for v in spec.values())
    samples = args.samples if searchable else 1              # constants only: one trial
    if tune.Tuner.can_restore(exp_dir):
        log(f"search {label}: resuming the interrupted search in {exp_dir}")
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        log(f"search {label}: {samples} trial(s), up to {concurrency} at a time; ASHA on {space.metric} "
            f"({space.mode}), {epochs} epochs, grace {min(args.grace_epochs, epochs)}")
        optuna = OptunaSearch(metric=space.metric, mode=space.mode, seed=base["seed"]) if searchable else None
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune(spec),
            tune_config=tune.TuneConfig(
                search_alg=optuna,
                scheduler=ASHAScheduler(time_attr="epoch", metric=space.metric, mode=space.mode, max_t=epochs,
                                        grace_period=min(args.grace_epochs, epochs), reduction_factor=ASHA_REDUCTION),
                num_samples=samples, max_concurrent_trials=concurrency, reuse_actors=False,
                trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=f"{benchmark}__{loss}", storage_path=join(sweep_dir, "search"), verbose=0,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[_SearchCallback(label, samples, epochs, registry)]),
        )
    reg = _registry(registry)
    freed_before = ray.get(reg.status.remote())[1] if reg is not None else 0
    results = tuner.fit()      # a failed trial is an entry of the ResultGrid, not an exception
    _wait_for_release(registry, freed_before)
    ended = sum(exists(join(r.path, ENDED)) for r in results)
    if ended < max(len(results), samples):   # Tune returns normally after Ctrl-C; the state is saved
        log(f"search {label}: interrupted with {ended} of {samples} trials done")
        raise KeyboardInterrupt
    records = trial_records(results, benchmark, loss, epochs, space.metric, space.mode,
                            "gpu" if base["gpu"] else "cpu", base["workers"])
    write_json(trials_file, records)
    if not getattr(args, "keep_checkpoints", False):     # every trial has ended: nothing will resume them
        try:
            removed = sum(remove_checkpoints(join(r.path, "run")) for r in results if r.path)
            log(f"search {label}: removed {removed} trial checkpoint folder(s) (--keep-checkpoints keeps them)")
        except OSError as e:
            log(f"search {label}: could not remove trial checkpoints: {_last_line(e)}")
    n = {s: sum(t["status"] == s for t in records) for s in STATUSES}
    log(f"search {label}: {len(records)} trials ({n['TERMINATED']} finished, {n['STOPPED_EARLY']} stopped early, "
        f"{n['ERROR']} failed) -> {trials_file}")
    for t in records:
        if t["error"]:
            log(f"  trial {t['trial_id']} failed: {t['error']}")
    best = best_trial(records, space.mode)
    if best:
        log(f"search {label}: best trial {best['trial_id']}, {space.metric} {best['best_metric']:.4f}, "
            f"{best['config']}")
    return records, best


# --------------------------------------------------------------------------- final / bench runs
def run_many(jobs: list[tuple[str, TrainConfig]], concurrency: int, keep_checkpoints: bool = False) -> int:
    """Run ``(label, cfg)`` jobs with ``fit``, ``concurrency`` at a time; a job whose metrics.json
    exists is skipped, a failed one is reported and the others go on; a finished job's checkpoint
    folders are removed unless ``keep_checkpoints`` (its model/ and metrics stay). Returns the failures."""
    from .train.launch import fit

    todo, skipped, done, failed = [], 0, 0, 0
    for label, cfg in jobs:
        if exists(join(absolute(cfg.storage), cfg.name, "metrics.json")):
            skipped += 1
            log(f"{label}: skipped (metrics.json exists)")
        else:
            todo.append((label, cfg))
    if not todo:
        return 0
    pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(todo))))
    try:
        futures = {pool.submit(fit, cfg): (label, cfg) for label, cfg in todo}
        for fut in as_completed(futures):
            label, cfg = futures[fut]
            try:
                m = fut.result()
                done += 1
                if not keep_checkpoints:
                    try:
                        remove_checkpoints(join(absolute(cfg.storage), cfg.name))
                    except OSError as e:                      # the run itself succeeded
                        log(f"{label}: could not remove its checkpoints: {_last_line(e)}")
                log(f"{label}: test acc {m.get('test_accuracy', math.nan):.4f} "
                    f"macro-F1 {m.get('test_macro_f1', math.nan):.4f}")
            except Exception as e:
                failed += 1
                log(f"{label}: FAILED: {_last_line(e)}")
            log(f"runs: {done + skipped + failed}/{len(jobs)} done ({skipped} skipped, {failed} failed)")
    except KeyboardInterrupt:
        import ray

        log("interrupted: stopping the running runs (the same command resumes them from their checkpoints)")
        ray.shutdown()        # the runs' ray.get calls fail, so their threads end and the process can exit
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return failed


def default_concurrency(args, base: dict) -> int:
    """Runs at a time: ``--concurrency``, else as many as the cluster's GPUs (with --gpu) or CPUs hold
    (one when ``cpus_per_worker`` is automatic: a CPU run then takes the whole machine)."""
    import ray

    if getattr(args, "concurrency", None):
        return int(args.concurrency)
    res = ray.cluster_resources()
    if base["gpu"]:
        return max(1, int(res.get("GPU", 0) // base["workers"]))
    if base["cpus_per_worker"] is None:
        return 1
    return max(1, int(res.get("CPU", 1) // (base["workers"] * base["cpus_per_worker"])))


def fill_cpus(bases: dict, concurrency: int) -> None:
    """Automatic ``cpus_per_worker`` of CPU runs: the machine's CPUs shared by ``concurrency`` runs."""
    from .train.launch import auto_cpus_per_worker

    for base in bases.values():
        if base["cpus_per_worker"] is None and not base["gpu"]:
            base["cpus_per_worker"] = auto_cpus_per_worker(base["workers"], concurrency)


def _report(sweep_dir: str) -> None:
    from pathlib import Path

    from .report import build_report

    if "://" in sweep_dir:
        log(f"report: copy {sweep_dir} to a local folder and run: gloss-ray report FOLDER")
    elif next(Path(sweep_dir).glob("runs/**/metrics.json"), None) is None:
        log("report: no finished runs to report")
    else:
        paths = build_report(sweep_dir)
        log(f"report: {paths['report.md']} (also report.html, results.csv, results.json)")


def main(args) -> int:
    """``gloss-ray tune`` / ``gloss-ray bench`` (see the module docstring); returns the exit status."""
    from .spaces import load_space
    from .train.launch import init_ray

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
            raise ConfigError(f"{args.space}: metric: {space.metric!r} is not reported each epoch "
                              f"(one of {', '.join(REPORTED)})")
        for b, l in bases:
            if parse_loss_spec(l)[1:] != (False, None):
                raise ConfigError(f"--losses: {l!r}: +global and @FRACTION are for gloss-ray bench; in a "
                                  "search put global_k / label_fraction in --set or the space file")
            space.for_run(b, l)                     # unknown benchmark, or loss not in the space
    name = args.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = join(absolute(args.storage), name)
    log(f"{args.command} {', '.join(benchmarks)} x {', '.join(losses)} -> {sweep_dir}")
    log(f"to resume after an interruption, run the same command with --name {name} --storage {args.storage}")
    init_ray()
    concurrency = default_concurrency(args, next(iter(bases.values())))
    fill_cpus(bases, concurrency)
    registry = start_registry(sweep_dir) if space is not None else None  # noqa: F841 (lives while we run)

    stage = "final" if space is not None else "bench"
    jobs, missing = [], []
    for (b, l), base in bases.items():
        params, extra = {}, {}
        if space is not None:
            _, best = run_search(sweep_dir, b, l, base, space, args, concurrency)
            if best is None:
                log(f"final {b} x {l}: skipped (no successful trial)")
                missing.append(f"{b} x {l}")
                continue
            params, extra = best["config"], {"trial_id": best["trial_id"]}
        for k in range(args.seeds):
            cfg = _run_config(base, params, k, join(sweep_dir, "runs", b, l), f"seed{k}", stage, **extra)
            jobs.append((f"{stage} {b} x {l} seed {k}", cfg))
    log(f"{stage} runs: {len(jobs)} ({args.seeds} seed(s) x {len(bases) - len(missing)} benchmark x loss), "
        f"up to {concurrency} at a time")
    failed = run_many(jobs, concurrency, keep_checkpoints=getattr(args, "keep_checkpoints", False))
    _report(sweep_dir)
    if missing or failed:
        log(f"finished with problems: {failed} failed run(s); no result for {', '.join(missing) or '-'}")
        return 1
    return 0
