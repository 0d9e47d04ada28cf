"""Experiment tracking of a run (``--report-to mlflow,tensorboard,wandb``), through Ray's integrations:
:func:`ray.air.integrations.mlflow.setup_mlflow` and :func:`ray.air.integrations.wandb.setup_wandb` in
the Train worker of rank 0, and tensorboardX's ``SummaryWriter`` (what Tune's ``TBXLoggerCallback``
writes with; Ray Train has no TensorBoard logger of its own).

On the driver, before Ray starts, :func:`prepare` checks that the trackers' packages are installed,
fills the defaults (MLflow's store ``sqlite:///<storage>/mlflow.db`` with artifacts in
``<storage>/mlartifacts``, the experiment ``gloss-ray``; a sweep's base configurations get the sweep's
storage and name from :func:`fill_defaults`), creates the MLflow experiment once (so that the
trials of a sweep, starting at once, do not race to create it), and records the git commit.

In the worker, :func:`start` returns the run's :class:`Trackers` (none on the other ranks). A run logs:

* parameters: every option of its configuration (credentials in URIs redacted);
* tags: ``benchmark``, ``loss``, ``seed``, ``git_commit`` (also MLflow's ``mlflow.source.git.commit``),
  ``stage`` (train, trial, final, bench), ``trial_id`` in a sweep, and ``gloss_ray.run_key``;
* metrics: a per-step row every ``log_every`` steps under ``step/<name>``, every epoch's history row under
  its own names (``val_macro_f1``, ``train_loss``, ...), the final scores (``test_accuracy``, ...); the
  step of each is the number of optimiser steps done;
* artifacts: the run's report files (metrics.json, history.csv, steps.csv, plots/) and, with
  ``log_model``, the model folder under ``model/``.

One MLflow run per Train run, found again by its ``gloss_ray.run_key`` tag (the run's folder; in a sweep,
the trial id): a resumed run, or a PBT trial's next Train run, goes on logging into the same MLflow run
(its parameters as first logged). Steps between the last checkpoint and an interruption are logged
again after the resume, with the same values when the run is deterministic. TensorBoard purges them
(``purge_step``). A sweep's trials each log their own MLflow run under the sweep's experiment: the
per-step metrics live in the trial's Train worker, which Tune's driver-side ``MLflowLoggerCallback`` never
sees, so that callback (one more run per trial, with the epoch rows only) is not used.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import subprocess
from pathlib import Path

from ..config import OPTIONS
from ..errors import ConfigError
from ..storage import absolute, is_uri, join, redact

DEFAULT_EXPERIMENT = "gloss-ray"
RUN_KEY = "gloss_ray.run_key"
PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboardX", "wandb": "wandb"}
INSTALL = "pip install -e '.[track]'"


# --------------------------------------------------------------------------------------------- driver side
def default_tracking_uri(storage: str) -> str:
    """MLflow's local store beside the runs of ``storage``: ``sqlite:///<storage>/mlflow.db``."""
    return f"sqlite:///{absolute(storage)}/mlflow.db"


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment of a local sqlite store keeps its artifacts: ``mlartifacts`` beside the
    database (MLflow's own default is relative to the current folder). None for a server, which has its own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):]).parent.joinpath("mlartifacts").as_uri()


def fill_defaults(d: dict, storage: str, experiment: str) -> dict:
    """A configuration dict (a sweep's base) with the tracking defaults of ``storage`` and
    ``experiment`` where it gives none; checks that the default store can be local."""
    trackers = _trackers(d.get("report_to"))
    if trackers and d.get("experiment") is None:
        d["experiment"] = experiment
    if "mlflow" in trackers and d.get("tracking_uri") is None:
        if is_uri(storage):
            raise ConfigError(f"--report-to mlflow: --storage {redact(storage)} is not a local folder, so MLflow's "
                              "local store cannot live beside the runs; give --tracking-uri (an MLflow server)")
        d["tracking_uri"] = default_tracking_uri(storage)
    return d


def _trackers(value) -> tuple[str, ...]:
    from ..options import report_to

    return report_to(value)


def git_commit() -> str:
    """The commit of the gloss-ray source that runs (``-dirty`` with uncommitted changes), or a note
    saying that it is not a git checkout."""
    here = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=30)
            return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown (not a git checkout)"


