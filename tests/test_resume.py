"""Resume is exact: a run interrupted after epoch 1 and resumed from its checkpoint ends with the
weights of the same run left alone (in one process, LocalSession; CPU, deterministic algorithms)."""
import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gloss_ray.config import TrainConfig
from gloss_ray.train.checkpoint import FAIL_ENV
from gloss_ray.train.loop import train
from gloss_ray.train.session import LocalSession


@pytest.fixture
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def _config(data_dir, model_dir, tmp_path, name, **kw) -> TrainConfig:
    """Two short epochs of a tiny BERT with dropout (3 steps each), so that every step draws random numbers."""
    return TrainConfig(benchmark="mr", data_dir=str(data_dir), model=model_dir, loss="gloss", epochs=2,
                       max_train=48, max_eval=16, max_length=16, batch_size=16, dropout=0.3, patience=10,
                       progress=False, storage=str(tmp_path), name=name, cache_dir=str(tmp_path / "tok"), **kw)


def _run(cfg: TrainConfig, tmp_path: Path, interrupt: bool) -> Path:
    """Train to the end, after one simulated failure right after epoch 1's checkpoint when ``interrupt``;
    returns the run's folder."""
    run = tmp_path / cfg.name
    if interrupt:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(FAIL_ENV, f"1:{tmp_path / (cfg.name + '-failed')}")
            with pytest.raises(RuntimeError, match="simulated worker failure"):
                train(cfg, LocalSession(str(run), device="cpu"))
    train(cfg, LocalSession(str(run), device="cpu"))
    return run


def _last_weights(run: Path) -> dict:
    """The weights after the last epoch (the run's model/ holds the best epoch's)."""
    return load_file(run / "local_checkpoint" / "model.safetensors")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(data_dir, tiny_model_dir, tmp_path, deterministic):
    """The random streams (dropout) go on where epoch 1 left them instead of starting over."""
    whole = _run(_config(data_dir, tiny_model_dir, tmp_path, "whole"), tmp_path, interrupt=False)
    resumed = _run(_config(data_dir, tiny_model_dir, tmp_path, "resumed"), tmp_path, interrupt=True)
    _assert_same_weights(_last_weights(whole), _last_weights(resumed))


def test_a_resumed_run_keeps_the_global_graph_and_its_refresh_schedule(data_dir, tiny_model_dir, tmp_path,
                                                                         deterministic):
    """With a refresh every 2 epochs, epoch 2 uses epoch 1's graph (its bank updated online) whether
    or not the run was resumed in between: no extra refresh, the same final weights."""
    kw = dict(global_k=4, refresh_every=2)
    whole = _run(_config(data_dir, tiny_model_dir, tmp_path, "whole", **kw), tmp_path, interrupt=False)
    resumed = _run(_config(data_dir, tiny_model_dir, tmp_path, "resumed", **kw), tmp_path, interrupt=True)
    for run in (whole, resumed):
        rows = list(csv.DictReader(open(run / "history.csv")))
        assert [bool(r["refresh_s"]) for r in rows] == [True, False]   # refreshed in epoch 1 only
    _assert_same_weights(_last_weights(whole), _last_weights(resumed))
