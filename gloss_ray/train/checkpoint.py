"""A run's checkpoint: what a resumed run needs to go on exactly where it stopped.

One checkpoint per epoch, and with ``--checkpoint-every N`` one every N optimiser steps inside an
epoch (:func:`save_step`), written by rank 0 into a temporary folder and handed to the session (Ray
Train uploads it to the run's storage and keeps the last two)::

    model.safetensors    the weights after this epoch (or step)
    best.safetensors     the best-validation weights, when they are not the model's
    optimizer.pt         optimiser and learning-rate scheduler
    rng.pt               every rank's random streams: torch (CPU, CUDA), numpy's and python's
    graph.pt             the global document graph's state, with ``--global-k``
    state.json           epoch, step, history, per-step rows, best epoch and score, sigma, skipped
                         steps, time; a step checkpoint's ``partial``: the epoch in progress

A step checkpoint's ``partial`` says how far into epoch ``epoch + 1`` the run is: ``batches`` (the
global batches trained on: :class:`~gloss_ray.data.GlobalBatchSampler` resumes after them, its order
being a function of the seed and epoch alone), ``epoch_time_s``, the epoch's global-graph refresh
figures (``diag``) and every rank's sums so far (``ranks``: losses, throughput, the per-step window).
With the random streams, the optimiser and the graph, a run killed after it goes on with exactly the
batches, dropout masks and updates of the run left alone: no batch repeated or skipped.

Every ``.pt`` file is loaded with ``torch.load(weights_only=True)``: tensors and plain containers
only. Anyone who can write to a run's storage (a shared bucket) could otherwise run code on every
worker of the resumed run; a file holding anything else is refused with :class:`CheckpointError`.

Testing hooks: the environment variable ``GLOSS_RAY_FAIL_ONCE_AFTER_EPOCH`` set to ``"EPOCH:MARKER_FILE"``
makes rank 0 fail once, right after EPOCH's checkpoint, to exercise resume; ``GLOSS_RAY_FAIL_ONCE_AFTER_STEP``
set to ``"STEP:MARKER_FILE"`` the same after the step checkpoint of global step STEP (the launcher hands
the driver's values to the Ray Train workers: :func:`fail_once_env`).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import distributed as D
from ..errors import GlossRayError
from ..model import unwrap

FAIL_ENV = "GLOSS_RAY_FAIL_ONCE_AFTER_EPOCH"
FAIL_STEP_ENV = "GLOSS_RAY_FAIL_ONCE_AFTER_STEP"
FAIL_ENVS = {"epoch": FAIL_ENV, "step": FAIL_STEP_ENV}


class CheckpointError(GlossRayError):
    """A checkpoint file that a resumed run refuses to load."""


def new_state() -> dict:
    return {"epoch": 0, "global_step": 0, "history": [], "steps": [], "best_epoch": 0, "best_val_macro_f1": -1.0,
            "sigma": None, "skipped_steps": 0, "elapsed_s": 0.0}


def weights_cpu(model) -> dict:
    """A CPU copy of the model's weights (the best-so-far copy, a checkpoint's)."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def load_tensors(path: Path, device=None):
    """``torch.load`` of a checkpoint file with ``weights_only=True``: tensors and plain containers,
    never code. Anything else raises :class:`CheckpointError` naming the file and what it holds."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), "not a plain tensor file")
        raise CheckpointError(f"checkpoint file {path} holds more than tensors and plain containers, so it was "
                              f"not loaded (it may have been tampered with): {why.split('. ')[0]}") from None


def rng_state() -> dict:
    """This process's random streams: torch's (CPU and every CUDA device), numpy's global one and
    python's, as tensors and plain values (so that :func:`load_tensors` takes them)."""
    np_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])},
            "python": random.getstate()}


