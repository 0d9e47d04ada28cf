"""The Ray layer: launch ``gloss_ray.train.loop.train`` on a Ray Train ``TorchTrainer`` (DDP over N workers).

Re-running with the same ``--storage`` and ``--name`` resumes from the run's latest checkpoint.
"""
from __future__ import annotations

import os

from ..config import TrainConfig
from ..errors import ConfigError, GlossRayError
from ..log import say
from ..storage import exists, join, ray_storage, read_json
from . import tracking

GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"     # ray.init starts a new instance's GCS on this port


def init_ray(**kwargs) -> None:
    """Connect to the cluster the user named (``RAY_ADDRESS``, ``ray job submit``) or started with
    ``ray start`` on this machine -- as ``ray.init()`` does; else start a local Ray instance of this
    command's own, as ``ray.init()`` does too.

    Such private instances of several commands (two ``gloss-ray train``, a test session) coexist on
    one machine: each one's workers get its address in ``RAY_ADDRESS``, so Ray's own lookups inside
    them (Train's placement-group cleaner queries the state API) find their instance instead of
    failing with "Found multiple active Ray instances"."""
    import logging

    import ray

    if not ray.is_initialized():
        private = kwargs.get("address") is None and _starts_a_local_instance()
        if private:
            kwargs = _private_instance(kwargs)
        # A new local instance logs that token authentication is on by default and how to opt out
        # (plus, once, where it saved the token): the default is the safe one and needs no action
        # from the user, so that logger is quiet while Ray starts. Ray's other messages are kept.
        auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = auth.level
        auth.setLevel(logging.ERROR)
        try:
            ray.init(**kwargs)
        finally:
            auth.setLevel(level)
            if private:
                os.environ.pop(GCS_PORT_VARIABLE, None)


