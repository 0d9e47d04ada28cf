"""The end of a run: the best weights score the test split, and rank 0 writes the run's folder::

    metrics.json   test accuracy / macro-F1, silhouette, best epoch, timings, memory, the config
    history.csv    one row per epoch (losses, validation scores, lr, sigma, lam, global-graph figures)
    steps.csv      one row every ``log_every`` optimiser steps (loss and its parts, learning rates,
                   lambda, sigma and k as scheduled at that step, documents/s)
    plots/         training curves and a 2-D map of the test embeddings
    model/         a transformers classifier + sentence-transformers model + model card (+ with
                   ``graph_predict``: graph_predict.safetensors / .json, see :mod:`gloss_ray.graph.predict`)

With ``graph_predict`` (issue 25) validation and test are scored three ways -- classifier, propagation
over the training corpus, and their blend with alpha and k chosen on validation -- into metrics.json
(:func:`graph_prediction`).
"""
from __future__ import annotations

import csv
import json
import time

import numpy as np
import torch

from .. import distributed as D
from .. import plots
from ..losses.sigma import SigmaStrategy
from ..metrics import silhouette
from ..model import unwrap
from ..model_card import write_model_card
from ..schedules import Schedule
from ..storage import redact, staged_output
from .session import peak_rss_kib


def finish(cfg, session, model, data, state: dict, device, t_start: float, log, test, trackers=None) -> dict:
    """Score the test split with ``test(dataset) -> (metrics, predictions, embeddings)``, gather the
    run's figures, write the outputs (rank 0) and hand the final scores and the report files to the
    run's ``trackers`` (:mod:`gloss_ray.train.tracking`); returns the final metrics on every rank."""
    rank, world = D.rank_and_world()
    final = {"benchmark": data.corpus.name, "loss": cfg.loss, "seed": cfg.seed, "best_epoch": state["best_epoch"],
             "best_val_macro_f1": state["best_val_macro_f1"], "epochs_run": state["epoch"],
             "skipped_steps": state["skipped_steps"], "num_workers": world, "device": device.type,
             "cpu_threads": torch.get_num_threads(), "global_graph": cfg.global_k > 0,
             "label_fraction": cfg.label_fraction, "num_classes": data.corpus.num_classes,
             "train_docs": data.train_docs, "tokenize_s": data.tokenize_s,
             "data_loader": cfg.data_loader}
    test_emb = test_labels = None
    if "test" in data.eval_splits:
        scores, _, test_emb, test_labels = test("test")
        final.update(test_accuracy=scores["accuracy"], test_macro_f1=scores["macro_f1"])
        final["silhouette"] = silhouette(test_emb, test_labels, seed=cfg.seed) if rank == 0 else None
    graph, graph_scores = graph_prediction(cfg, model, data, state, device, log)
    final.update(graph_scores)
    final.update(state.get("throughput", {}))     # run-level tokens/s, docs/s, MFU (gloss_ray.throughput)
    # each worker's peak resident memory (ru_maxrss: KiB on Linux), in rank order
    final["peak_rss_mb_per_worker"] = [r / 1024 for r in D.gather_objects(peak_rss_kib())]
    final["train_wall_time_s"] = state["elapsed_s"]
    final["wall_time_s"] = time.time() - t_start
    if rank == 0:
        write_outputs(cfg, session.run_dir, final, state["history"], model, data.tokenizer, data.corpus.label_names,
                      test_emb, test_labels, graph, steps=state.get("steps", []), trackers=trackers, step=state["global_step"])
        log(f"done: test acc {final.get('test_accuracy', float('nan')):.4f} macro-F1 "
            f"{final.get('test_macro_f1', float('nan')):.4f} (best epoch {state['best_epoch']}); "
            f"outputs in {session.run_dir}")
    D.barrier()
    return final


SHORT_RUN_SETTINGS = "--lr 1e-4 --head-lr 3e-3"   # the README's first command: 3,000 MR documents, 1 epoch -> 0.79


def chance_note(metrics: dict) -> str | None:
    """One line when a run ended at chance -- macro-F1 (test, else best validation) within a tenth
    of the way from 1/classes (a uniform guess) to 1 -- suggesting the short-run learning rates; else None."""
    f1 = metrics.get("test_macro_f1", metrics.get("best_val_macro_f1"))
    k = metrics.get("num_classes") or 0
    if not isinstance(f1, (int, float)) or k < 2 or f1 > 1 / k + 0.1 * (1 - 1 / k):
        return None
    return (f"note: macro-F1 {f1:.3f} is at chance for {k} classes (1/{k} = {1 / k:.3f}): the model "
            f"learned little. Short runs (a few thousand documents, an epoch or two) need higher learning "
            f"rates than the defaults, e.g. {SHORT_RUN_SETTINGS}")


