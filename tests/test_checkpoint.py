"""A run's checkpoint on disk: what a resumed run agrees to load, and how LocalSession replaces it."""
import json
import os
from pathlib import Path

import pytest
import torch

from gloss_ray.train import checkpoint
from gloss_ray.train.session import LocalSession


class Payload:
    """What a tampered checkpoint file could hold: unpickling it creates ``marker`` (any code could run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _trained():
    """A model, AdamW and a LambdaLR after one step (optimizer state with tensors and step counts)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _checkpoint(run_dir: Path) -> Path:
    """A real checkpoint after epoch 1, written and reported the way the training loop does."""
    model, optimizer, scheduler = _trained()
    state = {**checkpoint.new_state(), "epoch": 1, "global_step": 1, "best_epoch": 1}
    session = LocalSession(str(run_dir))
    checkpoint.save_and_report(session, {"epoch": 1}, state, model, optimizer, scheduler,
                               checkpoint.weights_cpu(model), rank=0)
    return Path(session.checkpoint_dir())


def test_a_checkpoint_restores_the_optimizer_and_schedule(tmp_path):
    folder = _checkpoint(tmp_path)
    model, optimizer, scheduler = _trained()
    fresh_model = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 / (s + 1))
    state, _ = checkpoint.restore(str(folder), fresh_model, fresh_opt, fresh_sched, "cpu")
    assert state["epoch"] == 1 and fresh_sched.last_epoch == scheduler.last_epoch == 1
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_a_pickled_payload_in_a_checkpoint_file_does_not_run(tmp_path, name):
    folder = _checkpoint(tmp_path / "run")
    marker = tmp_path / "payload-ran"
    torch.save({"optimizer": Payload(marker), "scheduler": {}}, folder / name)
    model, optimizer, scheduler = _trained()
    with pytest.raises(Exception) as raised:
        checkpoint.restore(str(folder), model, optimizer, scheduler, "cpu")
    assert not marker.exists(), f"unpickling {name} ran the payload"
    # one clear error, naming the file
    assert type(raised.value).__name__ == "CheckpointError"
    assert name in str(raised.value) and "not loaded" in str(raised.value)


def _folder(path: Path, epoch: int) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(bytes([epoch]) * 1000)
    (path / "state.json").write_text(json.dumps({"epoch": epoch}))
    return path


def test_a_report_that_fails_midway_keeps_the_last_good_checkpoint(tmp_path):
    """The new checkpoint cannot be copied whole (a dangling link stands in for a kill or a full
    disk midway): the previous checkpoint is still there, complete, and is what a resume reads."""
    session = LocalSession(str(tmp_path / "run"))
    session.report({}, str(_folder(tmp_path / "epoch1", 1)))
    epoch2 = _folder(tmp_path / "epoch2", 2)
    os.symlink(tmp_path / "nowhere", epoch2 / "optimizer.pt")
    with pytest.raises(OSError):
        session.report({}, str(epoch2))
    resumed = Path(LocalSession(str(tmp_path / "run")).checkpoint_dir())
    assert json.loads((resumed / "state.json").read_text()) == {"epoch": 1}
    assert (resumed / "model.safetensors").read_bytes() == bytes([1]) * 1000


def test_a_report_replaces_the_checkpoint_and_leaves_nothing_else(tmp_path):
    session = LocalSession(str(tmp_path / "run"))
    for epoch in (1, 2):
        session.report({}, str(_folder(tmp_path / f"epoch{epoch}", epoch)))
    assert json.loads((Path(session.checkpoint_dir()) / "state.json").read_text()) == {"epoch": 2}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["local_checkpoint"]
