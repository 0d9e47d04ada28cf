"""The report's document and results files: ``report.md`` (figures linked from ``figures/``), a
self-contained ``report.html`` (inline CSS, figures as base64 data URIs, no script and no external
reference), ``results.csv`` (one row per benchmark x key) and ``results.json`` (everything, numbers
unrounded, non-finite numbers as ``null``). Percentages are for display only."""
from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .collect import Results, key_rank, search_methods
from .figures import Drawn, bench_label, value_label
from .stats import GRAPH_METRICS, METRICS, THROUGHPUT_METRICS, Summary

TITLE = "gloss-ray experiment report"
PAPER_CITATION = "G-Loss paper (arXiv 2604.25853), Table: G-Loss test accuracy"
PAPER_ACCURACY = {  # test accuracy (%) of G-Loss as published, per encoder
    "BERT-base": {"mr": 87.14, "r8": 98.04, "r52": 96.48, "ohsumed": 71.48, "20ng": 85.13},
    "RoBERTa-large": {"mr": 90.82, "r8": 98.18, "r52": 96.65, "ohsumed": 75.76, "20ng": 85.33},
}


def write(results: Results, summary: Summary, drawn: Drawn, out: Path) -> dict[str, Path]:
    """Lay the report out and write it with the results files; ``{name relative to out: path}``
    of every file written, figures included."""
    doc = _Doc()
    benches = results.benchmarks
    _intro(doc, results, summary)
    _test_results(doc, summary, benches)
    _graph_prediction(doc, summary)
    _throughput(doc, summary)
    _convergence(doc, summary, drawn, benches)
    _search(doc, results, summary, drawn, benches)
    _embeddings(doc, summary, drawn, benches)
    _skipped(doc, results.skipped)
    csv_path, json_path = write_results(summary.rows, out, _payload(results, summary))
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(doc.markdown(out), encoding="utf-8")
    html_path.write_text(doc.html(TITLE), encoding="utf-8")
    written = [md_path, html_path, csv_path, json_path, *drawn.written]
    return {p.relative_to(out).as_posix(): p for p in written}


