"""One benchmark x loss Ray Tune search (:func:`run_search`): a search algorithm samples the space
(Optuna by default), a scheduler acts per epoch on the space's ``metric``/``mode`` (ASHA by default:
it stops trials), and each trial is one Ray Train run. The choices: :mod:`gloss_ray.sweep.algorithms`;
the scheduler of a choice: :func:`trial_scheduler`.

Train V2 + Tune: a trial is a function (:func:`_trial`) that runs its own ``TorchTrainer`` through
:func:`gloss_ray.train.launch.fit` with Tune's ``TuneReportCallback``, which forwards each epoch's
row to Tune, so ASHA acts per epoch (``time_attr="epoch"``). The trial function reserves no CPU
(:data:`TRIAL_RESOURCES`); the Train workers reserve their own, and ``max_concurrent_trials``
bounds how many run at once. A stopped trial's Train run is aborted by
:mod:`gloss_ray.sweep.ray_cleanup` so that its resources come back.

The search lives in ``<sweep>/search/<benchmark>__<loss>/`` (restorable with ``Tuner.restore``);
its ``trials.json`` marks it done, its ``search.json`` names the search algorithm and scheduler.

PBT (``--scheduler pbt``) needs trials that Tune can checkpoint and restart from another trial's
checkpoint with a new configuration: :func:`_pbt_trial` reports each epoch to Tune itself, with a
copy of the Train run's checkpoint as the Tune checkpoint, and a trial restarted from one starts a
new Train run (``<trial>/run-<n>``) started from it -- which needs
``gloss_ray.train.launch.fit(start_checkpoint=...)`` (:func:`gloss_ray.sweep.algorithms.pbt_supported`)."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading

import pyarrow.fs as pafs
from ray.train import UserCallback
from ray.tune import Callback
from ray.tune import schedulers
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from ..log import say
from ..storage import exists, filesystem, join, read_json, remove_checkpoints, write_json
from . import algorithms
from .plan import last_line, run_config
from .ray_cleanup import StopTrainRuns, register_run, released
from .spaces import Dist, Space, decode_params
from .trials import best_trial

# The trial function only drives its Train run, whose workers reserve their own CPUs/GPUs. Tune
# needs a non-empty resource bundle, hence a 1-byte (logical) memory placeholder instead of CPU.
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}
STATUSES = ("TERMINATED", "STOPPED_EARLY", "ERROR")
ENDED = "trial_ended.json"   # written into a trial's folder when Tune ends it (not when interrupted)
# Trials not yet finished when Tune's last step of a fit ended (set by _SearchCallback in this, the driver, process;
# a module global, because a restored Tuner runs the callback instance pickled with it, not a new one). More than
# none means Tune stopped on Ctrl-C: its cleanup then marks the running trials TERMINATED too.
_LAST_STEP: dict[str, int] = {}


def search_seed(seed: int, benchmark: str, loss: str) -> int:
    """The search algorithm's seed of one search: stable across processes and machines (SHA-256, not
    Python's salted ``hash``) and different for each benchmark x loss, so searches differ."""
    digest = hashlib.sha256(f"{seed}/{benchmark}/{loss}".encode()).digest()
    return int.from_bytes(digest[:4], "big")          # numpy's RandomState takes < 2**32


# --------------------------------------------------------------------------- trials
def _trial(config: dict, base: dict, registry: str, exp_dir: str) -> None:
    """One Tune trial: a Train run of ``base`` + the sampled ``config`` (stage ``trial``, outputs in
    ``<exp_dir>/<trial_id>/run`` on the sweep's storage, so a restarted trial resumes from its
    checkpoint); ``TuneReportCallback`` passes each epoch's metrics on to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train.launch import fit

    trial_id = tune.get_context().get_trial_id()
    cfg = run_config(base, decode_params(config), base["seed"], join(exp_dir, trial_id), "run", "trial",
                     trial_id=trial_id)
    fit(cfg, callbacks=[TuneReportCallback(), register_run(registry, trial_id)])


class _ForwardReports(UserCallback):
    """Train callback (in the Train controller) of a PBT trial: hands each epoch's metrics and
    checkpoint to the trial function (:func:`_pbt_trial`), which reports them to Tune. The queue
    holds one item, so the run waits until the trial has taken the epoch (as Tune's
    ``TuneReportCallback`` does)."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put((dict(metrics[0]), checkpoint))