def _starts_a_local_instance() -> bool:
    """Whether ``ray.init()`` without an address would start a new local instance: no
    ``RAY_ADDRESS`` and no cluster started with ``ray start`` on this machine."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(None) is None


def _private_instance(kwargs: dict) -> dict:
    """``ray.init`` options of a private local instance: its GCS on a free port
    (``RAY_GCS_SERVER_PORT``, set here until ``ray.init`` returns), that address in its workers'
    ``RAY_ADDRESS``."""
    import socket

    import ray.util

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ[GCS_PORT_VARIABLE] = str(port)
    runtime_env = dict(kwargs.get("runtime_env") or {})
    address = f"{kwargs.get('_node_ip_address') or ray.util.get_node_ip_address()}:{port}"
    runtime_env["env_vars"] = {"RAY_ADDRESS": address, **runtime_env.get("env_vars", {})}
    return {**kwargs, "runtime_env": runtime_env}


def preflight(cfg: TrainConfig) -> None:
    """Check the data and model on the driver, so bad input fails in one line before Ray starts."""
    from ..data import load_corpus
    from ..model import check_model

    check_model(cfg.model)
    load_corpus(cfg.benchmark, data_dir=cfg.data_dir, train_file=cfg.train_file, validation_file=cfg.validation_file,
                test_file=cfg.test_file, text_column=cfg.text_column, label_column=cfg.label_column,
                hf_dataset=cfg.hf_dataset, max_samples={"train": 2, "validation": 2, "test": 2})


def auto_cpus_per_worker(workers: int, runs_at_once: int = 1, reserve: float = 0) -> float:
    """CPUs for each Train worker of a CPU run: the CPUs of the largest node (all the cluster's on
    one machine), shared by the run's workers and by the runs that go at once; at least 1. With
    ``reserve`` (the Ray Data path), that many CPUs stay free for Ray Data's tasks, and a worker's
    share may be a fraction."""
    import ray

    per_node = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    cpus = min(max(per_node, default=1), ray.cluster_resources().get("CPU", 1) / max(1, runs_at_once))
    if reserve:
        return max(0.25, (cpus - reserve) / workers)
    return float(max(1, int(cpus // workers)))


def data_loader(cfg: TrainConfig) -> str:
    """``memory`` or ``ray-data``: ``--data-loader`` as given, or for ``auto`` ray-data when the
    training split has ``--ray-data-min-docs`` documents or more and no option rules it out."""
    from . import streaming

    why = streaming.unsupported(cfg)
    if cfg.data_loader == "ray-data" and why:
        raise ConfigError(why)
    if cfg.data_loader != "auto":
        return cfg.data_loader
    if why or not exists(streaming.sources(cfg)[1]["train"]):   # a missing file: the in-memory checks name it
        return "memory"
    return "ray-data" if streaming.count_train_rows(cfg) >= cfg.ray_data_min_docs else "memory"


START_CHECKPOINT = "_start_checkpoint"   # the train_loop_config key of fit's start_checkpoint (not a TrainConfig field)
STREAM = "_stream"                       # ... and of the Ray Data path's StreamPlan


def _worker(config: dict) -> None:
    import torch

    from .loop import train
    from .session import RaySession

    from .streaming import StreamPlan

    start_checkpoint, stream = config.get(START_CHECKPOINT), config.get(STREAM)
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k not in (START_CHECKPOINT, STREAM)})
    # PyTorch's intra-op threads = the CPUs this worker reserved, rounded (Ray's OMP_NUM_THREADS
    # default is the reservation rounded down, 1 for fractions; set it explicitly either way).
    torch.set_num_threads(max(1, round(cfg.cpus_per_worker or 1)))
    train(cfg, RaySession(join(cfg.storage, cfg.name), start_checkpoint, StreamPlan(**stream) if stream else None))


def fit(cfg: TrainConfig, callbacks: list | None = None, start_checkpoint=None) -> dict:
    """Run (or resume) one fine-tuning job on Ray Train; returns the run's ``metrics.json``.
    ``cfg`` is not changed: paths are resolved, the benchmark's data folder found (never downloaded:
    :func:`gloss_ray.cli.fetch_data` does that), the name and CPUs chosen, on a copy.

    ``callbacks`` go to ``RunConfig(callbacks=...)`` (e.g. Ray Tune's ``TuneReportCallback`` when a
    Tune trial launches this trainer, so per-epoch metrics reach the scheduler).
    ``start_checkpoint`` (a ``ray.train.Checkpoint`` of a gloss-ray run): a new run starts from it
    -- epoch, weights, optimizer, schedule and history -- with ``cfg``'s settings (a PBT trial
    continuing another trial's checkpoint); the run's own checkpoints take over once it has one."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .checkpoint import fail_once_env

    from ..data import find_benchmark

    cfg = cfg.resolved()             # paths as the user meant them: workers run in other folders
    if cfg.benchmark:                # the data folder found here is pinned: workers may not share the driver's env
        cfg.data_dir = str(find_benchmark(cfg.benchmark, cfg.data_dir))
    cfg.data_loader = data_loader(cfg)
    stream = datasets = None
    if cfg.data_loader == "ray-data":    # read, checked and tokenised by Ray Data (gloss_ray.train.streaming)
        from ..model import check_model
        from . import streaming

        check_model(cfg.model)
        init_ray()
        stream, datasets = streaming.plan(cfg)
    else:
        preflight(cfg)               # bad input fails in one line before Ray starts
        init_ray()
    cfg.name = cfg.run_name
    tracking.prepare(cfg)            # --report-to: packages, defaults, the MLflow experiment, git commit
    root = cfg.storage
    run_dir = join(root, cfg.name)
    if cfg.cpus_per_worker is None:
        cfg.cpus_per_worker = 1.0 if cfg.gpu else auto_cpus_per_worker(cfg.workers, reserve=streaming.FREE_CPUS if stream else 0)
    if stream:
        streaming.check_resources(cfg)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpu else {})}
    storage_path, storage_fs = ray_storage(root)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={**cfg.to_dict(), **({START_CHECKPOINT: start_checkpoint} if start_checkpoint else {}),
                           **({STREAM: stream.to_dict()} if stream else {})},
        **({"datasets": datasets, "dataset_config": streaming.data_config()} if stream else {}),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Train's own per-step INFO lines (resources, process group, "Reporting training result
            # ...") stay in its log files; the console gets its warnings and gloss-ray's lines.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": fail_env} if (fail_env := fail_once_env()) else None,
        ),
    )
    say(f"run {cfg.name}: {cfg.workers} worker(s){' on GPU' if cfg.gpu else ''} x {cfg.cpus_per_worker:g} CPU, "
        f"outputs -> {run_dir}")
    if cfg.stage is None:      # a sweep's runs resume with the sweep's command, which says so itself
        say(f"to resume after an interruption, run the same command with --name {cfg.name}")
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
