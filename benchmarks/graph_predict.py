"""Graph prediction vs the classifier on finished runs (issue 25, item 4): classifier, propagation over the
training corpus, and their blend (alpha, k chosen on validation only), per run and paired over seeds.

    export GLOSS_RAY_DATA=<folder holding <name>/{train,validation,test}.parquet>
    python benchmarks/graph_predict.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/graph_predict_mr.json
    python benchmarks/graph_predict.py runs/mr-*-seed* --transductive --device cuda --out ...
    python benchmarks/graph_predict.py docs/results/graph_predict_full_mr/runs/mr/ce \
        benchmarks/results/graph_predict_full_mr_gloss_tuned.json --out benchmarks/results/graph_predict_full_mr.json

A RUN_DIR is a finished run's folder (``metrics.json``, ``history.csv``, ``model/`` in the saved HF
format); a folder holding several is searched for ``*/metrics.json``. Each run is scored with the same
code the training loop runs at its end with ``--graph-predict``
(:func:`gloss_ray.train.outputs.graph_prediction`): the run's own config (corpus, ``max_train`` /
``max_eval``, label fraction, ``max_length``, loss and sigma), its saved weights, sigma as the run's
G-Loss used it (calibrated value from ``history.csv``; ``root`` of the final embeddings for CE and the
batch strategies). ``--data-dir`` replaces the run's data folder (a run trained on another machine).
A run trained with ``--graph-predict`` already holds these scores in its metrics.json: they are read,
not computed again. An argument ending in ``.json`` is an earlier output of this script: its runs' rows
are taken as they are.

Writes one JSON: per run the scores (``{val,test}_{classifier,graph,blend}_{accuracy,macro_f1}``, the
chosen ``graph_k``/``graph_blend_alpha``/``graph_blend_k``, the validation grid), the extra wall time
(encoding train + validation + test, and the graph part alone) and the process's peak RSS; then per
benchmark x loss the paired differences graph - classifier and blend - classifier on test macro-F1 and
accuracy (mean, bootstrap 95% CI, paired t-test: :func:`gloss_ray.report.stats.paired_difference`); and
where a benchmark has CE runs beside another loss's, the difference of those differences, paired by seed
(``(blend - classifier) of the loss - (blend - classifier) of CE``): does graph prediction help that
loss's models more than CE's?
``--save`` also writes the graph files into each run's model folder (off by default: runs are left as
they are).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gloss_ray.config import TrainConfig  # noqa: E402
from gloss_ray.log import say  # noqa: E402
from gloss_ray.model import TextClassifier  # noqa: E402
from gloss_ray.report.stats import paired_difference  # noqa: E402
from gloss_ray.train.inputs import load_worker_data  # noqa: E402
from gloss_ray.train.outputs import graph_prediction  # noqa: E402
from gloss_ray.train.session import peak_rss_kib, quiet_libraries  # noqa: E402


def run_dirs(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if (p / "metrics.json").is_file():
            out.append(p)
        else:
            out.extend(sorted(m.parent for m in p.glob("*/metrics.json")))
    if paths and not out:
        raise SystemExit(f"no run folder (with metrics.json) in {paths}")
    return out


def calibrated_sigma(run: Path) -> float | None:
    """The sigma the run's G-Loss used (history.csv's last ``sigma``; None for CE and the batch strategies)."""
    hist = run / "history.csv"
    if not hist.is_file():
        return None
    rows = list(csv.DictReader(hist.open()))
    value = rows[-1].get("sigma") if rows else None
    return float(value) if value not in (None, "", "None") else None


def score_run(run: Path, args) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    if metrics.get("graph_predict") and not args.transductive and not args.save:   # scored at the run's end
        return {"run": str(run), "benchmark": metrics["benchmark"], "loss": metrics["loss"], "seed": metrics["seed"],
                "run_test_accuracy": metrics.get("test_accuracy"), "run_test_macro_f1": metrics.get("test_macro_f1"),
                "scored_by": "the run (metrics.json)",
                **{k: v for k, v in metrics.items() if k.startswith(("graph_", "val_", "test_"))
                   and k not in ("test_accuracy", "test_macro_f1")}}
    conf = dict(metrics["config"])
    conf.update(model=str(run / "model"), graph_predict=True, graph_transductive=args.transductive,
                progress=False, **({"data_dir": args.data_dir} if args.data_dir else {}))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig.from_dict({k: v for k, v in conf.items() if k in known}, source=str(run / "metrics.json"))
    device = torch.device(args.device)
    t0 = time.perf_counter()
    data = load_worker_data(cfg, 0, 1, say)
    model = TextClassifier.from_pretrained(run / "model").to(device)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    graph, scores = graph_prediction(cfg, model, data, {"sigma": calibrated_sigma(run)}, device, say)
    scoring_s = time.perf_counter() - t1
    if args.save:
        graph.save(run / "model")
    return {"run": str(run), "benchmark": metrics["benchmark"], "loss": metrics["loss"], "seed": metrics["seed"],
            "run_test_accuracy": metrics.get("test_accuracy"), "run_test_macro_f1": metrics.get("test_macro_f1"),
            **scores, "load_s": load_s, "scoring_wall_s": scoring_s,
            "graph_bytes": int(graph.embeddings.numel() * 2 + graph.labels.numel() * 8),   # as saved (float16)
            "peak_rss_mb": peak_rss_kib() / 1024}


def summary(rows: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["benchmark"], r["loss"])].append(r)
    out = []
    gain = lambda rs, how, metric: {r["seed"]: r[f"test_{how}_{metric}"] - r[f"test_classifier_{metric}"]  # noqa: E731
                                    for r in rs}
    for (bench, loss), rs in sorted(groups.items()):
        for metric in ("macro_f1", "accuracy"):
            base = {r["seed"]: r[f"test_classifier_{metric}"] for r in rs}
            for how in ("graph", "blend"):
                d = paired_difference({r["seed"]: r[f"test_{how}_{metric}"] for r in rs}, base)
                out.append({"benchmark": bench, "loss": loss, "metric": f"test_{metric}",
                            "comparison": f"{how} - classifier", **d})
                if loss != "ce" and (bench, "ce") in groups:     # does it help this loss more than CE?
                    d = paired_difference(gain(rs, how, metric), gain(groups[(bench, "ce")], how, metric))
                    out.append({"benchmark": bench, "loss": f"{loss} vs ce", "metric": f"test_{metric}",
                                "comparison": f"({how} - classifier) - same for ce", **d})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders, or folders holding run folders")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (encoding; the graph runs on CPU)")
    ap.add_argument("--data-dir", default=None, help="the benchmarks' folder, instead of the runs' own")
    ap.add_argument("--transductive", action="store_true", help="validation and test documents join the graph")
    ap.add_argument("--save", action="store_true", help="write the graph files into each run's model folder")
    args = ap.parse_args()
    quiet_libraries()
    rows = []
    for earlier in (p for p in args.runs if p.endswith(".json")):
        rows.extend(json.loads(Path(earlier).read_text())["runs"])
    for run in run_dirs([p for p in args.runs if not p.endswith(".json")]):
        print(f"== {run}", flush=True)
        rows.append(score_run(run, args))
    result = {"command": " ".join(sys.argv), "machine": platform.node(), "device": args.device,
              "torch_threads": torch.get_num_threads(), "transductive": args.transductive,
              "runs": rows, "paired": summary(rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    for d in result["paired"]:
        ci = "n/a" if d["ci_low"] is None else f"[{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]"
        mean = "n/a" if d["mean_diff"] is None else f"{100 * d['mean_diff']:+.2f}"
        print(f"{d['benchmark']:8s} {d['loss']:14s} {d['metric']:16s} {d['comparison']:36s} "
              f"{mean} pp, 95% CI {ci} ({d['n_pairs']} seeds)")
    print(args.out)


if __name__ == "__main__":
    main()