def _fit_from(cfg, checkpoint, callbacks: list) -> dict:
    """``fit`` of a PBT trial's run, started from ``checkpoint`` (None: from scratch, or its own
    checkpoints). Ray Train V2 refuses ``resume_from_checkpoint``, so ``fit`` must take the start
    checkpoint itself (``start_checkpoint``); :func:`gloss_ray.sweep.algorithms.pbt_supported`."""
    from ..train.launch import fit

    if checkpoint is None:
        return fit(cfg, callbacks=callbacks)
    return fit(cfg, callbacks=callbacks, start_checkpoint=checkpoint)


def run_folders(trial_path: str) -> list[str]:
    """A trial's Train run folders, oldest first: ``run``, then (PBT) ``run-1``, ``run-2``, ..."""
    fs, path = filesystem(trial_path)
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
             if i.type == pafs.FileType.Directory and re.fullmatch(r"run(-\d+)?", i.base_name)]
    return sorted(names, key=lambda n: int(n[4:] or 0) if n != "run" else -1)


def _pbt_trial(config: dict, base: dict, registry: str, exp_dir: str) -> None:
    """One PBT trial: a Train run as :func:`_trial`'s, whose epochs this function reports to Tune
    itself, each with a copy of the run's checkpoint as the Tune checkpoint (what PBT clones). A
    trial that Tune (re)starts from a checkpoint -- another trial's, with a mutated ``config``, or
    its own after an interruption -- runs a new Train run ``run-<n>`` resumed from it."""
    from ray import tune
    from ray.train import Checkpoint
    from ray.util.queue import Queue

    trial_id = tune.get_context().get_trial_id()
    trial_dir = join(exp_dir, trial_id)
    start = tune.get_checkpoint()
    name = "run" if start is None else f"run-{len(run_folders(trial_dir))}"
    cfg = run_config(base, decode_params(config), base["seed"], trial_dir, name, "trial", trial_id=trial_id)
    queue, outcome = Queue(maxsize=1, actor_options={"num_cpus": 0}), {}

    def run():
        try:
            _fit_from(cfg, start, [_ForwardReports(queue), register_run(registry, trial_id)])
        except BaseException as e:  # noqa: BLE001 - raised again in the trial's thread below
            outcome["error"] = e
        finally:
            queue.put(None)

    threading.Thread(target=run, name="gloss-ray-pbt-run", daemon=True).start()
    while (item := queue.get()) is not None:
        metrics, checkpoint = item
        if checkpoint is None:
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory(prefix="gloss_ray_pbt_") as tmp:
            checkpoint.to_directory(tmp)
            tune.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    if "error" in outcome:
        raise outcome["error"]


