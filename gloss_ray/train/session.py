"""Where a worker runs: its device, where checkpoints and metrics go, and the process set-up.

``RaySession`` runs inside a Ray Train worker; ``LocalSession`` runs the same loop in one plain
process (no Ray; the Ray-overhead benchmark and quick tests use it). The loop differs by nothing else.
"""
from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


class LocalSession:
    """One process, no Ray (on ``device``, default the GPU if any): checkpoints in ``<run_dir>/local_checkpoint``.

    A new checkpoint is copied whole into ``local_checkpoint.partial``, then renamed into place (the
    last good one is moved aside as ``local_checkpoint.previous`` meanwhile, and removed after), so a
    run killed at any point still finds a complete checkpoint: a partial copy is never read."""

    def __init__(self, run_dir: str, device: str | None = None):
        self.run_dir = run_dir
        self.ckpt = Path(run_dir) / "local_checkpoint"
        self.partial = self.ckpt.with_name("local_checkpoint.partial")
        self.previous = self.ckpt.with_name("local_checkpoint.previous")
        self._device = device

    def device(self) -> torch.device:
        """``device`` if given, else the GPU when there is one."""
        return torch.device(self._device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def prepare_model(self, model):
        return model.to(self.device())

    def stream(self):
        """The Ray Data path's plan: never in one plain process (it needs Ray Train's dataset shards)."""
        return None

    def checkpoint_dir(self) -> str | None:
        """The last complete checkpoint: ``local_checkpoint``, or the one moved aside when a run was
        killed between the two renames of :meth:`report`."""
        for folder in (self.ckpt, self.previous):
            if (folder / "state.json").exists():
                return str(folder)
        return None

    def report(self, metrics: dict, ckpt_dir: str | None) -> None:
        if not ckpt_dir:
            return
        shutil.rmtree(self.partial, ignore_errors=True)
        shutil.copytree(ckpt_dir, self.partial)
        if self.ckpt.exists():
            shutil.rmtree(self.previous, ignore_errors=True)
            os.replace(self.ckpt, self.previous)
        os.replace(self.partial, self.ckpt)
        shutil.rmtree(self.previous, ignore_errors=True)


class RaySession:
    """Inside a Ray Train worker: Train's device, DDP wrapping, checkpoints and reports.

    ``start_checkpoint`` (a ``ray.train.Checkpoint``) is where a new run starts when Train has no
    checkpoint of its own yet: a PBT trial continuing another trial's checkpoint with a mutated
    configuration (Ray Train V2 has no ``resume_from_checkpoint``). Once the run has reported a
    checkpoint, a restarted worker resumes from the run's own latest one instead.

    ``stream`` (a :class:`~gloss_ray.train.streaming.StreamPlan`): the run reads its data through Ray
    Data, this worker's shards coming from :meth:`dataset_shard`."""

    def __init__(self, run_dir: str, start_checkpoint=None, stream=None):
        self.run_dir = run_dir
        self.start_checkpoint = start_checkpoint
        self._stream = stream

    def stream(self):
        return self._stream

    def dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def checkpoint_dir(self) -> str | None:
        import ray.train

        ckpt = ray.train.get_checkpoint() or self.start_checkpoint
        if ckpt is None:
            return None
        return ckpt.to_directory(tempfile.mkdtemp(prefix="gloss_ray_restore_"))

    def report(self, metrics: dict, ckpt_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


def quiet_libraries() -> None:
    """The one place where library output a user cannot act on is turned down, in the worker:
    transformers' per-load progress bars ("Loading weights", "Writing model shards"), datasets'
    progress bars, FAISS's loader, which logs at INFO which CPU instruction set it picked (Ray Train
    workers log INFO), and the two loggers below."""
    import importlib.util
    import logging

    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    # sentence-transformers logs "Saving model to <temporary folder>" while the run's model is staged
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    # Ray Train 2.60 logs "Reporting training result N: TrainingReport(...)" (a whole metrics
    # dict per epoch) through a logger named by its *file path*, so LoggingConfig(log_level=...)
    # misses it; turn that one logger down.
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Seed this rank's own random streams (dropout) after the model is built: rank 0 keeps
    ``seed``, so a 1-worker run is unchanged; other ranks get their own, so same-shaped batches do
    not get identical dropout masks on every rank. The G-Loss mask, the batch order and the
    label subset come from explicit seeds shared by all ranks and are not affected."""
    if rank > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def peak_rss_kib() -> int:
    """This process's peak resident set size so far (``ru_maxrss``; KiB on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss
