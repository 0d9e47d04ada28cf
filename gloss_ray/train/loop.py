"""The per-worker fine-tuning loop, top to bottom: set up, (resume), calibrate, then per epoch
refresh the global graph, train, evaluate, checkpoint; at the end test the best weights and write
the run's outputs. Runs under Ray Train (``RaySession``) or in one plain process (``LocalSession``).

One step: encoder forward once -> logits + embeddings; the objective (:mod:`.objective`: CE on the
local batch, the auxiliary loss on the GLOBAL batch, ``(1-lam)*CE + lam*aux``); a NaN guard all
ranks take together; backward, clip, step. Each epoch: validation over the whole validation set
(sharded, gathered), a checkpoint (:mod:`.checkpoint`) and early stopping on validation macro-F1.
Every step is counted (:mod:`gloss_ray.throughput`): real tokens/s, documents/s and MFU per epoch in
the history, over the run in ``state["throughput"]``, and live on the progress bar.

Every ``log_every`` steps a per-step row (:func:`step_row`: loss and its parts, learning rates, lambda,
sigma and k as scheduled at that step, documents/s) goes to ``state["steps"]`` (``steps.csv``) and to
the run's trackers (:mod:`.tracking`, ``--report-to``), as does each epoch's history row. Every
``checkpoint_every`` steps inside an epoch a step checkpoint (:func:`.checkpoint.save_step`) saves the
epoch in progress, from which :func:`run_epoch` resumes after a kill without repeating or skipping a batch.
The parts the steps share travel together in a :class:`Run`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .. import distributed as D
from ..config import TrainConfig
from ..log import for_rank
from ..losses import WeightedCrossEntropy, balanced_weights
from ..metrics import classification_metrics
from ..model import TextClassifier, autocast, encode, unwrap
from ..throughput import Meter, peak_flops
from . import checkpoint, tracking
from .inputs import WorkerData, load_worker_data
from .streaming import StreamData
from .objective import TrainingObjective, build_auxiliary
from .outputs import finish
from .session import peak_rss_kib, quiet_libraries, seed_all, seed_rank_streams

if TYPE_CHECKING:
    from ..graph.global_graph import RefreshDiagnostics


@dataclass
class Run:
    """What the loop's parts share on one worker (instead of a dozen loose arguments): the
    configuration, the session, the data, the model and its objective, optimiser and schedule, the
    global graph (or None), the device's peak FLOP/s, ``log`` (:func:`gloss_ray.log.for_rank`: rank 0
    says), the trackers (empty on other ranks) and the checkpointed ``state``
    (:func:`gloss_ray.train.checkpoint.new_state`)."""
    cfg: TrainConfig
    session: object
    data: WorkerData | StreamData
    device: torch.device
    model: torch.nn.Module
    objective: TrainingObjective
    optimizer: torch.optim.Optimizer
    scheduler: object
    graph: object
    peak: float
    log: Callable
    trackers: tracking.Trackers
    state: dict
    best_weights: dict | None = None

    @property
    def rank(self) -> int:
        return D.rank_and_world()[0]

    @property
    def world(self) -> int:
        return D.rank_and_world()[1]


def train(cfg: TrainConfig, session) -> dict:
    """Run the whole fine-tuning on this worker. Returns the final metrics (on every rank)."""
    quiet_libraries()
    rank, world = D.rank_and_world()
    device = session.device()
    seed_all(cfg.seed)
    t_start = time.time()
    log = for_rank(rank)

    stream = session.stream()
    data = load_worker_data(cfg, rank, world, log) if stream is None else StreamData(cfg, stream, session.dataset_shard)
    log(f"{data.corpus.name}: " + " / ".join(f"{n} {k}" for k, n in data.sizes().items())
        + f" docs, {data.corpus.num_classes} classes; {world} worker(s) x batch {cfg.batch_size}; "
        f"{data.steps_per_epoch} steps/epoch; device {device}"
        + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""))
    model, objective, graph = build_model(cfg, session, data, device, log)
    optimizer, scheduler = build_optimizer(cfg, model, data.total_steps)
    peak, peak_source = peak_flops(device)
    log(f"device peak {peak / 1e9:.0f} GFLOP/s ({peak_source}), the MFU's denominator")

    state, best_weights = checkpoint.new_state(), None
    if ckpt_dir := session.checkpoint_dir():
        state, best_weights = checkpoint.restore(ckpt_dir, model, optimizer, scheduler, device, graph)
        partial = state.get("partial")
        log(f"resumed from checkpoint after epoch {state['epoch']} (step {state['global_step']}"
            + (f", {partial['batches']} batches into epoch {state['epoch'] + 1})" if partial else ")"))
    run = Run(cfg, session, data, device, model, objective, optimizer, scheduler, graph, peak, log,
              tracking.start(cfg, session.run_dir, rank, state["global_step"]), state, best_weights)
    try:
        calibrate(objective, state, model, data, device, cfg.seed, log)
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            if run_epoch(run, epoch):
                break
        unwrap(model).load_state_dict(run.best_weights)
        state["throughput"] = run_throughput(state["history"], peak, peak_source, world)
        final = finish(cfg, session, model, data, state, device, t_start, log,
                       test=lambda split: evaluate(model, data, split, device, want_embeddings=True), trackers=run.trackers)
    except BaseException:
        try:                        # the run's own error is the one to raise
            run.trackers.finish(failed=True)
        except Exception as e:      # noqa: BLE001
            log(f"could not mark the tracked run failed: {type(e).__name__}: {e}")
        raise
    run.trackers.finish()
    return final


def run_epoch(run: Run, epoch: int) -> bool:
    """Epoch ``epoch`` (or the rest of it after a step checkpoint): refresh the global graph if due,
    train, validate, record, checkpoint. Returns whether the run stops after it."""
    cfg, state, log = run.cfg, run.state, run.log
    t0 = time.time()
    partial = state.pop("partial", None) or {}       # the epoch in progress of a step checkpoint
    diag = refresh_graph(run.graph, cfg, epoch, run.model, run.data, run.device, state["global_step"], log)
    if diag is None and partial.get("diag"):         # this epoch's refresh, done before the step checkpoint
        from ..graph.global_graph import RefreshDiagnostics

        diag = RefreshDiagnostics(**partial["diag"])
    clock = lambda: partial.get("epoch_time_s", 0.0) + time.time() - t0   # noqa: E731
    sums, speed = train_epoch(run, epoch, partial, diag, clock)
    val = evaluate(run.model, run.data, "validation", run.device)[0]
    epoch_time = clock()
    state["elapsed_s"] += epoch_time
    row = history_row(epoch, sums, val, epoch_time, state, run.scheduler, run.objective, run.graph, diag, speed)
    state["history"].append(row)
    improved = val["macro_f1"] > state["best_val_macro_f1"]
    if improved:
        state["best_val_macro_f1"], state["best_epoch"] = val["macro_f1"], epoch
        run.best_weights = checkpoint.weights_cpu(run.model)
    state["epoch"] = epoch
    log(f"epoch {epoch}: loss {row['train_loss']:.4f} (ce {row['train_ce']:.4f}, aux {row['train_aux']:.4f}) "
        f"val acc {val['accuracy']:.4f} macro-F1 {val['macro_f1']:.4f}{' *' if improved else ''} [{row['epoch_time_s']:.1f}s; "
        f"train {speed['tokens_per_s']:.0f} tokens/s, {speed['docs_per_s']:.1f} docs/s, MFU {speed['mfu']:.1%}]")
    run.trackers.log_metrics(row, state["global_step"])
    checkpoint.save_and_report(run.session, row, state, run.model, run.optimizer, run.scheduler, run.best_weights,
                               run.rank, run.graph)
    checkpoint.maybe_fail_once(epoch, run.rank)
    return should_stop(cfg, epoch, state, run.data.total_steps, log)


# ---------------------------------------------------------------------------------------------- set-up
def build_model(cfg: TrainConfig, session, data: WorkerData, device, log):
    """The classifier (DDP-wrapped under Ray), the training objective and, with ``--global-k``, the
    global document graph (whose node-shared bank says through ``log`` when it falls back to a copy per worker)."""
    C = data.corpus.num_classes
    model = session.prepare_model(TextClassifier.from_encoder(cfg.model, C, cfg.pooling, cfg.dropout))
    seed_rank_streams(cfg.seed, D.rank_and_world()[0])
    cw = balanced_weights(data.class_counts) if cfg.class_weights == "balanced" else None
    graph = None
    if cfg.global_k > 0:
        from ..graph.global_graph import GlobalGraph

        graph = GlobalGraph(len(data.full_train), unwrap(model).encoder.config.hidden_size, data.known_labels,
                            data.true_labels, C, cfg.global_k, cfg.global_max_nodes, cfg.index, device,
                            pseudo_confidence=cfg.pseudo_confidence, seed=cfg.seed, log=log)
    aux = build_auxiliary(cfg, C, cw, device, graph)
    return model, TrainingObjective(cfg, WeightedCrossEntropy(cw).to(device), aux, data.total_steps), graph


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: encoder weights (decayed), encoder biases/norms (not decayed), and the
    classifier head at ``cfg.head_lr`` (default ``cfg.lr``). A fresh linear head learns little in a
    few hundred steps at an encoder's learning rate, hence its own rate for short runs."""
    no_decay = ("bias", "LayerNorm.weight", "norm.weight")
    head = {id(p) for p in unwrap(model).head.parameters()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if id(p) not in head and not any(x in n for x in no_decay)],
         "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if id(p) not in head and any(x in n for x in no_decay)], "weight_decay": 0.0},
        {"params": [p for n, p in named if id(p) in head], "weight_decay": cfg.weight_decay,
         "lr": cfg.head_lr if cfg.head_lr is not None else cfg.lr},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: TrainConfig, model, total_steps: int):
    """AdamW and a linear warm-up then linear decay to 0 at ``total_steps``."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    warm = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total_steps - s) / max(1, total_steps - warm)))
    return optimizer, scheduler


def calibrate(objective: TrainingObjective, state: dict, model, data: WorkerData, device, seed: int, log) -> None:
    """Set what the auxiliary loss takes from the corpus once (G-Loss's root / dicm sigma, the same
    on every rank), or restore it from the checkpoint."""
    if objective.aux is None:
        return
    if state["sigma"] is not None:
        objective.aux.restore({"sigma": state["sigma"]})
        return
    found = objective.aux.calibrate(lambda n=1024: data.calibration_sample(model, device, seed, n), device)
    if found:
        state["sigma"] = found["sigma"]
        log(f"sigma ({found['kind']}) from {found['docs']} training docs: {state['sigma']:.4f}")


# ---------------------------------------------------------------------------------------------- an epoch
def refresh_graph(graph, cfg: TrainConfig, epoch: int, model, data: WorkerData, device, step: int, log):
    """Re-encode the corpus and rebuild the global graph every ``refresh_every`` epochs (epochs 1,
    1 + refresh_every, ...); returns the refresh's :class:`~gloss_ray.graph.global_graph.RefreshDiagnostics`,
    None in an epoch without one. A resumed run goes on with the graph of its checkpoint: it refreshes
    only where the uninterrupted run would have."""
    if graph is None or not graph.refresh_due(epoch, cfg.refresh_every):
        return None

    def encode_shard(rows):
        with encoding_bar(cfg, f"refresh: encode {len(rows)} docs", len(rows)) as bar:
            return encode(model, data.loader_for(data.full_train, rows), device, progress=bar)[1].to(device)

    graph.refresh(encode_shard, step, epoch)
    diag = graph.diagnostics()
    log(f"{diag.describe(len(data.full_train), cfg.global_k)}, "
        f"peak RSS so far {peak_rss_kib() / 1024:.0f} MB")
    return diag


def train_epoch(run: Run, epoch: int, partial: dict, diag: RefreshDiagnostics | None,
                clock: Callable[[], float]) -> tuple[list[float], dict]:
    """One pass over this rank's slices of the epoch's global batches -- from where a step checkpoint
    left it (``partial``) -- returns the epoch's summed (total, ce, aux, steps) over all ranks, and its
    throughput: the :class:`Meter` sums of all ranks (seconds: their mean) with their rates against
    the peak per device. A step's seconds run from the end of the previous step (data loading
    included). A non-finite loss or gradient skips the step on every rank (it is still counted: the
    hardware did the work). Every ``log_every`` steps a per-step row (:func:`step_row`); every
    ``checkpoint_every`` steps inside the epoch a step checkpoint (:func:`gloss_ray.train.checkpoint.save_step`)."""
    cfg, data, model, state = run.cfg, run.data, run.model, run.state
    model.train()
    done = int(partial.get("batches", 0))                 # batches of this epoch already trained on
    acc = EpochAccumulator.restore(partial, run.rank, unwrap(model).encoder)
    batches = data.batches(epoch, done)
    if cfg.progress and run.rank == 0:
        from tqdm import tqdm

        batches = tqdm(batches, total=data.steps_per_epoch, initial=done, desc=f"epoch {epoch}/{cfg.epochs}",
                       mininterval=5, ncols=100)
    t = time.perf_counter()
    for batch in batches:
        step = state["global_step"]
        with autocast(run.device):
            logits, emb = model(batch["input_ids"].to(run.device), batch["attention_mask"].to(run.device))
        index = batch.get("index")          # the documents' corpus rows (the global graph's; in-memory path)
        obj, backward_loss = run.objective(logits, emb, batch["labels"].to(run.device), step,
                                           None if index is None else index.to(run.device))
        lrs = [g["lr"] for g in run.optimizer.param_groups]     # the rates this step trains with
        if apply_step(backward_loss, model, run.optimizer, run.scheduler, cfg.grad_clip, step, state, run.log):
            acc.add_loss([obj.total.item(), obj.ce.item(), obj.aux.item()])
        now = time.perf_counter()
        this = Meter.rates(acc.add_step(batch["attention_mask"], now - t), run.peak)
        t = now
        if hasattr(batches, "set_postfix_str"):   # the bar shows the last step's figures
            batches.set_postfix_str(f"{this['tokens_per_s']:.0f} tok/s, MFU {this['mfu']:.0%}", refresh=False)
        state["global_step"] += 1
        done += 1
        if cfg.log_every and state["global_step"] % cfg.log_every == 0:
            row = step_row(run, epoch, done, acc, lrs)
            state["steps"].append(row)
            run.trackers.log_metrics({f"step/{k}": v for k, v in row.items() if k != "step"}, state["global_step"])
            acc.window = np.zeros(len(acc.window))
        if state["global_step"] >= data.total_steps:
            break
        if cfg.checkpoint_every and state["global_step"] % cfg.checkpoint_every == 0 and done < data.steps_per_epoch:
            checkpoint.save_step(run, {"batches": done, "epoch_time_s": clock(),
                                       "diag": dataclasses.asdict(diag) if diag is not None else None},
                                 acc.to_dict())
            t = time.perf_counter()       # the checkpoint's time is not the next step's
    summed = D.all_sum(acc.sums.tolist() + [acc.meter.sums[k] for k in Meter.FIELDS], run.device)
    speed = dict(zip(Meter.FIELDS, summed[4:]))
    speed["seconds"] /= run.world
    return summed[:4], {**speed, **Meter.rates(speed, run.peak, run.world)}


class EpochAccumulator:
    """This rank's sums over the epoch so far -- losses (total, ce, aux, steps), the throughput
    :class:`Meter` -- and over the per-step row's window (losses, documents, seconds); a step
    checkpoint saves them per rank and a resumed epoch goes on from them, so its history row is the
    uninterrupted run's."""

    def __init__(self, encoder):
        self.sums = np.zeros(4)
        self.meter = Meter(encoder)
        self.window = np.zeros(6)          # total, ce, aux, steps, documents, seconds

    @classmethod
    def restore(cls, partial: dict, rank: int, encoder) -> "EpochAccumulator":
        acc = cls(encoder)
        ranks = partial.get("ranks") or []
        if rank < len(ranks):
            acc.sums = np.asarray(ranks[rank]["sums"], dtype=float)
            acc.meter.sums.update(ranks[rank]["meter"])
            acc.window = np.asarray(ranks[rank]["window"], dtype=float)
        return acc

    def to_dict(self) -> dict:
        return {"sums": self.sums.tolist(), "meter": dict(self.meter.sums), "window": self.window.tolist()}

    def add_loss(self, values: list[float]) -> None:
        self.sums += [*values, 1]
        self.window[:4] += [*values, 1]

    def add_step(self, attention_mask, seconds: float) -> dict:
        self.window[4:] += [attention_mask.shape[0], seconds]
        return self.meter.add(attention_mask, seconds)