class SynchronousPBT(PopulationBasedTraining):
    """Ray Tune's synchronous ``PopulationBasedTraining`` with two fixes for trials that end:

    * a trial's last epoch (its ``epochs``, else ``last_epoch``) is never a perturbation point: a
      trial exploited there would restart from the donor's final checkpoint with a configuration it
      never trains with, and Tune would give it the donor's last result (its record would carry the
      donor's metrics and a config that produced none of its own);
    * when a trial ends (finished, stopped early by its own patience or --max-steps, failed, removed)
      while every other live trial waits, paused, at the synchronisation point, the perturbation
      round runs then: Ray 2.60 runs it on a trial's result only, so those trials would wait forever
      (no trial left to report; ``choose_trial_to_run`` picks none of them).

    ``pbt_global.txt`` (Ray's log of each exploit: target tag, donor tag, their
    ``training_iteration``, the donor's config, the new config) names the trials by their original
    experiment tags and takes the iterations from ``trial.last_result``, which Tune updates only
    after the scheduler has seen the result: the trial whose result completed the round shows its
    previous iteration (0 at the first round), not the epoch it was perturbed at."""

    def __init__(self, *args, last_epoch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_epoch = int(last_epoch)

    def on_trial_result(self, tune_controller, trial, result):
        last = int(trial.config.get("epochs", self._last_epoch))
        if result.get(self._time_attr, -1) >= last:
            return TrialScheduler.CONTINUE      # the trial ends with this epoch: nothing to perturb
        return super().on_trial_result(tune_controller, trial, result)

    def _ended(self, tune_controller, trial) -> None:
        state = self._trial_state.get(trial)
        if not self._synch or state is None:
            return
        # Tune calls this while the trial still counts as live: take it out of the round and of
        # the synchronisation (it can neither clone nor be cloned any more).
        state.last_score, state.last_train_time = None, max(state.last_train_time, self._next_perturbation_sync)
        others = [t for t in tune_controller.get_live_trials() if t is not trial]
        waiting = [t for t in others if t.status == t.PAUSED and self._trial_state[t].last_result is not None
                   and self._trial_state[t].last_train_time >= self._next_perturbation_sync]
        if waiting and len(waiting) == len(others):
            first = waiting[0]        # the round Ray runs on the result that completes a synchronisation
            super().on_trial_result(tune_controller, first, self._trial_state[first].last_result)

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._ended(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        super().on_trial_error(tune_controller, trial)
        if not trial.should_recover():              # else Tune retries it (--max-failures)
            self._ended(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial):
        super().on_trial_remove(tune_controller, trial)
        self._ended(tune_controller, trial)


def trial_scheduler(sched: str, metric: str, mode: str, *, max_epochs: int, grace_epochs: int, spec: dict):
    """The Tune trial scheduler of ``--scheduler`` ``sched`` (:mod:`gloss_ray.sweep.algorithms`);
    ``time_attr`` is the epoch (every scheduler acts per epoch)."""
    if sched == "fifo":
        return schedulers.FIFOScheduler()
    if sched == "bohb":
        return schedulers.HyperBandForBOHB(time_attr="epoch", metric=metric, mode=mode, max_t=max_epochs,
                                           reduction_factor=algorithms.ASHA_REDUCTION)
    if sched == "pbt":
        mutations, explore = algorithms.pbt_mutations(spec)
        return SynchronousPBT(
            time_attr="epoch", metric=metric, mode=mode, perturbation_interval=grace_epochs,
            hyperparam_mutations=mutations, custom_explore_fn=explore, synch=True, last_epoch=max_epochs)
    return schedulers.ASHAScheduler(time_attr="epoch", metric=metric, mode=mode, max_t=max_epochs,
                                    grace_period=min(grace_epochs, max_epochs),
                                    reduction_factor=algorithms.ASHA_REDUCTION)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def trial_status(errored: bool, last_epoch: int, trial_path: str, epochs: int) -> str:
    """ERROR, STOPPED_EARLY or TERMINATED. Stopped early: Tune saw fewer epochs than the run has --
    ``epochs``, or fewer when the run's own patience ended it (``epochs_run`` in its metrics.json)."""
    if errored:
        return "ERROR"
    runs = run_folders(trial_path) if trial_path else []
    metrics = join(trial_path, runs[-1] if runs else "run", "metrics.json")
    try:
        epochs = int(read_json(metrics).get("epochs_run", epochs)) if exists(metrics) else epochs
    except (OSError, ValueError):
        pass
    return "STOPPED_EARLY" if last_epoch < epochs else "TERMINATED"


class _SearchCallback(Callback):
    """Driver side of a search. When Tune ends a trial: mark it ended (:data:`ENDED`; a Ctrl-C
    leaves the running ones unmarked) and print ``search mr x gloss: 3/4 trials done (1 stopped
    early, 0 failed)``, counted over all trials (so a restored search includes the earlier ones)."""

    def __init__(self, label: str, total: int, epochs: int):
        self.label, self.total, self.epochs = label, total, epochs

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
        say(f"search {self.label}: {sum(n.values())}/{self.total} trials done "
            f"({n['STOPPED_EARLY']} stopped early, {n['ERROR']} failed)")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trials, trial, False)

    def on_step_end(self, iteration, trials, **info):
        _LAST_STEP["unfinished"] = sum(not t.is_finished() for t in trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trials, trial, True)


# --------------------------------------------------------------------------- results
def trial_records(results, benchmark: str, loss: str, epochs: int, metric: str, mode: str, device: str,
                  workers: int, method: dict | None = None) -> list[dict]:
    """trials.json records of a Tune ResultGrid (schema: :func:`gloss_ray.report.collect.load_trials`),
    plus the search's objective: ``metric``, ``mode`` and ``best_metric`` (the trial's best epoch on the
    space's metric), from which :func:`gloss_ray.sweep.trials.best_trial` picks the best trial, and
    the search's ``search_alg`` and ``scheduler`` (``method``: its search.json)."""
    method = method or {}
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
            "error": last_line(r.error) if r.error is not None else None,
            "metric": metric, "mode": mode, "best_metric": best(df, metric, mode),
            "search_alg": method.get("search_alg"), "scheduler": method.get("scheduler")})
    return sorted(records, key=lambda t: t["trial_id"])