# --------------------------------------------------------------------------- formatting
def fmt(v: Any, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def pct(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _pp(v: float | None) -> str:
    """A difference (fraction) in percentage points, signed."""
    return "n/a" if v is None else f"{100 * v:+.2f}"


# --------------------------------------------------------------------------- sections
def _intro(doc: _Doc, results: Results, summary: Summary) -> None:
    doc.h(1, TITLE)
    doc.p(f"Results from {results.dir}: {len(results.runs)} runs (stage final/bench), "
          f"{len(summary.rows)} benchmark x loss rows, {len(results.trials)} search trials. "
          "Test metrics in %, mean ± sample std over seeds.")


def _test_results(doc: _Doc, summary: Summary, benches: list[str]) -> None:
    """Test accuracy of every key on every benchmark (with the paper's), then per benchmark."""
    rows = summary.rows
    doc.h(2, "Test results")
    doc.p("Paper rows are the published G-Loss test accuracy, quoted from the "
          f"{PAPER_CITATION}; they are the paper's numbers with the paper's encoder, not ours.")
    overview = [[k] + [next((pct(r["test_accuracy_mean"], r["test_accuracy_std"]) for r in rows
                             if r["benchmark"] == b and r["key"] == k), "") for b in benches]
                for k in sorted({r["key"] for r in rows}, key=key_rank)]
    overview += [[f"G-Loss, paper ({enc})"] + [fmt(acc.get(b)) for b in benches]
                 for enc, acc in PAPER_ACCURACY.items()]
    doc.table(["Test accuracy (%)"] + [bench_label(b) for b in benches], overview,
              quoted=len(PAPER_ACCURACY))
    for bench in benches:
        brows = [r for r in rows if r["benchmark"] == bench]
        if brows:
            _bench_results(doc, bench, brows, [d for d in summary.diffs if d["benchmark"] == bench])


def _bench_results(doc: _Doc, bench: str, brows: list[dict], diffs: list[dict]) -> None:
    """One benchmark's rows (with the paper's) and their paired differences."""
    doc.h(3, bench_label(bench))
    table = [[r["key"], r["encoder"] or "", r["n_seeds"], ", ".join(map(str, r["seeds"])),
              pct(r["test_accuracy_mean"], r["test_accuracy_std"]),
              pct(r["test_macro_f1_mean"], r["test_macro_f1_std"]),
              pct(r["best_val_macro_f1_mean"], r["best_val_macro_f1_std"])] for r in brows]
    table += [[f"G-Loss, paper ({enc})", enc, "", "", fmt(acc.get(bench)), "", ""]
              for enc, acc in PAPER_ACCURACY.items() if bench in acc]
    doc.table(["Loss", "Encoder", "n", "Seeds", "Test acc. (%)", "Test macro-F1 (%)",
               "Best val macro-F1 (%)"], table, quoted=len(table) - len(brows))
    if not diffs:
        return
    doc.p("Differences (loss - baseline, percentage points; the baseline is CE, and for a "
          "global-graph row also the same loss without the global graph), paired by seed: "
          "bootstrap 95% CI of the mean difference and paired t-test (scipy.stats.ttest_rel).")
    doc.table(["Loss", "vs", "Metric", "Pairs", "Mean diff (pp)", "95% CI (pp)", "t", "p", "Note"],
              [[d["key"], d["baseline"], d["metric"], d["n_pairs"], _pp(d["mean_diff"]),
                "n/a" if d["ci_low"] is None else f"[{_pp(d['ci_low'])}, {_pp(d['ci_high'])}]",
                fmt(d["t_stat"], ".3f"), fmt(d["p_value"], ".4f"), d["note"]] for d in diffs])


def _graph_prediction(doc: _Doc, summary: Summary) -> None:
    """Runs trained with ``graph_predict`` (issue 25): test macro-F1 of the classifier, of propagation over
    the training corpus and of their blend (alpha, k chosen on validation). No section without such runs."""
    rows = [r for r in summary.rows if r.get("test_graph_macro_f1_n")]
    if not rows:
        return
    doc.h(2, "Graph prediction")
    doc.p("Test macro-F1 (%) of the same models scored three ways: the classifier head, label propagation over "
          "the training corpus's kNN graph (the loss's kernel and sigma), and the blend "
          "alpha x classifier + (1 - alpha) x graph; alpha and k chosen on validation only (mean over seeds).")
    doc.table(["Benchmark", "Loss", "n", "Classifier", "Graph", "Blend", "alpha", "k (blend)"],
              [[bench_label(r["benchmark"]), r["key"], r["test_graph_macro_f1_n"],
                pct(r.get("test_classifier_macro_f1_mean"), r.get("test_classifier_macro_f1_std")),
                pct(r["test_graph_macro_f1_mean"], r["test_graph_macro_f1_std"]),
                pct(r.get("test_blend_macro_f1_mean"), r.get("test_blend_macro_f1_std")),
                fmt(r.get("graph_blend_alpha_mean")), fmt(r.get("graph_blend_k_mean"), ".1f")] for r in rows])


def _throughput(doc: _Doc, summary: Summary) -> None:
    """Training throughput of runs that measured it (issue 26): real (non-padding) tokens/s and documents/s
    over all workers, model-FLOPs utilisation against the device's peak, and the padding share of the tokens
    computed. No section without such runs."""
    rows = [r for r in summary.rows if r.get("train_mfu_n")]
    if not rows:
        return
    doc.h(2, "Training throughput")
    doc.p("Mean over seeds of each run's training epochs: real (non-padding) tokens/s and documents/s summed over "
          "the workers; MFU = model FLOPs per second / (the device's peak x workers); the peak is a matmul probe "
          "on CPU or a table entry for known GPUs; padding = share of computed tokens that were padding.")
    doc.table(["Benchmark", "Loss", "n", "tokens/s", "docs/s", "MFU (%)", "padding (%)", "peak GFLOP/s"],
              [[bench_label(r["benchmark"]), r["key"], r["train_mfu_n"], fmt(r.get("train_tokens_per_s_mean"), ".0f"),
                fmt(r.get("train_docs_per_s_mean"), ".1f"), pct(r.get("train_mfu_mean"), r.get("train_mfu_std")),
                pct(r.get("train_padding_mean")),
                fmt((r.get("device_peak_flops_mean") or 0) / 1e9 or None, ".1f")] for r in rows])


def _convergence(doc: _Doc, summary: Summary, drawn: Drawn, benches: list[str]) -> None:
    doc.h(2, "Convergence")
    if not summary.convergence:
        doc.p("No history.csv with epoch and val_macro_f1 columns found.")
    for bench in benches:
        crow = [c for c in summary.convergence if c["benchmark"] == bench]
        if not crow:
            continue
        doc.h(3, bench_label(bench))
        if bench in drawn.val_f1:
            doc.img(drawn.val_f1[bench], f"{bench_label(bench)}: validation macro-F1 vs epoch "
                                         "and wall time")
        doc.table(["Loss", "Runs", "Epochs to 99% of best val macro-F1", "Time to 99% (s)"],
                  [[c["key"], c["n_runs"], f"{c['epochs_to_99']:.2f}",
                    fmt(c["time_to_99_s"], ".1f")] for c in crow])


def _search(doc: _Doc, results: Results, summary: Summary, drawn: Drawn, benches: list[str]) -> None:
    doc.h(2, "Hyper-parameter search")
    if not results.trials:
        doc.p("No trials.json found.")
        return
    _methods(doc, search_methods(results.trials))
    _search_tables(doc, summary)
    doc.h(3, "Hyper-parameter effects")
    for bench in benches:
        if bench in drawn.search:
            doc.img(drawn.search[bench], f"{bench_label(bench)}: hyper-parameters vs best "
                                         "validation macro-F1 (errored trials excluded)")


def _methods(doc: _Doc, methods: list[dict]) -> None:
    """Which Ray Tune search algorithm and trial scheduler each search used (``gloss-ray tune
    --search-alg / --scheduler``; "none": a space of constants, one trial)."""
    doc.table(["Benchmark", "Loss", "Search algorithm", "Scheduler"],
              [[m["benchmark"], m["loss"], m["search_alg"], m["scheduler"]] for m in methods])


def _search_tables(doc: _Doc, summary: Summary) -> None:
    """Device-hours, trials by status, the best configurations and the errors."""
    search, run_hours = summary.search, summary.run_hours
    doc.p("Device-hours = sum(time_s x num_workers) / 3600.")
    devices = sorted(set(search["hours_by_device"]) | set(run_hours))
    doc.table(["Device", "Search hours", "Final/bench run hours"],
              [[d, f"{search['hours_by_device'].get(d, 0.0):.3f}", f"{run_hours.get(d, 0.0):.3f}"]
               for d in devices])
    doc.table(["Benchmark", "Loss", "Trials", "Terminated", "Stopped early", "Errored", "Not finished", "Hours"],
              [[c["benchmark"], c["loss"], c["trials"], c["terminated"], c["stopped_early"],
                c["errored"], c["other"], f"{sum(c['hours_by_device'].values()):.3f}"] for c in search["counts"]])
    if any(c["other"] for c in search["counts"]):
        doc.p("Not finished: trials of a search that is still running or was interrupted (the same "
              "`gloss-ray tune` command resumes it); the best configuration below is the best so far.")
    doc.h(3, "Best configuration per benchmark and loss")
    doc.table(["Benchmark", "Loss", "Trial", "Search objective", "Best val macro-F1 (%)", "Searched parameters"],
              [[b["benchmark"], b["loss"], b["trial_id"], f"{b['metric']} ({b['mode']}) {b['best_metric']:.4f}",
                pct(b["best_val_macro_f1"]),
                ", ".join(f"{k}={value_label(k, b['config'].get(k))}" for k in b["searched"])
                or "(none varied)"] for b in search["best"]])
    _effects(doc, search.get("effects", []))
    if search["errors"]:
        doc.h(3, "Errored trials")
        doc.table(["Benchmark", "Loss", "Trial", "Error"],
                  [[x["benchmark"], x["loss"], x["trial_id"], " ".join(str(x["error"]).split())[:300]]
                   for x in search["errors"]])


def _effects(doc: _Doc, effects: list[dict]) -> None:
    """Which searched parameters mattered (:mod:`gloss_ray.report.importance`)."""
    if not effects:
        return
    doc.h(3, "Which parameters mattered")
    for e in effects:
        n = e["effects"][0]["n"]
        doc.p(f"{bench_label(e['benchmark'])} x {e['loss']}: every trial scored by its validation macro-F1 "
              f"after epoch {e['epoch']} (the epoch every trial of an ASHA search reaches), {n} trials. "
              "Importance: Optuna's fANOVA share of the variance (sums to 1); effect: mean score per "
              "value, best first, or the Spearman correlation of a numeric parameter with the score. "
              f"With {n} trials these are indications, not measurements.")
        doc.table(["Parameter", "fANOVA importance", "Effect"],
                  [[x["param"], "n/a" if x["importance"] is None else f"{x['importance']:.2f}",
                    _effect_text(x)] for x in e["effects"]])


def _effect_text(x: dict) -> str:
    if x["kind"] == "numeric":
        rho = "n/a" if x["spearman"] is None else f"{x['spearman']:+.2f}"
        return f"Spearman {rho} over [{x['range'][0]:.3g}, {x['range'][1]:.3g}]"
    return ", ".join(f"{v['value']} {100 * v['mean']:.2f} (n={v['n']})" for v in x["levels"])


def _embeddings(doc: _Doc, summary: Summary, drawn: Drawn, benches: list[str]) -> None:
    doc.h(2, "Embedding quality")
    sil = [r for r in summary.rows if r["silhouette_n"]]
    if sil:
        doc.table(["Benchmark", "Loss", "Silhouette", "n"],
                  [[bench_label(r["benchmark"]), r["key"],
                    fmt(r["silhouette_mean"], ".4f") + ("" if r["silhouette_std"] is None
                                                        else f" ± {r['silhouette_std']:.4f}"),
                    r["silhouette_n"]] for r in sil])
    else:
        doc.p("No silhouette scores in metrics.json.")
    for r, path in drawn.embeddings:
        doc.img(path, f"{bench_label(r.m['benchmark'])}, {r.key}, seed {r.m['seed']}: 2-D embedding map")
    for bench in benches:
        if bench in drawn.homophily:
            doc.img(drawn.homophily[bench], f"{bench_label(bench)}: global-graph homophily vs epoch")


def _skipped(doc: _Doc, skipped: list[tuple[str, str]]) -> None:
    if skipped:
        doc.h(2, "Skipped files")
        doc.table(["File", "Reason"], [[p, " ".join(why.split())[:300]] for p, why in skipped])


# --------------------------------------------------------------------------- results files
def _payload(results: Results, summary: Summary) -> dict:
    """Everything in results.json."""
    return {"results_dir": str(results.dir), "std_ddof": 1, "results": summary.rows,
            "differences": summary.diffs, "convergence": summary.convergence,
            "search": {**summary.search, "methods": search_methods(results.trials)},
            "run_hours_by_device": dict(summary.run_hours),
            "paper": {"citation": PAPER_CITATION, "test_accuracy_percent": PAPER_ACCURACY},
            "runs": [{"dir": str(r.dir), "key": r.key, **{k: r.m.get(k) for k in (
                "benchmark", "loss", "seed", "stage", "device", "num_workers", *METRICS)},
                **{k: r.m[k] for k in GRAPH_METRICS + THROUGHPUT_METRICS if k in r.m}}
                for r in results.runs],
            "skipped": [{"path": p, "reason": why} for p, why in results.skipped]}


def write_results(rows: list[dict], out: Path, payload: dict) -> tuple[Path, Path]:
    """results.csv (the rows; lists joined with ``;``, None empty) and results.json (payload)."""
    csv_path, json_path = out / "results.csv", out / "results.json"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (";".join(map(str, v)) if isinstance(v, list) else
                            "" if v is None else v) for k, v in r.items()})
    json_path.write_text(json.dumps(_clean(payload), indent=2, allow_nan=False, default=str) + "\n",
                         encoding="utf-8")
    return csv_path, json_path


