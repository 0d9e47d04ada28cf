"""Workaround: give back the resources of a Tune trial's Train run when Tune stops the trial.

Upstream behaviour (Ray 2.60, Train V2 + Tune; ray-project/ray#54305): a trial runs its own
``TorchTrainer``, whose controller actor is owned by the trial actor and creates the workers'
placement group. When Tune stops a trial (ASHA, ``max_t``, a stopper) it removes the trial actor
(``TuneController.stop_trial`` -> ``_schedule_graceful_trial_stop``); controller and workers die
with it, but the placement group is owned by the *job* (the sweep driver) and outlives them, so
its CPUs/GPUs stay reserved and starve the next trials. Ray 2.60's own remedy (ray-project/ray#58515,
``ray/train/v2/_internal/callbacks/placement_group_callback.py``) is a detached
``PlacementGroupCleaner`` that frees the group once it sees the controller dead -- through the
state API (``ray.util.state.get_actor``), which needs the dashboard: without it
(``include_dashboard=False``) the group is never freed, and with a second Ray instance on the
machine the cleaner's monitor thread dies (``ConnectionError``). Ray 2.60 has no supported hook
that aborts a Train run when its Tune trial stops.

So a sweep runs a :class:`RunRegistry` actor that knows each live trial's Train run: a Train
callback in the controller registers the run (:func:`register_run`), and a Tune callback on the
driver aborts it before Tune removes the trial actor (:class:`StopTrainRuns`); a watcher frees the
group of a run whose controller died otherwise. It relies on Train V2 internals
(``WorkerGroupCallback``, the worker group's placement group handle, ``TrainController.abort``),
hence :func:`check_ray_version`. tests/test_sweep.py: ``test_a_stopped_trial_leaves_no_placement_group``
fails when the workaround stops working, and
``test_without_the_workaround_a_stopped_trial_leaks_its_placement_group`` when Ray frees the group
itself -- then drop this module.
"""
from __future__ import annotations

import hashlib
import threading
import time
from contextlib import contextmanager

import ray

from ..errors import GlossRayError
from ..log import say
from .plan import last_line

TESTED_RAY = ((2, 60), (2, 60))     # (lowest, highest) Ray major.minor this workaround was tested with


def check_ray_version(version: str = ray.__version__) -> None:
    """Raise :class:`GlossRayError` when ``version`` is outside :data:`TESTED_RAY`."""
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        major_minor = None
    low, high = TESTED_RAY
    if major_minor is None or not low <= major_minor <= high:
        tested = "-".join(dict.fromkeys(f"{v[0]}.{v[1]}" for v in TESTED_RAY))      # "2.60" or "2.60-2.62"
        raise GlossRayError(
            f"gloss_ray.sweep.ray_cleanup works around Ray Train V2 + Tune leaving a stopped trial's placement "
            f"group behind and was tested with Ray {tested} only, not {version}: check that "
            "ray.train.v2._internal.execution.callback.WorkerGroupCallback and TrainController.abort still exist "
            "and whether Ray now frees the group itself (pytest tests/test_sweep.py -k placement_group), "
            "then update TESTED_RAY or drop the workaround")


check_ray_version()
from ray.train.v2._internal.execution.callback import WorkerGroupCallback  # noqa: E402 (after the check)
from ray.tune import Callback  # noqa: E402