def _max_epochs(spec: dict, base_epochs: int) -> int:
    """ASHA's (and HyperBand's) max_t: the most epochs a trial of this space runs."""
    e = spec.get("epochs", base_epochs)
    if isinstance(e, Dist):
        return int(max(e.args) if e.kind == "choice" else e.args[1] - 1)
    return int(e)


def _summary(label: str, records: list[dict], trials_file: str, space: Space) -> dict | None:
    """Print the search's outcome; returns its best trial."""
    n = {s: sum(t["status"] == s for t in records) for s in STATUSES}
    say(f"search {label}: {len(records)} trials ({n['TERMINATED']} finished, {n['STOPPED_EARLY']} stopped early, "
        f"{n['ERROR']} failed) -> {trials_file}")
    for t in records:
        if t["error"]:
            say(f"  trial {t['trial_id']} failed: {t['error']}")
    best = best_trial(records)
    if best:
        say(f"search {label}: best trial {best['trial_id']}, {space.metric} {best['best_metric']:.4f}, "
            f"{best['config']}")
    return best


def _remove_trial_checkpoints(label: str, results) -> None:
    """Every trial has ended: nothing will resume them (models stay with the final runs). Train's
    checkpoints of every run folder, and the Tune checkpoints of PBT trials."""
    try:
        removed = sum(remove_checkpoints(join(r.path, run)) for r in results if r.path
                      for run in run_folders(r.path))
        removed += sum(remove_checkpoints(r.path) for r in results if r.path)
        say(f"search {label}: removed {removed} trial checkpoint folder(s) (--keep-checkpoints keeps them)")
    except OSError as e:
        say(f"search {label}: could not remove trial checkpoints: {last_line(e)}")


# --------------------------------------------------------------------------- the search
def _tuner(search_dir: str, name: str, label: str, trainable, spec: dict, space: Space, *, seed: int | None,
           samples: int, trials: int, epochs: int, grace_epochs: int, concurrency: int, callbacks: list,
           search_alg: str, scheduler: str):
    """A new Tuner for the search ``<search_dir>/<name>`` (``search_alg`` seeded with ``seed``, none
    when ``seed`` is None: a space of constants; ``scheduler``), or the interrupted one restored from
    there (with the searcher and scheduler it was started with)."""
    from ray import tune

    exp_dir = join(search_dir, name)
    if tune.Tuner.can_restore(exp_dir):
        say(f"search {label}: resuming the interrupted search in {exp_dir}")
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=False, restart_errored=False)
    how = {"asha": f"ASHA on {space.metric} ({space.mode}), {epochs} epochs, grace {min(grace_epochs, epochs)}",
           "fifo": f"FIFO on {space.metric} ({space.mode}), {epochs} epochs, no early stopping",
           "pbt": f"PBT on {space.metric} ({space.mode}), perturbing every {grace_epochs} epoch(s)",
           "bohb": f"BOHB's HyperBand on {space.metric} ({space.mode}), {epochs} epochs"}[scheduler]
    say(f"search {label}: {trials} trial(s), up to {concurrency} at a time; "
        f"{search_alg if seed is not None else 'constants only'}; {how}")
    checkpoints = (tune.CheckpointConfig(num_to_keep=algorithms.PBT_CHECKPOINTS_KEPT) if scheduler == "pbt"
                   else None)
    return tune.Tuner(
        trainable,
        param_space=algorithms.param_space(search_alg, spec),
        tune_config=tune.TuneConfig(
            search_alg=algorithms.searcher(search_alg, space.metric, space.mode, seed),
            scheduler=trial_scheduler(scheduler, space.metric, space.mode, max_epochs=epochs,
                                      grace_epochs=grace_epochs, spec=spec),
            num_samples=samples, max_concurrent_trials=concurrency, reuse_actors=False,
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=name, storage_path=search_dir, verbose=0, checkpoint_config=checkpoints,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False), callbacks=callbacks),
    )