def set_rng_state(rng: dict) -> None:
    """Put back what :func:`rng_state` returned."""
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in rng["cuda"]])
    n = rng["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": key, "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def restore(ckpt_dir: str, model, optimizer, scheduler, device, graph=None) -> tuple[dict, dict]:
    """Load a checkpoint folder into the model, optimiser, scheduler, the global graph (if any) and
    this rank's random streams; returns ``(state, best weights)``. A rank that the checkpoint has no
    random streams for (a run resumed on more workers) keeps its freshly seeded ones."""
    ck = Path(ckpt_dir)
    state = {**new_state(), **json.loads((ck / "state.json").read_text())}   # older checkpoints: no "steps"
    unwrap(model).load_state_dict(load_file(ck / "model.safetensors"))
    opt = load_tensors(ck / "optimizer.pt", device)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if graph is not None and (ck / "graph.pt").exists():
        graph.load_state_dict(load_tensors(ck / "graph.pt", "cpu"))
    best_file = ck / "best.safetensors"
    if best_file.exists():
        best = load_file(best_file)
    else:           # the model's own weights, or none yet (a step checkpoint in the first epoch)
        best = weights_cpu(model) if state["best_epoch"] else None
    rank = D.rank_and_world()[0]
    if (ck / "rng.pt").exists() and rank < len(streams := load_tensors(ck / "rng.pt", "cpu")):
        set_rng_state(streams[rank])
    return state, best


def _write(folder: Path, state: dict, model, optimizer, scheduler, best_weights: dict, rngs: list[dict],
           graph_state: dict | None) -> None:
    save_file({k: v.contiguous() for k, v in weights_cpu(model).items()}, folder / "model.safetensors")
    if best_weights is not None and (state["best_epoch"] != state["epoch"] or "partial" in state):
        save_file({k: v.contiguous() for k, v in best_weights.items()}, folder / "best.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / "optimizer.pt")
    torch.save(rngs, folder / "rng.pt")
    if graph_state is not None:
        torch.save(graph_state, folder / "graph.pt")
    (folder / "state.json").write_text(json.dumps(state))


def save_and_report(session, row: dict, state: dict, model, optimizer, scheduler, best_weights: dict, rank: int,
                    graph=None) -> None:
    """Report the epoch's ``row`` with a checkpoint (written by rank 0, with every rank's random
    streams and the global graph's state; every rank reports)."""
    rngs = D.gather_objects(rng_state())
    with tempfile.TemporaryDirectory(prefix="gloss_ray_ckpt_") as tmp:
        if rank == 0:
            _write(Path(tmp), state, model, optimizer, scheduler, best_weights, rngs,
                   graph.state_dict() if graph is not None else None)
        session.report({k: v for k, v in row.items() if v is not None}, tmp if rank == 0 else None)


def save_step(run, partial: dict, mine: dict) -> None:
    """A step checkpoint inside an epoch (``--checkpoint-every``): the epoch checkpoint's files, with
    ``partial`` (``batches``, ``epoch_time_s``, ``diag``) and every rank's sums ``mine`` gathered
    into ``state["partial"]`` (module docstring). Every rank calls it at the same step."""
    state = {**run.state, "partial": {**partial, "ranks": D.gather_objects(mine)}}
    report = {"global_step": state["global_step"], "epoch_progress": state["epoch"] + partial["batches"] /
              run.data.steps_per_epoch}
    save_and_report(run.session, report, state, run.model, run.optimizer, run.scheduler, run.best_weights,
                    run.rank, run.graph)
    maybe_fail_once(state["global_step"], run.rank, unit="step")


def fail_once_env() -> dict:
    """The resume tests' hooks as this process has them, for the workers' environment ({} when unset)."""
    return {name: os.environ[name] for name in FAIL_ENVS.values() if os.environ.get(name)}


def maybe_fail_once(epoch: int, rank: int, unit: str = "epoch") -> None:
    """The resume tests' hooks (module docstring): raise once after ``epoch``'s checkpoint; with
    ``unit="step"``, after the step checkpoint of that global step (``GLOSS_RAY_FAIL_ONCE_AFTER_STEP``)."""
    fail = os.environ.get(FAIL_ENVS[unit])
    if not fail or rank != 0:
        return
    fail_epoch, marker = fail.split(":", 1)
    if int(fail_epoch) == epoch and not os.path.exists(marker):
        Path(marker).write_text("failed once\n")
        raise RuntimeError(f"{FAIL_ENVS[unit]}: simulated worker failure after {unit} {epoch}")