class RunRegistry:
    """Ray actor (no CPU) holding each live trial's Train run: ``trial id -> (controller, placement
    group)``. :meth:`stop` aborts a run (workers, placement group and Train's cleaner go); a thread
    frees the group of a registered run whose controller is dead (``__ray_ready__`` fails)."""

    def __init__(self, interval_s: float = 1.0):
        self._runs: dict = {}
        self._lock = threading.Lock()
        self.counts = {"registered": 0, "stopped": 0, "freed": 0}
        threading.Thread(target=self._watch, args=(interval_s,), daemon=True).start()

    def register(self, trial_id: str, controller, pg) -> None:
        """Register a trial's run; a run registered before for the same trial (a PBT trial's
        earlier Train run, whose controller went with the trial actor) stays watched under
        another key until its group is freed."""
        with self._lock:
            if trial_id in self._runs and self._runs[trial_id][1] != pg:
                self._runs[f"{trial_id}#{self.counts['registered']}"] = self._runs[trial_id]
            self._runs[trial_id] = (controller, pg)
            self.counts["registered"] += 1

    def stop(self, trial_id: str, timeout_s: float = 60.0) -> None:
        """Abort the trial's Train run (a no-op once it has finished) and wait for it."""
        with self._lock:
            controller = self._runs.get(trial_id, (None, None))[0]
            self.counts["stopped"] += controller is not None
        if controller is not None:
            try:
                ray.get(controller.abort.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass                   # the controller exits once aborted; the watcher frees the rest

    def status(self) -> dict:
        """``live``: runs still holding their placement group; ``registered``, ``stopped`` (by
        :meth:`stop`) and ``freed`` (groups of dead controllers removed by the watcher): counts."""
        return {"live": len(self._runs), **self.counts}

    def _watch(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            try:
                self._free_dead()
            except Exception as e:  # keep watching
                say(f"run registry: {e}")

    def _free_dead(self) -> None:
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
                    with self._lock:
                        self.counts["freed"] += 1
            with self._lock:                           # the group is gone: forget the run
                self._runs.pop(key, None)


def registry_name(sweep_dir: str) -> str:
    """The sweep's :class:`RunRegistry` actor name (stable, so a restored search finds it)."""
    return "gloss-ray-runs-" + hashlib.sha1(sweep_dir.encode()).hexdigest()[:12]


@contextmanager
def run_registry(sweep_dir: str):
    """The sweep's :class:`RunRegistry`, alive inside the block; yields its name (trial actors and
    Tune callbacks look it up by name)."""
    name = registry_name(sweep_dir)
    handle = ray.remote(num_cpus=0, max_concurrency=8)(RunRegistry).options(name=name, get_if_exists=True).remote()
    try:
        yield name
    finally:
        del handle                     # the actor goes with its last handle


def find_registry(name: str):
    """The registry actor named ``name``, or None."""
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
        reg = find_registry(self.registry)
        if reg is not None:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            ray.get(reg.register.remote(self.trial_id, ray.get_runtime_context().current_actor, pg), timeout=30)


def register_run(registry: str, trial_id: str) -> WorkerGroupCallback:
    """The Train callback (``RunConfig(callbacks=...)``) that registers trial ``trial_id``'s run."""
    return _RegisterRun(registry, trial_id)


class StopTrainRuns(Callback):
    """Tune callback (driver): when Tune ends a trial, abort its Train run first -- Tune calls
    ``on_trial_complete`` before it removes the trial actor."""

    def __init__(self, registry: str):
        self.registry = registry

    def on_trial_complete(self, iteration, trials, trial, **info):
        reg = find_registry(self.registry)
        if reg is not None:
            try:
                ray.get(reg.stop.remote(trial.trial_id), timeout=90)
            except Exception as e:
                say(f"trial {trial.trial_id}: could not stop its Train run cleanly: {last_line(e)}")


def registry_status(registry: str) -> dict | None:
    """:meth:`RunRegistry.status` of the registry named ``registry``, or None when there is none."""
    reg = find_registry(registry)
    return ray.get(reg.status.remote()) if reg is not None else None


@contextmanager
def released(registry: str, timeout_s: float = 60.0):
    """Around ``Tuner.fit()``: afterwards wait until the trials' Train runs have given their
    resources back (the next search needs them), and say when some have not."""
    before = registry_status(registry)
    yield
    if before is None:
        return
    deadline = time.time() + timeout_s
    now = registry_status(registry)
    while now["live"] and time.time() < deadline:
        time.sleep(1.0)
        now = registry_status(registry)
    if now["freed"] > before["freed"]:
        say(f"freed the placement groups of {now['freed'] - before['freed']} trial run(s) whose controller had died")
    if now["live"]:
        say(f"warning: {now['live']} trial run(s) still hold their workers' resources")
