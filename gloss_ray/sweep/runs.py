"""A sweep's final / bench runs: :func:`run_many` runs ``(label, TrainConfig)`` jobs with
:func:`gloss_ray.train.launch.fit`, several at a time (:func:`default_concurrency`), CPU runs
sharing the machine's CPUs (:func:`fill_cpus`)."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor, as_completed

from ..config import TrainConfig
from ..storage import absolute, exists, join, remove_checkpoints
from ..log import say
from .plan import last_line


def _run_dir(cfg: TrainConfig) -> str:
    return join(absolute(cfg.storage), cfg.name)


def _finished(label: str, cfg: TrainConfig, metrics: dict, keep_checkpoints: bool) -> None:
    """A run succeeded: drop its checkpoint folders (its model/ and metrics stay) and say how it did."""
    if not keep_checkpoints:
        try:
            remove_checkpoints(_run_dir(cfg))
        except OSError as e:                      # the run itself succeeded
            say(f"{label}: could not remove its checkpoints: {last_line(e)}")
    say(f"{label}: test acc {metrics.get('test_accuracy', math.nan):.4f} "
        f"macro-F1 {metrics.get('test_macro_f1', math.nan):.4f}")


def run_many(jobs: list[tuple[str, TrainConfig]], concurrency: int, keep_checkpoints: bool = False) -> int:
    """Run ``(label, cfg)`` jobs with ``fit``, ``concurrency`` at a time; a job whose metrics.json
    exists is skipped, a failed one is reported and the others go on; a finished job's checkpoint
    folders are removed unless ``keep_checkpoints`` (its model/ and metrics stay). Returns the failures."""
    from ..train.launch import fit

    todo, skipped, done, failed = [], 0, 0, 0
    for label, cfg in jobs:
        if exists(join(_run_dir(cfg), "metrics.json")):
            skipped += 1
            say(f"{label}: skipped (metrics.json exists)")
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
                _finished(label, cfg, fut.result(), keep_checkpoints)
                done += 1
            except Exception as e:
                failed += 1
                say(f"{label}: FAILED: {last_line(e)}")
            say(f"runs: {done + skipped + failed}/{len(jobs)} done ({skipped} skipped, {failed} failed)")
    except KeyboardInterrupt:
        import ray

        say("interrupted: stopping the running runs (the same command resumes them from their checkpoints)")
        pool.shutdown(wait=False, cancel_futures=True)   # first: a thread freed by the shutdown below would
        ray.shutdown()        # start the next queued run. The runs' ray.get calls fail, their threads end
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return failed


def default_concurrency(requested: int | None, base: dict) -> int:
    """Runs at a time: ``requested`` (``--concurrency``), else as many as the cluster's GPUs (with
    --gpu, ``gpus_per_worker`` each) or CPUs hold (one when ``cpus_per_worker`` is automatic: a CPU run then takes the whole
    machine)."""
    import ray

    if requested:
        return int(requested)
    res = ray.cluster_resources()
    if base["gpu"]:
        return max(1, int(res.get("GPU", 0) // (base["workers"] * base.get("gpus_per_worker", 1.0))))
    if base["cpus_per_worker"] is None:
        return 1
    return max(1, int(res.get("CPU", 1) // (base["workers"] * base["cpus_per_worker"])))


def fill_cpus(bases: dict, concurrency: int) -> None:
    """Automatic ``cpus_per_worker`` of CPU runs: the machine's CPUs shared by ``concurrency`` runs."""
    from ..train.launch import auto_cpus_per_worker

    for base in bases.values():
        if base["cpus_per_worker"] is None and not base["gpu"]:
            base["cpus_per_worker"] = auto_cpus_per_worker(base["workers"], concurrency)
