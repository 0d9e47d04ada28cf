"""Summarise a ``benchmarks/gpu_suite.sh`` output folder into ``gpu_suite.json`` and a table.

    python benchmarks/gpu_suite_summary.py benchmarks/results/gpu_suite
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def headline(out: Path) -> dict:
    """The figures each step is run for, read from the files the steps wrote (None when missing)."""
    h: dict = {}
    xml = out / "gpu_tests.xml"
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        h["gpu_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    if lo := _load(out / "loss_overhead.json"):
        h["loss_overhead"] = {"ratio": lo["ratio"], "median_step_ms": {k: v * 1e3 for k, v in lo["median_s"].items()},
                              "batch_size": lo["batch_size"], "device": lo["device"]}
    if ro := _load(out / "ray_overhead.json"):
        h["ray_overhead"] = {"epoch_ratio": ro["epoch_ratio"],
                             "wall_s": {k: v["wall_s"] for k, v in ro["results"].items()}}
    for name in ("global_graph", "global_graph_faiss"):
        if gg := _load(out / f"{name}.json"):
            h[name] = [{k: r.get(k) for k in ("backend", "device", "n", "build_s", "graph_s", "graph_extrapolated",
                                             "recall_at_k", "lookup_ms", "peak_rss_gib")} for r in gg["rows"]]
    if mr := _load(out / "mr_reference.json"):
        h["mr_reference"] = {r["key"]: {k: r.get(k) for k in ("test_accuracy_mean", "test_macro_f1_mean",
                                                              "best_val_macro_f1_mean", "best_epoch_mean",
                                                              "wall_time_s_mean")} for r in mr["results"]}
    if table := _load(out / "five_benchmarks" / "results.json"):
        h["five_benchmarks"] = {
            "results": [{k: r.get(k) for k in ("benchmark", "key", "n_seeds", "test_accuracy_mean",
                                               "test_accuracy_std", "test_macro_f1_mean")} for r in table["results"]],
            "differences": [{k: d.get(k) for k in ("benchmark", "key", "baseline", "n_pairs", "mean_diff",
                                                   "ci_low", "ci_high", "p_value")} for d in table["differences"]
                            if d.get("metric") == "test_accuracy"]}
    return h


def main(out_dir: str) -> int:
    out = Path(out_dir)
    steps = [_load(p) for p in sorted(out.glob("*.status"), key=lambda p: p.stat().st_mtime)]
    summary = {"env": _load(out / "env.json"), "steps": steps, "results": headline(out)}
    (out / "gpu_suite.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'step':<20} {'rc':>4} {'seconds':>8}")
    for s in steps:
        print(f"{s['step']:<20} {s['rc']:>4} {s['seconds']:>8}")
    print(f"total {sum(s['seconds'] for s in steps)} s")
    print(json.dumps(summary["results"], indent=1))
    print(f"wrote {out / 'gpu_suite.json'}")
    return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