def prepare(cfg) -> None:
    """On the driver, before Ray starts (``cfg`` resolved, changed in place): trackers installed,
    defaults filled, tensorboard's folder local, the MLflow experiment created, the git commit in
    ``cfg.git_commit``. A problem is a :class:`ConfigError` naming the option."""
    trackers = cfg.trackers
    if not trackers:
        return
    for name in trackers:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"--report-to {name}: the {PACKAGES[name]} package is not installed ({INSTALL})")
    fill_defaults_cfg(cfg)
    if "tensorboard" in trackers and is_uri(cfg.storage):
        raise ConfigError(f"--report-to tensorboard: writes event files into the run's folder, which must be "
                          f"local; --storage {redact(cfg.storage)} is not (use mlflow with --tracking-uri)")
    cfg.git_commit = cfg.git_commit or git_commit()
    if "mlflow" in trackers:
        experiment_id(cfg.tracking_uri, cfg.experiment)


def fill_defaults_cfg(cfg) -> None:
    """:func:`fill_defaults` on a TrainConfig (in place): a ``train`` run's experiment is ``gloss-ray``,
    its store beside its ``--storage``."""
    d = fill_defaults({"report_to": cfg.report_to, "experiment": cfg.experiment, "tracking_uri": cfg.tracking_uri},
                      cfg.storage, DEFAULT_EXPERIMENT)
    cfg.experiment, cfg.tracking_uri = d["experiment"], d["tracking_uri"]


