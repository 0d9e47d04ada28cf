"""A run's checkpoint: what a resumed run needs to go on exactly where it stopped.

One checkpoint per epoch, written by rank 0 into a temporary folder and handed to the session
(Ray Train uploads it to the run's storage and keeps the last two)::

    model.safetensors    the weights after this epoch
    best.safetensors     the best-validation weights, when they are not this epoch's
    optimizer.pt         optimiser and learning-rate scheduler
    state.json           epoch, step, history, best epoch and score, sigma, skipped steps, time

Testing hook: ``GLOSS_RAY_FAIL_ONCE_AFTER_EPOCH`` (or ``cfg.extra["fail_once_after_epoch"]``) set
to ``"EPOCH:MARKER_FILE"`` makes rank 0 fail once, right after EPOCH's checkpoint, to exercise resume.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..model import unwrap

FAIL_ENV = "GLOSS_RAY_FAIL_ONCE_AFTER_EPOCH"


def new_state() -> dict:
    return {"epoch": 0, "global_step": 0, "history": [], "best_epoch": 0, "best_val_macro_f1": -1.0,
            "sigma": None, "skipped_steps": 0, "elapsed_s": 0.0}


def weights_cpu(model) -> dict:
    """A CPU copy of the model's weights (the best-so-far copy, a checkpoint's)."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def restore(ckpt_dir: str, model, optimizer, scheduler, device) -> tuple[dict, dict]:
    """Load a checkpoint folder into the model, optimiser and scheduler; returns ``(state, best weights)``."""
    ck = Path(ckpt_dir)
    state = json.loads((ck / "state.json").read_text())
    unwrap(model).load_state_dict(load_file(ck / "model.safetensors"))
    opt = torch.load(ck / "optimizer.pt", map_location=device, weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    best_file = ck / "best.safetensors"
    return state, (load_file(best_file) if best_file.exists() else weights_cpu(model))


def _write(folder: Path, state: dict, model, optimizer, scheduler, best_weights: dict) -> None:
    save_file({k: v.contiguous() for k, v in weights_cpu(model).items()}, folder / "model.safetensors")
    if state["best_epoch"] != state["epoch"]:
        save_file({k: v.contiguous() for k, v in best_weights.items()}, folder / "best.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps(state))


def save_and_report(session, row: dict, state: dict, model, optimizer, scheduler, best_weights: dict, rank: int) -> None:
    """Report the epoch's ``row`` with a checkpoint (written by rank 0; every rank reports)."""
    with tempfile.TemporaryDirectory(prefix="gloss_ray_ckpt_") as tmp:
        if rank == 0:
            _write(Path(tmp), state, model, optimizer, scheduler, best_weights)
        session.report({k: v for k, v in row.items() if v is not None}, tmp if rank == 0 else None)


def maybe_fail_once(cfg, epoch: int, rank: int) -> None:
    """The resume tests' hook (module docstring): raise once after ``epoch``'s checkpoint."""
    fail = cfg.extra.get("fail_once_after_epoch") or os.environ.get(FAIL_ENV)
    if not fail or rank != 0:
        return
    fail_epoch, marker = fail.split(":", 1)
    if int(fail_epoch) == epoch and not os.path.exists(marker):
        Path(marker).write_text("failed once\n")
        raise RuntimeError(f"{FAIL_ENV}: simulated worker failure after epoch {epoch}")