def step_row(run: Run, epoch: int, done: int, acc: EpochAccumulator, lrs: list[float]) -> dict:
    """The per-step row after ``run.state["global_step"]`` steps: the window's mean loss and its CE
    and auxiliary parts (NaN when every step of it was skipped), the encoder's and the head's
    learning rates, lambda, sigma and k as scheduled at the last step, and the global batch's
    documents per second over the window (this rank's documents x workers: their batches are equal)."""
    w, gs = acc.window, run.state["global_step"]
    n = w[3]
    return {"step": gs, "epoch": epoch - 1 + done / run.data.steps_per_epoch,
            "train_loss": w[0] / n if n else float("nan"), "train_ce": w[1] / n if n else float("nan"),
            "train_aux": w[2] / n if n else float("nan"), "lr": lrs[0], "head_lr": lrs[-1],
            **run.objective.log_values(gs - 1), "docs_per_s": w[4] * run.world / max(w[5], 1e-12)}


def apply_step(loss, model, optimizer, scheduler, grad_clip: float, step: int, state: dict, log) -> bool:
    """Backward, clip, optimiser and schedule step -- unless the loss or the gradient is not finite
    on some rank, when every rank skips the step (the schedule does not advance either)."""
    optimizer.zero_grad(set_to_none=True)
    if not D.all_finite(loss.detach()):
        state["skipped_steps"] += 1
        log(f"non-finite loss at step {step}: skipped on all workers")
        return False
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if not D.all_finite(norm):  # a finite loss can still give non-finite gradients
        optimizer.zero_grad(set_to_none=True)
        state["skipped_steps"] += 1
        log(f"non-finite gradient at step {step}: skipped on all workers")
        return False
    optimizer.step()
    scheduler.step()
    return True