def experiment_id(tracking_uri: str, name: str) -> str:
    """The id of MLflow experiment ``name`` at ``tracking_uri``, created (artifacts: :func:`artifact_root`)
    if missing; an unreachable store is a :class:`ConfigError`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_root(tracking_uri))
        except MlflowException:          # created meanwhile by another run of the sweep
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id
    except MlflowException as e:
        raise ConfigError(f"--tracking-uri {redact(tracking_uri)}: {str(e).splitlines()[0]}") from None


def log_report(tracking_uri: str, experiment: str, sweep_dir: str, folder) -> str:
    """A sweep's report folder as the artifacts (under ``report/``) of one MLflow run of the sweep's
    experiment, named ``report`` and tagged ``stage: report`` (the same run again when the sweep is
    re-run); returns its id."""
    from mlflow import MlflowClient

    client, key = MlflowClient(tracking_uri), f"report:{redact(sweep_dir)}"
    exp_id = experiment_id(tracking_uri, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY}` = '{key}'", max_results=1)
    run_id = found[0].info.run_id if found else client.create_run(
        exp_id, run_name="report", tags={RUN_KEY: key, "stage": "report", "git_commit": git_commit()}).info.run_id
    client.log_artifacts(run_id, str(folder), artifact_path="report")
    client.set_terminated(run_id)
    return run_id


# --------------------------------------------------------------------------------------------- worker side
def params_of(cfg) -> dict:
    """The run's options as MLflow / W&B parameters: the configuration's flags (its provenance --
    command, stage, trial id, git commit -- goes to the tags), flattened by Ray's integrations,
    credentials redacted, None written ``None``."""
    d = {k: v for k, v in cfg.to_dict().items() if OPTIONS[k].flag}
    return redact({k: ("None" if v is None else v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in d.items()})


def tags_of(cfg, run_key: str) -> dict:
    commit = cfg.git_commit or git_commit()
    tags = {"benchmark": cfg.benchmark or Path(cfg.train_file or cfg.hf_dataset or "corpus").stem,
            "loss": cfg.loss, "seed": str(cfg.seed), "git_commit": commit, "mlflow.source.git.commit": commit,
            "stage": cfg.stage or "train", RUN_KEY: run_key}
    if cfg.trial_id:
        tags["trial_id"] = cfg.trial_id
    return redact(tags)


def run_key(cfg, run_dir: str) -> str:
    """What names one tracked run across resumes: the trial id in a sweep's search (all of a PBT
    trial's Train runs), else the run's folder."""
    if cfg.stage == "trial" and cfg.trial_id:
        return f"trial:{cfg.experiment}/{cfg.trial_id}"
    return f"run:{redact(run_dir)}"


def _numbers(metrics: dict) -> dict:
    """The finite numbers of ``metrics`` (trackers take no strings, None or NaN)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class MlflowTracker:
    """One MLflow run: created with Ray's ``setup_mlflow`` (parameters and tags logged there), or the
    run of the same :func:`run_key` reopened."""

    def __init__(self, cfg, run_dir: str, key: str):
        import mlflow
        from mlflow import MlflowClient

        exp_id = experiment_id(cfg.tracking_uri, cfg.experiment)
        found = MlflowClient(cfg.tracking_uri).search_runs(
            [exp_id], filter_string=f"tags.`{RUN_KEY}` = '{key}'", max_results=1)
        if found:
            mlflow.set_tracking_uri(cfg.tracking_uri)
            self.mlflow = mlflow
            self.run = mlflow.start_run(run_id=found[0].info.run_id)
            self.resumed = True
        else:
            from ray.air.integrations.mlflow import setup_mlflow

            self.mlflow = setup_mlflow(params_of(cfg), tracking_uri=cfg.tracking_uri, experiment_id=exp_id,
                                       run_name=cfg.name, tags=tags_of(cfg, key), rank_zero_only=False)
            self.run = self.mlflow.active_run()
            self.resumed = False

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Queued: MLflow's asynchronous logging writes them from its own thread, so the training
        step does not wait for the store (benchmarks/tracking_overhead.py); :meth:`finish` flushes."""
        self.mlflow.log_metrics(_numbers(metrics), step=step, synchronous=False)

    def log_artifacts(self, items: dict) -> None:
        for name, path in items.items():
            if Path(path).is_dir():
                self.mlflow.log_artifacts(str(path), artifact_path=name)
            else:
                self.mlflow.log_artifact(str(path))

    def finish(self, failed: bool) -> None:
        self.mlflow.flush_async_logging()
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


class TensorBoardTracker:
    """Event files in ``<run_dir>/tensorboard``, one scalar per metric; a resumed run purges what the
    interrupted one wrote after its checkpoint."""

    def __init__(self, run_dir: str, step: int):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=join(run_dir, "tensorboard"), purge_step=step or None)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for k, v in _numbers(metrics).items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def log_artifacts(self, items: dict) -> None:
        pass                                    # TensorBoard keeps scalars only

    def finish(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run through Ray's ``setup_wandb`` (project: the experiment; id: from :func:`run_key`, so a
    resumed run continues it), its files under ``<run_dir>/wandb``; ``WANDB_MODE=offline`` logs
    without an account."""

    def __init__(self, cfg, run_dir: str, key: str):
        from ray.air.integrations.wandb import setup_wandb

        local = None if is_uri(run_dir) else run_dir         # W&B's own files: on this node's disk
        if local:
            os.makedirs(local, exist_ok=True)
        self.run = setup_wandb(params_of(cfg), rank_zero_only=False, project=cfg.experiment,
                               trial_id=hashlib.sha1(key.encode()).hexdigest()[:16], trial_name=cfg.name,
                               group=cfg.stage or "train", dir=local, resume="allow",
                               tags=[f"{k}:{v}" for k, v in tags_of(cfg, key).items()
                                     if k in ("benchmark", "loss", "seed", "stage")] + [f"git:{(cfg.git_commit or '')[:12]}"])

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(_numbers(metrics), step=step)

    def log_artifacts(self, items: dict) -> None:
        import wandb

        art = wandb.Artifact(name=f"report-{self.run.id}", type="report")
        for name, path in items.items():
            if Path(path).is_dir():
                art.add_dir(str(path), name=name)
            else:
                art.add_file(str(path), name=name)
        self.run.log_artifact(art)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The run's trackers, called alike; empty on ranks other than 0 and without ``--report-to``."""

    def __init__(self, trackers: list | None = None):
        self.trackers = trackers or []

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifacts(self, items: dict) -> None:
        """``{artifact name: local file or folder}``: a file goes to the artifacts' root, a folder
        under its name."""
        for t in self.trackers:
            t.log_artifacts(items)

    def finish(self, failed: bool = False) -> None:
        for t in self.trackers:
            t.finish(failed)
        self.trackers = []


def start(cfg, run_dir: str, rank: int, step: int) -> Trackers:
    """The trackers of ``cfg.report_to`` on rank 0 (defaults filled by :func:`prepare`), at optimiser
    step ``step`` (0, or where a resumed run goes on)."""
    if rank != 0 or not cfg.trackers:
        return Trackers()
    if cfg.tracking_uri is None or cfg.experiment is None:
        fill_defaults_cfg(cfg)            # a run started without fit (LocalSession)
    key = run_key(cfg, run_dir)
    made = {"mlflow": lambda: MlflowTracker(cfg, run_dir, key), "tensorboard": lambda: TensorBoardTracker(run_dir, step),
            "wandb": lambda: WandbTracker(cfg, run_dir, key)}
    return Trackers([made[name]() for name in cfg.trackers])
