"""The Ray layer: launch ``train_loop.train`` on a Ray Train ``TorchTrainer`` (DDP over N workers).

Re-running with the same ``--storage`` and ``--name`` resumes from the run's latest checkpoint.
"""
from __future__ import annotations

import os

from .config import TrainConfig
from .errors import GlossRayError
from .storage import exists, join, read_json


def init_ray(**kwargs) -> None:
    """Connect to the running cluster (``RAY_ADDRESS``, ``ray job submit``, ``ray start``) or start a
    local Ray instance when there is none."""
    import ray

    if not ray.is_initialized():
        ray.init(**kwargs)


def storage_root(storage: str) -> str:
    return storage if "://" in storage else os.path.abspath(os.path.expanduser(storage))


def preflight(cfg: TrainConfig) -> None:
    """Check the data and model on the driver, so bad input fails in one line before Ray starts."""
    from .data import load_corpus
    from .model import resolve_model_path

    resolve_model_path(cfg.model)
    load_corpus(cfg.benchmark, data_dir=cfg.data_dir, train_file=cfg.train_file, validation_file=cfg.validation_file,
                test_file=cfg.test_file, text_column=cfg.text_column, label_column=cfg.label_column,
                hf_dataset=cfg.hf_dataset, max_samples={"train": 2, "validation": 2, "test": 2})


def _worker(config: dict) -> None:
    from .train_loop import RaySession, train

    cfg = TrainConfig.from_dict(config)
    train(cfg, RaySession(join(storage_root(cfg.storage), cfg.name)))


def fit(cfg: TrainConfig, callbacks: list | None = None) -> dict:
    """Run (or resume) one fine-tuning job on Ray Train; returns the run's ``metrics.json``.

    ``callbacks`` go to ``RunConfig(callbacks=...)`` (e.g. Ray Tune's ``TuneReportCallback`` when a
    Tune trial launches this trainer, so per-epoch metrics reach the scheduler)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    preflight(cfg)
    cfg.name = cfg.run_name
    root = storage_root(cfg.storage)
    run_dir = join(root, cfg.name)
    data_dir = cfg.data_dir
    if data_dir is None and cfg.benchmark:
        from .data import resolve_data_dir

        data_dir = str(resolve_data_dir(None))  # pin it: workers may not share the driver's env
    cfg.data_dir = data_dir
    init_ray()
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=root,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    msg = f"[gloss-ray] run {cfg.name}: {cfg.workers} worker(s){' on GPU' if cfg.gpu else ''}, outputs -> {run_dir}"
    if not cfg.extra.get("stage"):      # a sweep's runs resume with the sweep's command, which says so itself
        msg += f"\n[gloss-ray] to resume after an interruption, run the same command with --name {cfg.name} --storage {cfg.storage}"
    print(msg, flush=True)
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface a bad-input error as one line
        cause = _root_cause(e)
        if isinstance(cause, GlossRayError):
            raise cause from None
        raise
    metrics_file = join(run_dir, "metrics.json")
    if not exists(metrics_file):
        raise GlossRayError(f"training finished but {metrics_file} was not written")
    return read_json(metrics_file)


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = getattr(e, "cause", None) or e.__cause__
        errors = getattr(e, "worker_failures", None)
        if nxt is None and isinstance(errors, dict) and errors:
            nxt = next(iter(errors.values()))
        if nxt is None:
            return e
        e = nxt
    return e