def evaluate(model, data: WorkerData | StreamData, split: str, device, want_embeddings=False):
    """Predictions over a whole split (``validation``, ``test``), each rank encoding its shard (the
    data's ``outputs``). Returns ``(metrics, predictions, embeddings or None, labels)`` on every rank."""
    logits, emb, labels = data.outputs(model, split, device, embeddings=want_embeddings)
    pred = logits.argmax(1)
    return classification_metrics(labels, pred, int(labels.max()) + 1), pred, emb, labels


def history_row(epoch, sums, val, epoch_time, state, scheduler, objective, graph, diag, speed) -> dict:
    n = max(sums[3], 1)
    row = {"epoch": epoch, "train_loss": sums[0] / n, "train_ce": sums[1] / n, "train_aux": sums[2] / n,
           "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"], "lr": scheduler.get_last_lr()[0],
           **objective.log_values(state["global_step"] - 1), "epoch_time_s": epoch_time, "elapsed_s": state["elapsed_s"],
           **{f"train_{k}": v for k, v in speed.items()}}
    if graph is not None:
        row.update(diag.history() if diag is not None else {}, lookup_s=graph.take_lookup_seconds())
    return row


def should_stop(cfg: TrainConfig, epoch: int, state: dict, total_steps: int, log) -> bool:
    """Early stopping on validation macro-F1 (``patience``), or ``--max-steps`` reached."""
    if epoch >= cfg.epochs:
        return False
    if epoch - state["best_epoch"] >= cfg.patience:
        log(f"early stop: no validation macro-F1 gain for {cfg.patience} epoch(s)")
        return True
    if state["global_step"] >= total_steps:
        log(f"stop: --max-steps {cfg.max_steps} reached in epoch {epoch}")
        return True
    return False


def run_throughput(history: list[dict], peak: float, peak_source: str, world: int) -> dict:
    """The run's training throughput from its epochs' sums in ``history`` (a resumed run's too):
    ``train_tokens_per_s``, ``train_docs_per_s``, ``train_mfu``, ``train_padding`` and the peak used."""
    sums = {k: sum(row.get(f"train_{k}", 0.0) for row in history) for k in Meter.FIELDS}
    return {**{f"train_{k}": v for k, v in Meter.rates(sums, peak, world).items()},
            "device_peak_flops": peak, "device_peak_source": peak_source}


def encoding_bar(cfg: TrainConfig, desc: str, total: int):
    """A progress bar over documents encoded, as the epoch's (rank 0, with ``--progress``), else a silent one."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="doc", mininterval=5, ncols=100,
                disable=not (cfg.progress and D.rank_and_world()[0] == 0))