def run_search(sweep_dir: str, benchmark: str, loss: str, base: dict, space: Space, *, registry: str,
               samples: int, grace_epochs: int, concurrency: int, keep_checkpoints: bool = False,
               search_alg: str = algorithms.DEFAULT_SEARCH_ALG, scheduler: str = algorithms.DEFAULT_SCHEDULER):
    """One benchmark x loss search: new, restored, or done before (its trials.json exists).
    ``registry``: the sweep's :func:`gloss_ray.sweep.ray_cleanup.run_registry`; ``search_alg`` and
    ``scheduler``: checked by :func:`gloss_ray.sweep.algorithms.resolve` (a restored search must
    have been started with them). Returns (records, best record or None); raises KeyboardInterrupt
    when Ctrl-C stopped it (its state is saved)."""
    from ray import tune

    label, search_dir, name = f"{benchmark} x {loss}", join(sweep_dir, "search"), f"{benchmark}__{loss}"
    exp_dir = join(search_dir, name)
    trials_file = join(exp_dir, "trials.json")
    if exists(trials_file):
        records = read_json(trials_file)
        say(f"search {label}: done earlier ({len(records)} trials in {trials_file})")
        return records, best_trial(records)

    spec = space.for_run(benchmark, loss)
    epochs = _max_epochs(spec, base["epochs"])
    searchable = any(isinstance(v, Dist) for v in spec.values())
    algorithms.check_space(search_alg, scheduler, spec, f"{space.path} for {label}")
    algorithms.check_resume(exp_dir, search_alg, scheduler)
    if search_alg == "grid" and searchable:
        samples, trials = 1, algorithms.grid_size(spec)     # every combination once
    else:
        samples = trials = samples if searchable else 1     # constants only: one trial
    meta_file = join(exp_dir, algorithms.META)
    method = read_json(meta_file) if exists(meta_file) else None
    if method is None:
        method = algorithms.write_meta(exp_dir, search_alg, scheduler,
                                       search_alg if searchable else algorithms.NO_SEARCH, space.metric, space.mode)
    trial_fn = _pbt_trial if scheduler == "pbt" else _trial
    trainable = tune.with_resources(tune.with_parameters(trial_fn, base=base, registry=registry, exp_dir=exp_dir),
                                    TRIAL_RESOURCES)
    tuner = _tuner(search_dir, name, label, trainable, spec, space,
                   seed=search_seed(base["seed"], benchmark, loss) if searchable else None, samples=samples,
                   trials=trials, epochs=epochs, grace_epochs=grace_epochs, concurrency=concurrency,
                   callbacks=[StopTrainRuns(registry), _SearchCallback(label, trials, epochs)],
                   search_alg=search_alg, scheduler=scheduler)
    _LAST_STEP.clear()
    with released(registry):
        results = tuner.fit()      # a failed trial is an entry of the ResultGrid, not an exception
    # Tune returns normally after Ctrl-C (its state saved). Whether every trial had ended comes from Tune's last
    # step, not from the ENDED markers: a restored search whose earlier trials lost theirs (a copy of the folder
    # without them) ends at once, with no step, and is complete.
    unfinished = _LAST_STEP.get("unfinished", 0) + max(0, trials - len(results))
    if unfinished:
        say(f"search {label}: interrupted with {trials - unfinished} of {trials} trials done")
        raise KeyboardInterrupt
    records = trial_records(results, benchmark, loss, epochs, space.metric, space.mode,
                            "gpu" if base["gpu"] else "cpu", base["workers"], method)
    write_json(trials_file, records)
    if not keep_checkpoints:
        _remove_trial_checkpoints(label, results)
    return records, _summary(label, records, trials_file, space)