def write_rows(path, rows: list[dict]) -> None:
    """``rows`` as CSV, the columns in the order they first appear."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        w.writeheader()
        w.writerows(rows)


def write_outputs(cfg, run_dir, final, history, model, tokenizer, label_names, test_emb, test_labels,
                  graph=None, steps=(), trackers=None, step: int = 0) -> None:
    final = redact({**final, "config": cfg.to_dict(), "stage": cfg.stage or "final"})  # no credentials
    with staged_output(run_dir) as out:
        (out / "metrics.json").write_text(json.dumps(final, indent=2, default=float))
        write_rows(out / "history.csv", history)
        if steps:
            write_rows(out / "steps.csv", list(steps))
        (out / "plots").mkdir()
        title = f"{final['benchmark']} / {cfg.loss} (seed {cfg.seed})"
        plots.training_curves(history, out / "plots", title)
        if test_emb is not None:
            plots.embedding_map(test_emb, test_labels, label_names, out / "plots", f"test embeddings: {title}")
        # a transformers classifier + a sentence-transformers model + its card (see gloss_ray.model)
        unwrap(model).save_pretrained(out / "model", tokenizer, label_names,
                                      {"best_epoch": final["best_epoch"], "loss": cfg.loss, "benchmark": final["benchmark"]},
                                      max_length=cfg.max_length)
        if graph is not None:                # beside the model, read by gloss_ray.graph.predict.load_graph_predictor
            graph.save(out / "model")
        write_model_card(out / "model", cfg, final, label_names)
        if trackers:
            trackers.log_metrics({k: v for k, v in final.items() if k.startswith(("test_", "best_", "silhouette",
                                                                                "train_", "graph_"))},
                                 step)
            names = ["metrics.json", "history.csv", "steps.csv", "plots"] + (["model"] if cfg.log_model else [])
            trackers.log_artifacts({n: out / n for n in names if (out / n).exists()})


# ---------------------------------------------------------------------------------------------- graph prediction
def prediction_sigma(cfg, calibrated: float | None, train_emb: np.ndarray, train_labels: np.ndarray,
                     seed: int) -> tuple[float, str]:
    """The kernel width graph prediction uses, and where it came from: G-Loss's own sigma where the run
    had one for the whole run (a fixed value, or the ``root`` / ``dicm`` value calibrated before training),
    times the sigma schedule's multiplier at the end of training; otherwise (the ``batch`` strategies,
    other losses) the same heuristic on 1024 of the final training embeddings (``root`` unless
    ``batch-dicm``), as the loss would compute it on a batch."""
    strategy = SigmaStrategy.parse(cfg.sigma) if cfg.loss == "gloss" else SigmaStrategy("batch")
    scale = Schedule.parse(cfg.sigma_schedule, default_value=1.0)(1.0) if cfg.loss == "gloss" else 1.0
    base = strategy.value if strategy.kind == "fixed" else calibrated if strategy.kind in ("root", "dicm") else None
    if base is not None:
        return float(base) * scale, f"G-Loss's ({strategy.kind})" + (f" x schedule end {scale:g}" if scale != 1 else "")
    rows = np.sort(np.random.default_rng(seed).permutation(len(train_emb))[:1024])
    heuristic = SigmaStrategy(strategy.batch_heuristic)
    sigma = heuristic.initial(torch.as_tensor(train_emb[rows]).double(), torch.as_tensor(train_labels[rows]))
    return float(sigma) * scale, f"{strategy.batch_heuristic} of {len(rows)} final training embeddings"


def graph_prediction(cfg, model, data, state: dict, device, log):
    """With ``cfg.graph_predict``: encode the training documents (those with known labels) and every
    evaluation split with the final (best) weights -- each rank its shard, gathered as :func:`evaluate`
    does -- then, on rank 0, score the splits by classifier, graph and blend
    (:func:`gloss_ray.graph.predict.score_splits`: alpha and k chosen on validation only). Returns
    ``(GraphPredictor to save, metrics)`` on rank 0, ``(None, {})`` elsewhere and when off."""
    if not getattr(cfg, "graph_predict", False):
        return None, {}
    from ..graph.predict import GraphPredictor, SplitOutputs, score_splits

    rank, world = D.rank_and_world()
    t0 = time.perf_counter()

    train_emb, train_labels = (lambda o: (o[1], o[2]))(data.outputs(model, "train", device))
    splits = {name: SplitOutputs(*data.outputs(model, name, device)) for name in data.eval_splits}
    encode_s = time.perf_counter() - t0
    if rank != 0:
        return None, {}
    sigma, source = prediction_sigma(cfg, state.get("sigma"), train_emb, train_labels, cfg.seed)
    graph = GraphPredictor(train_emb, train_labels, data.corpus.num_classes, sigma,
                           transductive=cfg.graph_transductive)
    scores = score_splits(graph, splits)
    scores.update(graph_predict=True, graph_sigma_source=source, graph_encode_s=encode_s)
    parts = [f"{s} {how} {scores[f'{p}_{how}_macro_f1']:.4f}" for s, p in (("val", "val"), ("test", "test"))
             for how in ("classifier", "graph", "blend") if f"{p}_{how}_macro_f1" in scores]
    log(f"graph prediction ({'transductive' if graph.transductive else 'inductive'}, "
        f"{len(train_labels)} training docs, sigma {sigma:.4f} from {source}): graph k {graph.graph_k}, blend "
        f"alpha {graph.alpha:g} k {graph.k} (chosen on validation); macro-F1 " + ", ".join(parts)
        + f" [{encode_s:.1f}s encode, {scores['graph_predict_s']:.1f}s graph]")
    return graph, scores