def _clean(v: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None, Paths to str."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v) if isinstance(v, Path) else v


# --------------------------------------------------------------------------- document
class _Doc:
    """A tiny document model rendered both as Markdown and as self-contained HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list], quoted: int = 0):
        """A table; its last ``quoted`` rows are figures quoted from elsewhere (set apart)."""
        self.blocks.append(("table", headers, [[str(c) for c in r] for r in rows], quoted))

    def img(self, path: Path, alt: str):
        self.blocks.append(("img", path, alt))

    def markdown(self, out: Path) -> str:
        lines = []
        cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        for b in self.blocks:
            if b[0] == "h":
                lines += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                lines += [b[1], ""]
            elif b[0] == "table":
                lines += ["| " + " | ".join(map(cell, b[1])) + " |",
                          "|" + "---|" * len(b[1])]
                lines += ["| " + " | ".join(map(cell, r)) + " |" for r in b[2]] + [""]
            else:
                lines += [f"![{b[2]}]({b[1].relative_to(out).as_posix()})", ""]
        return "\n".join(lines)

    def html(self, title: str) -> str:
        e = html.escape
        parts = []
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{e(c)}</th>" for c in b[1])
                first_quoted = len(b[2]) - b[3]
                body = "".join(("<tr class=\"quoted\">" if i >= first_quoted else "<tr>")
                               + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                               for i, r in enumerate(b[2]))
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(b[2])}">'
                             f"<figcaption>{e(b[2])}</figcaption></figure>")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
                + "\n".join(parts) + "\n</body></html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1150px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}tbody tr:nth-child(even){background:#fafafa}
figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}p{margin:.5em 0}
tr.quoted td{font-style:italic;color:#555;background:#f4f7fb}
"""
