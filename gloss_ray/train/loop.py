"""The per-worker fine-tuning loop. Runs under Ray Train (``RaySession``) or in one plain process
(``LocalSession``, used by the Ray-overhead benchmark); the two differ only in the Session object.

One step: encoder forward once -> logits + embeddings; CE on the local batch; the auxiliary loss
(G-Loss, SCL, ...) on the GLOBAL batch (embeddings and labels all-gathered from every worker,
gradient flowing to the local part); ``(1-lam)*CE + lam*aux``; a NaN guard all ranks take together;
backward, clip, step. Each epoch: validation over the whole validation set (sharded, gathered),
a checkpoint (model, optimiser, scheduler, history, best weights) and early stopping on validation
macro-F1. At the end the best weights score the test split, and rank 0 writes the run's outputs.
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .. import distributed as D
from ..config import TrainConfig
from ..data import GlobalBatchSampler, PadCollator, load_corpus, shard_indices, tokenize_split
from ..losses import (BatchAllTripletLoss, ContrastiveLoss, GLoss, SupConLoss, WeightedCrossEntropy,
                     balanced_class_weights, combined_objective)
from ..metrics import classification_metrics, silhouette
from ..model import TextClassifier, load_tokenizer, unwrap
from ..schedules import Schedule, int_schedule_value

# Testing hook (env var or cfg.extra["fail_once_after_epoch"]): "EPOCH:MARKER_FILE" makes rank 0 raise
# once, right after EPOCH's checkpoint, to exercise resume.
FAIL_ENV = "GLOSS_RAY_FAIL_ONCE_AFTER_EPOCH"


# ---------------------------------------------------------------------------------------------
# Sessions: where checkpoints and metrics go
# ---------------------------------------------------------------------------------------------
class LocalSession:
    """One process, no Ray: checkpoints in ``<run_dir>/local_checkpoint``."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.ckpt = Path(run_dir) / "local_checkpoint"

    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare_model(self, model):
        return model.to(self.device())

    def checkpoint_dir(self) -> str | None:
        return str(self.ckpt) if (self.ckpt / "state.json").exists() else None

    def report(self, metrics: dict, ckpt_dir: str | None) -> None:
        if ckpt_dir:
            import shutil

            shutil.rmtree(self.ckpt, ignore_errors=True)
            shutil.copytree(ckpt_dir, self.ckpt)


class RaySession:
    """Inside a Ray Train worker."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._restored = None

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def checkpoint_dir(self) -> str | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        self._restored = tempfile.mkdtemp(prefix="gloss_ray_restore_")
        return ckpt.to_directory(self._restored)

    def report(self, metrics: dict, ckpt_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


# ---------------------------------------------------------------------------------------------
@dataclass
class Batches:
    train: DataLoader
    sampler: GlobalBatchSampler
    eval_sets: dict  # split -> (dataset, labels ndarray)


def quiet_libraries() -> None:
    """The one place where library output a user cannot act on is turned down, in the worker:
    transformers' per-load progress bars ("Loading weights", "Writing model shards"), FAISS's
    loader, which logs at INFO which CPU instruction set it picked (Ray Train workers log INFO),
    and the two loggers below."""
    import importlib.util
    import logging

    from transformers.utils import logging as hf_logging

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


def _seed_all(seed: int) -> None:
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


def _dataset(corpus, split, tokenizer, cfg):
    frame = corpus.splits[split]
    key = f"{corpus.fingerprint(split)}:{split}"
    ds = tokenize_split(frame["text"].tolist(), tokenizer, cfg.max_length, cfg.cache_dir or _default_cache(), key)
    fp = f"{key}:{cfg.max_length}".encode().hex()[-60:]  # explicit fingerprints: no hashing of Arrow internals
    ds = ds.add_column("label", frame["label"].astype(int).tolist(), new_fingerprint=fp + "l")
    return ds.add_column("index", list(range(len(frame))), new_fingerprint=fp + "i")


def _peak_rss_kib() -> int:
    """This process's peak resident set size so far (``ru_maxrss``; KiB on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


def _default_cache() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "gloss_ray", "tokens")


