"""Step checkpoints (``--checkpoint-every``): a run killed with SIGKILL in the middle of an epoch,
right after a step checkpoint, resumes there and ends exactly as the run left alone -- the same
per-step losses (no batch repeated or skipped: the sampler's position is saved), the same epoch rows
and the same final weights (the random streams are saved). Each run is a subprocess of this file
(``python tests/test_step_checkpoint.py CONFIG_JSON [PAUSE_MARKER]``) on one thread, with PyTorch's
deterministic algorithms."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gloss_ray.data import GlobalBatchSampler

EPOCHS, DOCS, BATCH, EVERY = 2, 96, 16, 4          # 6 steps an epoch; step checkpoints at steps 4 and 8


def test_a_sampler_started_at_a_batch_yields_the_rest_of_that_epochs_batches():
    labels = np.arange(100) % 3
    for balanced in (False, True):
        whole = GlobalBatchSampler(labels, 8, world_size=2, rank=1, seed=5, balanced=balanced)
        whole.set_epoch(3)
        rest = GlobalBatchSampler(labels, 8, world_size=2, rank=1, seed=5, balanced=balanced)
        rest.set_epoch(3, start=4)
        assert list(rest) == list(whole)[4:] and len(rest) == len(whole)


def _config(data_dir, model_dir, root: Path, name: str) -> dict:
    return dict(benchmark="mr", data_dir=str(data_dir), model=model_dir, loss="gloss", epochs=EPOCHS,
                max_train=DOCS, max_eval=16, max_length=16, batch_size=BATCH, dropout=0.3, patience=10,
                progress=False, storage=str(root), name=name, cache_dir=str(root / "tok"), log_every=1,
                checkpoint_every=EVERY, lam_schedule="cosine")


def _child(cfg: dict, pause_marker: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, __file__, json.dumps(cfg), *([pause_marker] if pause_marker else [])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]


def _rows(path: Path, drop=("docs_per_s", "epoch_time_s", "elapsed_s")) -> list[dict]:
    """A CSV's rows without its timings."""
    return [{k: v for k, v in r.items() if k not in drop and not k.startswith("train_") or k in
             ("train_loss", "train_ce", "train_aux")} for r in csv.DictReader(open(path))]


def test_a_run_killed_mid_epoch_resumes_at_its_step_checkpoint_and_ends_as_the_run_left_alone(
        data_dir, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    whole = _child(_config(data_dir, tiny_model_dir, tmp_path, "whole"))
    marker = tmp_path / "paused"
    killed = _child(_config(data_dir, tiny_model_dir, tmp_path, "killed"), str(marker))
    deadline = time.monotonic() + 900
    while not marker.exists():
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no step checkpoint in epoch 2"
        time.sleep(0.5)
    os.kill(killed.pid, signal.SIGKILL)               # a preempted node: no clean-up at all
    killed.wait(timeout=60)
    run = tmp_path / "killed"
    state = json.loads((run / "local_checkpoint" / "state.json").read_text())
    assert (state["epoch"], state["global_step"], state["partial"]["batches"]) == (1, 8, 2)
    assert not (run / "metrics.json").exists()
    _finish(_child(_config(data_dir, tiny_model_dir, tmp_path, "killed")))     # the same command again
    _finish(whole)

    steps = _rows(run / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 13))         # every step once
    assert steps == _rows(tmp_path / "whole" / "steps.csv")             # the same batches, losses, schedules
    assert _rows(run / "history.csv") == _rows(tmp_path / "whole" / "history.csv")
    a, b = (load_file(tmp_path / n / "local_checkpoint" / "model.safetensors") for n in ("killed", "whole"))
    import torch

    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.ray
def test_two_ray_train_workers_resume_a_failed_run_at_its_step_checkpoint(ray_local, data_dir, tiny_model_dir,
                                                                           tmp_path, monkeypatch):
    """Under Ray Train with two workers (each with its own dropout stream and sums): a worker failing
    right after the step checkpoint of step 8 (epoch 2, batch 2) is restarted by Ray from it, and the
    run's per-step and epoch losses are those of the run left alone."""
    from gloss_ray.config import TrainConfig
    from gloss_ray.train.checkpoint import FAIL_STEP_ENV
    from gloss_ray.train.launch import fit

    def cfg(name):
        d = _config(data_dir, tiny_model_dir, tmp_path, name)
        return TrainConfig(**{**d, "batch_size": BATCH // 2, "workers": 2, "max_failures": 1})

    fit(cfg("whole"))
    marker = tmp_path / "failed-once"
    with monkeypatch.context() as env:
        env.setenv(FAIL_STEP_ENV, f"8:{marker}")          # the driver's hook reaches the Train workers
        fit(cfg("failed"))
    assert marker.exists()                                  # it really failed, after step 8
    steps, whole = _rows(tmp_path / "failed" / "steps.csv"), _rows(tmp_path / "whole" / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 13))
    for key in ("train_loss", "train_ce", "train_aux", "lam", "lr"):
        assert [float(r[key]) for r in steps] == pytest.approx([float(r[key]) for r in whole], rel=1e-5), key
    failed_h, whole_h = _rows(tmp_path / "failed" / "history.csv"), _rows(tmp_path / "whole" / "history.csv")
    assert [float(r["train_loss"]) for r in failed_h] == pytest.approx([float(r["train_loss"]) for r in whole_h],
                                                                      rel=1e-5)


if __name__ == "__main__":              # one run, in a subprocess of the test above
    import torch

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    from gloss_ray.config import TrainConfig
    from gloss_ray.train.loop import train
    from gloss_ray.train.session import LocalSession

    class PausingSession(LocalSession):
        """Stops for good after writing its first step checkpoint in epoch 2, for the parent to kill it."""

        def __init__(self, run_dir, marker):
            super().__init__(run_dir, device="cpu")
            self.marker = marker

        def report(self, metrics, ckpt_dir):
            super().report(metrics, ckpt_dir)
            if self.marker and metrics.get("epoch_progress", 0) > 1:
                Path(self.marker).write_text("paused\n")
                time.sleep(3600)

    cfg = TrainConfig(**json.loads(sys.argv[1]))
    train(cfg, PausingSession(os.path.join(cfg.storage, cfg.name), sys.argv[2] if len(sys.argv) > 2 else None))