def known_label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the training documents whose labels stay known (stratified, >= 1 per class)."""
    rng = np.random.default_rng(seed + 7919)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.extend(rng.permutation(idx)[: max(1, round(len(idx) * fraction))])
    return np.sort(np.asarray(keep))


def build_aux_loss(cfg: TrainConfig, num_classes: int, class_weights):
    if cfg.loss == "gloss":
        return GLoss(num_classes, sigma=cfg.sigma, gamma=cfg.gamma, k=cfg.k, variant=cfg.variant, mask=cfg.mask,
                     class_weights=class_weights)
    if cfg.loss == "scl":
        return SupConLoss(cfg.temperature)
    if cfg.loss == "triplet":
        return BatchAllTripletLoss(cfg.margin_value)
    if cfg.loss == "contrastive":
        return ContrastiveLoss(cfg.margin_value)
    return None


def step_objective(ce_fn, aux_fn, logits, emb, y, lam: float, *, sigma_scale: float = 1.0, k=None, mask_seed: int = 0,
                   batch_index=None, global_graph=None, global_weight: float = 1.0):
    """The loss of one step: ``(Objective for logging, loss to backpropagate)``.

    Both terms are the single-process objective of the GLOBAL batch. CE: the class-weighted sum of
    the local batch over the weight sum of the global batch (summed over workers), so with class
    weights too the workers' parts add up to the global weighted mean. The auxiliary loss sees the
    global batch itself (all workers' embeddings and labels, in rank order, gradient flowing to the
    local part); the G-Loss mask comes from ``mask_seed`` so every rank (and a 1-worker run of the
    same global batch) draws the same one. Each rank's backward term is scaled by the world size:
    DDP's gradient average then equals the gradient of the single-process objective on the global
    batch. With a ``global_graph`` the global batch's nearest corpus documents join G-Loss's graph
    as extra labelled nodes (and the bank takes the batch's fresh embeddings).
    """
    _, world = D.rank_and_world()
    ce_sum, ce_weight = ce_fn.terms(logits.float(), y)
    totals = D.all_sum_tensor(torch.stack([ce_sum.detach(), ce_weight.detach()]))
    ce = totals[0] / totals[1]                       # the global batch's weighted mean (logged)
    ce_local = ce_sum / totals[1]                    # this worker's share of it (backpropagated)
    aux = torch.zeros((), device=logits.device)
    if aux_fn is not None and lam > 0:
        g_emb, g_y = D.gather_with_grad(emb.float()), D.gather_with_grad(y)
        if isinstance(aux_fn, GLoss):
            gen = torch.Generator().manual_seed(mask_seed)
            sigma = aux_fn.current_sigma(g_emb.detach(), g_y) * sigma_scale
            extra = {}
            if global_graph is not None:
                g_idx = D.gather_with_grad(batch_index)
                ex_emb, ex_lab = global_graph.lookup(g_idx, g_emb.detach())
                extra = dict(extra_embeddings=ex_emb, extra_labels=ex_lab, extra_edge_weight=global_weight)
                global_graph.update_online(g_idx, g_emb.detach())
            aux = aux_fn(g_emb, g_y, sigma=sigma, k=k, generator=gen, **extra).float()
        else:
            aux = aux_fn(g_emb, g_y)
    obj = combined_objective(ce, aux, lam)
    return obj, world * ((1 - lam) * ce_local + lam * aux)


@torch.no_grad()
def evaluate(model, dataset, labels: np.ndarray, cfg: TrainConfig, collate, device, want_embeddings=False):
    """Predictions over a whole split: each rank takes a contiguous shard, results gathered in order."""
    rank, world = D.rank_and_world()
    shard = shard_indices(len(dataset), world, rank)
    loader = DataLoader(dataset.select(shard), batch_size=cfg.eval_batch_size, collate_fn=collate)
    net = unwrap(model)
    net.eval()
    preds, embs = [], []
    for batch in loader:
        with _autocast(device):
            logits, emb = net(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        preds.append(logits.argmax(1).cpu())
        if want_embeddings:
            embs.append(emb.float().cpu())
    local = (torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64),
             torch.cat(embs).numpy() if embs else None)
    parts = D.gather_objects(local)
    pred = np.concatenate([p[0] for p in parts])
    emb = np.concatenate([p[1] for p in parts if p[1] is not None]) if want_embeddings else None
    out = classification_metrics(labels, pred, int(labels.max()) + 1)
    return out, pred, emb


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _state_dict_cpu(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


@torch.no_grad()
def _encode_rows(model, dataset, rows, cfg, collate, device) -> torch.Tensor:
    """Embeddings of ``dataset`` rows (no gradient, eval mode), in row order."""
    net = unwrap(model)
    net.eval()
    out = []
    for b in DataLoader(dataset.select(list(rows)), batch_size=cfg.eval_batch_size, collate_fn=collate):
        with _autocast(device):
            out.append(net(b["input_ids"].to(device), b["attention_mask"].to(device))[1].float())
    return torch.cat(out) if out else torch.zeros(0, net.encoder.config.hidden_size, device=device)


@torch.no_grad()
def _sample_embeddings(model, dataset, cfg, collate, device, n=1024, seed=0):
    idx = np.random.default_rng(seed).permutation(len(dataset))[:n].tolist()
    sub = dataset.select(idx)
    loader = DataLoader(sub, batch_size=cfg.eval_batch_size, collate_fn=collate)
    net = unwrap(model)
    net.eval()
    out = [net(b["input_ids"].to(device), b["attention_mask"].to(device))[1].double().cpu() for b in loader]
    return torch.cat(out), torch.tensor(sub["label"])


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


def train(cfg: TrainConfig, session) -> dict:
    """Run the whole fine-tuning on this worker. Returns the final metrics (on every rank)."""
    import datasets

    datasets.disable_progress_bars()
    quiet_libraries()
    rank, world = D.rank_and_world()
    device = session.device()
    _seed_all(cfg.seed)
    t_start = time.time()
    # sys.__stdout__: Ray Train V2 patches print() to tee into its logger, which doubled every line
    log = (lambda *a: print(*a, file=sys.__stdout__, flush=True)) if rank == 0 else (lambda *a: None)

    corpus = load_corpus(cfg.benchmark, data_dir=cfg.data_dir, train_file=cfg.train_file,
                         validation_file=cfg.validation_file, test_file=cfg.test_file,
                         text_column=cfg.text_column, label_column=cfg.label_column, hf_dataset=cfg.hf_dataset,
                         max_samples={k: v for k, v in (("train", cfg.max_train), ("validation", cfg.max_eval),
                                                         ("test", cfg.max_eval)) if v} or None, seed=cfg.seed)
    C = corpus.num_classes
    tokenizer = load_tokenizer(cfg.model)
    collate = PadCollator(tokenizer.pad_token_id)
    tok_s = {}  # issue 13: seconds per split to tokenise (or load from the tokenisation cache), this rank
    t_tok = time.perf_counter()
    train_ds = full_train_ds = _dataset(corpus, "train", tokenizer, cfg)
    tok_s["train"] = time.perf_counter() - t_tok
    train_labels = true_train_labels = np.asarray(train_ds["label"])
    known_labels = true_train_labels.copy()
    if cfg.label_fraction < 1.0:
        known = known_label_subset(train_labels, cfg.label_fraction, cfg.seed)
        train_ds = train_ds.select(known.tolist())
        train_labels = train_labels[known]
        known_labels[np.setdiff1d(np.arange(len(known_labels)), known)] = -1
        log(f"[gloss-ray] low-label setting: {len(known)} of {len(corpus.splits['train'])} training labels known")
    eval_sets = {}
    for s in ("validation", "test"):
        if s in corpus.splits:
            t_tok = time.perf_counter()
            eval_sets[s] = _dataset(corpus, s, tokenizer, cfg)
            tok_s[s] = time.perf_counter() - t_tok
    log("[gloss-ray] tokenisation: " + ", ".join(f"{k} {v:.1f}s" for k, v in tok_s.items()))
    sampler = GlobalBatchSampler(train_labels.tolist(), cfg.batch_size, world, rank, seed=cfg.seed,
                                 balanced=cfg.balanced_batches)
    train_loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate)
    steps_per_epoch = len(sampler)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:                 # a bounded run (e.g. on a large corpus): the schedules end there
        total_steps = min(total_steps, cfg.max_steps)
    log(f"[gloss-ray] {corpus.name}: {len(train_ds)} train / "
        + " / ".join(f"{len(v)} {k}" for k, v in eval_sets.items())
        + f" docs, {C} classes; {world} worker(s) x batch {cfg.batch_size}; {steps_per_epoch} steps/epoch; device {device}"
        + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""))

    model = TextClassifier.from_encoder(cfg.model, C, cfg.pooling, cfg.dropout)
    model = session.prepare_model(model)
    seed_rank_streams(cfg.seed, rank)
    cw = balanced_class_weights(train_labels, C) if cfg.class_weights == "balanced" else None
    ce_fn = WeightedCrossEntropy(cw).to(device)
    aux_fn = build_aux_loss(cfg, C, cw)
    if aux_fn is not None:
        aux_fn = aux_fn.to(device)
    graph = None
    if cfg.global_k > 0:
        from ..graph.global_graph import GlobalGraph

        graph = GlobalGraph(len(full_train_ds), unwrap(model).encoder.config.hidden_size, known_labels,
                            true_train_labels, C, cfg.global_k, cfg.global_max_nodes, cfg.index, device,
                            pseudo_confidence=cfg.pseudo_confidence, seed=cfg.seed)
    lam_s = Schedule.parse(cfg.lam_schedule, default_value=cfg.lam)
    sigma_s = Schedule.parse(cfg.sigma_schedule, default_value=1.0)
    k_s = Schedule.parse(cfg.k_schedule, default_value=float(cfg.k or 16)) if cfg.k_schedule else None

    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    warm = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total_steps - s) / max(1, total_steps - warm)))

    # ---- resume -------------------------------------------------------------------------------
    state = {"epoch": 0, "global_step": 0, "history": [], "best_epoch": 0, "best_val_macro_f1": -1.0,
             "sigma": None, "skipped_steps": 0, "elapsed_s": 0.0}
    best_weights = None
    ckpt_dir = session.checkpoint_dir()
    if ckpt_dir:
        ck = Path(ckpt_dir)
        state = json.loads((ck / "state.json").read_text())
        unwrap(model).load_state_dict(load_file(ck / "model.safetensors"))
        opt = torch.load(ck / "optimizer.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        best_file = ck / "best.safetensors"
        best_weights = load_file(best_file) if best_file.exists() else _state_dict_cpu(model)
        log(f"[gloss-ray] resumed from checkpoint after epoch {state['epoch']} (step {state['global_step']})")

    # ---- sigma from the corpus (root / dicm), identical on every rank ---------------------------
    if isinstance(aux_fn, GLoss) and aux_fn.strategy.kind in ("root", "dicm"):
        if state["sigma"] is None:
            emb, lab = _sample_embeddings(model, train_ds, cfg, collate, device, seed=cfg.seed)
            state["sigma"] = D.broadcast_value(aux_fn.calibrate(emb, lab), device)
            log(f"[gloss-ray] sigma ({aux_fn.strategy.kind}) from {len(lab)} training docs: {state['sigma']:.4f}")
        aux_fn.sigma_value = state["sigma"]

    val_ds, val_labels = eval_sets["validation"], np.asarray(eval_sets["validation"]["label"])
    fail = cfg.extra.get("fail_once_after_epoch") or os.environ.get(FAIL_ENV)
    history = state["history"]
    stop = False
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        t0 = time.time()
        diag = {}
        if graph is not None and ((epoch - 1) % cfg.refresh_every == 0 or graph.neighbours is None):
            diag = graph.refresh(lambda idx: _encode_rows(model, full_train_ds, idx, cfg, collate, device), state["global_step"])
            log(f"[gloss-ray] global graph ({diag['graph_backend']}): refresh {diag['refresh_s']:.1f}s (encode "
                f"{diag['encode_s']:.1f}s, index {diag['index_s']:.2f}s, search {diag['search_s']:.2f}s), recall@{cfg.global_k} "
                f"{diag['recall_at_k']:.3f}, homophily {diag['homophily']:.3f}"
                + (f", pseudo-label acc {diag['pseudo_label_accuracy']:.3f}" if "pseudo_label_accuracy" in diag else "")
                + f"; index {graph.neighbours.index.params}, bank {diag['bank_bytes'] / 2**20:.0f} MiB, index "
                f"~{diag['index_bytes'] / 2**20:.0f} MiB, peak RSS so far {_peak_rss_kib() / 1024:.0f} MB")
        model.train()
        sampler.set_epoch(epoch)
        sums = np.zeros(4)  # total, ce, aux, steps
        it = train_loader
        if cfg.progress and rank == 0:
            from tqdm import tqdm

            it = tqdm(train_loader, total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", mininterval=5, ncols=100)
        for batch in it:
            step = state["global_step"]
            p = step / max(1, total_steps)
            ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            y = batch["labels"].to(device)
            with _autocast(device):
                logits, emb = model(ids, am)
            obj, backward_loss = step_objective(ce_fn, aux_fn, logits, emb, y, lam_s(p) if aux_fn is not None else 0.0,
                                                sigma_scale=sigma_s(p), k=int_schedule_value(k_s, p) if k_s else cfg.k,
                                                mask_seed=cfg.seed * 1_000_003 + step, batch_index=batch["index"].to(device),
                                                global_graph=graph, global_weight=cfg.global_weight)
            optimizer.zero_grad(set_to_none=True)
            if not D.all_finite(backward_loss.detach()):
                state["skipped_steps"] += 1
                log(f"[gloss-ray] non-finite loss at step {step}: skipped on all workers")
            else:
                backward_loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                if not D.all_finite(norm):  # a finite loss can still give non-finite gradients
                    optimizer.zero_grad(set_to_none=True)
                    state["skipped_steps"] += 1
                    log(f"[gloss-ray] non-finite gradient at step {step}: skipped on all workers")
                else:
                    optimizer.step()
                    scheduler.step()          # a skipped step does not advance the schedule either
                    sums += [obj.total.item(), obj.ce.item(), obj.aux.item(), 1]
            state["global_step"] += 1
            if state["global_step"] >= total_steps:
                break
        tot = D.all_sum(sums.tolist(), device)
        n = max(tot[3], 1)
        val, _, _ = evaluate(model, val_ds, val_labels, cfg, collate, device)
        epoch_time = time.time() - t0
        state["elapsed_s"] += epoch_time
        row = {"epoch": epoch, "train_loss": tot[0] / n, "train_ce": tot[1] / n, "train_aux": tot[2] / n,
               "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"], "lr": scheduler.get_last_lr()[0],
               "sigma": (aux_fn.sigma_value if isinstance(aux_fn, GLoss) else None), "lam": lam_s(state["global_step"] / max(1, total_steps)) if aux_fn else 0.0,
               "k": cfg.k, "epoch_time_s": epoch_time, "elapsed_s": state["elapsed_s"]}
        if graph is not None:
            row.update({k: v for k, v in diag.items() if k != "graph_backend"}, lookup_s=graph.take_lookup_seconds())
        history.append(row)
        improved = val["macro_f1"] > state["best_val_macro_f1"]
        if improved:
            state["best_val_macro_f1"], state["best_epoch"] = val["macro_f1"], epoch
            best_weights = _state_dict_cpu(model)
        state["epoch"] = epoch
        stop = epoch - state["best_epoch"] >= cfg.patience
        log(f"[gloss-ray] epoch {epoch}: loss {row['train_loss']:.4f} (ce {row['train_ce']:.4f}, aux {row['train_aux']:.4f}) "
            f"val acc {val['accuracy']:.4f} macro-F1 {val['macro_f1']:.4f}{' *' if improved else ''} [{epoch_time:.1f}s]")
        with tempfile.TemporaryDirectory(prefix="gloss_ray_ckpt_") as tmp:
            tmp_dir = None
            if rank == 0:
                tmp_dir = tmp
                save_file({k: v.contiguous() for k, v in _state_dict_cpu(model).items()}, Path(tmp) / "model.safetensors")
                if state["best_epoch"] != epoch:
                    save_file({k: v.contiguous() for k, v in best_weights.items()}, Path(tmp) / "best.safetensors")
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, Path(tmp) / "optimizer.pt")
                (Path(tmp) / "state.json").write_text(json.dumps(state))
            session.report({k: v for k, v in row.items() if v is not None}, tmp_dir)
        if fail and rank == 0:
            fail_epoch, marker = fail.split(":", 1)
            if int(fail_epoch) == epoch and not os.path.exists(marker):
                Path(marker).write_text("failed once\n")
                raise RuntimeError(f"{FAIL_ENV}: simulated worker failure after epoch {epoch}")
        if stop and epoch < cfg.epochs:
            log(f"[gloss-ray] early stop: no validation macro-F1 gain for {cfg.patience} epoch(s)")
            break
        if state["global_step"] >= total_steps and epoch < cfg.epochs:
            log(f"[gloss-ray] stop: --max-steps {cfg.max_steps} reached in epoch {epoch}")
            break

    # ---- test with the best weights -------------------------------------------------------------
    unwrap(model).load_state_dict(best_weights)
    final = {"benchmark": corpus.name, "loss": cfg.loss, "seed": cfg.seed, "best_epoch": state["best_epoch"],
             "best_val_macro_f1": state["best_val_macro_f1"], "epochs_run": state["epoch"],
             "skipped_steps": state["skipped_steps"], "num_workers": world, "device": device.type,
             "cpu_threads": torch.get_num_threads(),
             "global_graph": cfg.global_k > 0, "label_fraction": cfg.label_fraction,
             "num_classes": C, "train_docs": len(train_ds), "tokenize_s": tok_s}
    test_emb = test_labels = None
    if "test" in eval_sets:
        test_ds = eval_sets["test"]
        test_labels = np.asarray(test_ds["label"])
        test, _, test_emb = evaluate(model, test_ds, test_labels, cfg, collate, device, want_embeddings=True)
        final.update(test_accuracy=test["accuracy"], test_macro_f1=test["macro_f1"])
        final["silhouette"] = silhouette(test_emb, test_labels, seed=cfg.seed) if rank == 0 else None
    # issue 13: each worker's peak resident memory (ru_maxrss: KiB on Linux), in rank order
    final["peak_rss_mb_per_worker"] = [r / 1024 for r in D.gather_objects(_peak_rss_kib())]
    final["train_wall_time_s"] = state["elapsed_s"]
    final["wall_time_s"] = time.time() - t_start
    if rank == 0:
        write_outputs(cfg, session.run_dir, final, history, model, tokenizer, corpus.label_names, test_emb, test_labels)
        log(f"[gloss-ray] done: test acc {final.get('test_accuracy', float('nan')):.4f} macro-F1 "
            f"{final.get('test_macro_f1', float('nan')):.4f} (best epoch {state['best_epoch']}); outputs in {session.run_dir}")
    D.barrier()
    return final


def write_outputs(cfg, run_dir, final, history, model, tokenizer, label_names, test_emb, test_labels) -> None:
    import csv

    from .. import plots
    from ..model_card import write_model_card
    from ..storage import staged_output

    final = {**final, "config": cfg.to_dict(), "stage": cfg.extra.get("stage", "final")}
    with staged_output(run_dir) as out:
        (out / "metrics.json").write_text(json.dumps(final, indent=2, default=float))
        with open(out / "history.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in history for k in row)))
            w.writeheader()
            w.writerows(history)
        (out / "plots").mkdir()
        title = f"{final['benchmark']} / {cfg.loss} (seed {cfg.seed})"
        plots.training_curves(history, out / "plots", title)
        if test_emb is not None:
            plots.embedding_map(test_emb, test_labels, label_names, out / "plots", f"test embeddings: {title}")
        # a transformers classifier + a sentence-transformers model + its card (see gloss_ray.model)
        unwrap(model).save_pretrained(out / "model", tokenizer, label_names,
                                      {"best_epoch": final["best_epoch"], "loss": cfg.loss, "benchmark": final["benchmark"]},
                                      max_length=cfg.max_length)
        write_model_card(out / "model", cfg, final, label_names)
