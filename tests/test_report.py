"""Report builder on synthetic results: files, exact aggregates, paired differences, search
summary, self-contained HTML (also rendered in headless Chromium when it is installed)."""

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gloss_ray.errors import ConfigError, GlossRayError
from gloss_ray.report import PAPER_CITATION, build_report

SEEDS = (0, 1, 2)
BENCHES = ("mr", "r8")


def _png(path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.subplots().scatter([0, 1, 2], [1, 0, 2], c=["r", "g", "b"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=40)


def _run(root, bench, loss, seed, rng, stage="final", global_graph=False, label_fraction=1.0,
         epochs=4):
    d = root / "runs" / f"{bench}-{loss}{'-g' if global_graph else ''}-{label_fraction}-s{seed}"
    d.mkdir(parents=True)
    m = {"benchmark": bench, "loss": loss, "seed": seed,
         "test_accuracy": float(rng.uniform(0.7, 0.9)),
         "test_macro_f1": float(rng.uniform(0.6, 0.9)),
         "best_epoch": int(rng.integers(1, epochs + 1)),
         "best_val_macro_f1": float(rng.uniform(0.6, 0.9)),
         "wall_time_s": float(rng.uniform(50, 150)), "silhouette": float(rng.uniform(-0.1, 0.4)),
         "device": "cpu", "num_workers": 2, "global_graph": global_graph,
         "label_fraction": label_fraction, "stage": stage,
         "config": {"model": "tiny-bert", "lr": 2e-5, "lam": 0.5, "k": None}}
    if bench == "mr":                     # only MR's runs measured their throughput
        m.update({"train_tokens_per_s": float(rng.uniform(500, 900)), "train_docs_per_s": float(rng.uniform(20, 30)),
                  "train_mfu": float(rng.uniform(0.2, 0.4)), "train_padding": 0.25, "device_peak_flops": 8e10})
    (d / "metrics.json").write_text(json.dumps(m))
    f1 = np.minimum.accumulate(rng.uniform(0.5, 0.9, epochs)[::-1])[::-1]  # non-decreasing
    hist = pd.DataFrame({"epoch": range(1, epochs + 1), "train_loss": rng.uniform(0.1, 1, epochs),
                         "train_ce": 0.5, "train_aux": 0.1, "val_accuracy": f1 + 0.02,
                         "val_macro_f1": f1, "lr": 2e-5, "sigma": 0.4, "lam": 0.5, "k": "",
                         "epoch_time_s": 10.0, "elapsed_s": np.arange(1, epochs + 1) * 10.5})
    if global_graph:
        hist["homophily"] = np.linspace(0.6, 0.8, epochs)
        hist["recall_at_k"] = 0.9
        hist["refresh_s"] = 1.0
    hist.to_csv(d / "history.csv", index=False)
    return m, hist


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(42)
    runs = {}
    for bench in BENCHES:
        for loss in ("ce", "gloss"):
            for seed in SEEDS:
                runs[(bench, loss, seed)] = _run(root, bench, loss, seed, rng)
    runs[("r8", "gloss+global", 0)] = _run(root, "r8", "gloss", 0, rng, global_graph=True)
    runs[("mr", "gloss@0.1", 0)] = _run(root, "mr", "gloss", 0, rng, label_fraction=0.1)
    _run(root, "mr", "gloss", 7, rng, stage="trial")                 # must be excluded
    _png(root / "runs" / "mr-gloss-1.0-s0" / "plots" / "embedding_map.png")
    (root / "runs" / "broken").mkdir()
    (root / "runs" / "broken" / "metrics.json").write_text("{not json")
    trials = {}
    for bench in BENCHES:
        ts = []
        for i, (lam, sigma, k) in enumerate([(0.2, "root", None), (0.5, 0.3, 8), (0.8, "dicm", 16),
                                             (0.4, 0.5, 32)]):
            status = {2: "ERROR", 3: "STOPPED_EARLY"}.get(i, "TERMINATED") if bench == "mr" \
                else "TERMINATED"
            ts.append({"trial_id": f"{bench}_{i}", "benchmark": bench, "loss": "gloss",
                       "status": status, "config": {"lam": lam, "sigma": sigma, "k": k, "lr": 2e-5},
                       "best_val_macro_f1": None if status == "ERROR" else 0.6 + 0.05 * i,
                       "iterations": 3, "time_s": 100.0 * (i + 1),
                       "device": "gpu" if i % 2 else "cpu", "num_workers": 2,
                       "error": "CUDA out of memory" if status == "ERROR" else None})
        d = root / "sweep" / "search" / f"{bench}__gloss"
        d.mkdir(parents=True)
        (d / "trials.json").write_text(json.dumps(ts))
        trials[bench] = ts
    out = root / "report_out"
    paths = build_report(root, out)
    return {"root": root, "out": out, "paths": paths, "runs": runs, "trials": trials,
            "json": json.loads((out / "results.json").read_text())}


def _row(res, bench, key):
    return next(r for r in res["json"]["results"] if r["benchmark"] == bench and r["key"] == key)


def test_files_written(results):
    out, paths = results["out"], results["paths"]
    for name in ("report.md", "report.html", "results.csv", "results.json"):
        assert paths[name] == out / name and (out / name).stat().st_size > 0
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert {"val_macro_f1_mr.png", "val_macro_f1_r8.png", "search_mr.png", "search_r8.png",
            "homophily_r8.png", "embedding_mr_gloss_seed0.png"} <= set(figs)
    assert {f"figures/{f}" for f in figs} <= set(paths)


def test_aggregates_equal_numpy(results):
    res = results
    keys = {(r["benchmark"], r["key"]) for r in res["json"]["results"]}
    assert keys == {("mr", "ce"), ("mr", "gloss"), ("r8", "ce"), ("r8", "gloss"),
                    ("r8", "gloss+global"), ("mr", "gloss@0.1")}
    for bench in BENCHES:
        for loss in ("ce", "gloss"):
            row = _row(res, bench, loss)
            assert row["n_seeds"] == 3 and row["seeds"] == list(SEEDS)  # trial run excluded
            for name in ("test_accuracy", "test_macro_f1", "silhouette", "wall_time_s"):
                x = [res["runs"][(bench, loss, s)][0][name] for s in SEEDS]
                assert row[f"{name}_mean"] == float(np.mean(x))
                assert row[f"{name}_std"] == float(np.std(x, ddof=1))
    single = _row(res, "r8", "gloss+global")
    assert single["n_seeds"] == 1 and single["test_accuracy_std"] is None
    csv = pd.read_csv(res["out"] / "results.csv")
    for r in res["json"]["results"]:
        c = csv[(csv.benchmark == r["benchmark"]) & (csv.key == r["key"])].iloc[0]
        assert c["test_accuracy_mean"] == r["test_accuracy_mean"]
        assert c["test_macro_f1_mean"] == r["test_macro_f1_mean"]


def test_throughput_section_averages_the_runs_that_measured_it(results):
    res = results
    runs = [res["runs"][("mr", "gloss", s)][0] for s in SEEDS]
    row = _row(res, "mr", "gloss")
    assert row["train_mfu_mean"] == float(np.mean([m["train_mfu"] for m in runs]))
    assert row["train_tokens_per_s_n"] == 3
    assert "train_mfu_n" not in _row(res, "r8", "gloss")
    md = (res["out"] / "report.md").read_text()
    section = md.split("## Training throughput", 1)[1].split("\n## ", 1)[0]
    assert f"{100 * row['train_mfu_mean']:.2f} ± {100 * row['train_mfu_std']:.2f}" in section
    assert "| 80.0 |" in section                                  # peak in GFLOP/s
    assert "R8" not in section                                   # no row for runs without the figures


def test_paired_difference_to_ce(results):
    res = results
    diffs = res["json"]["differences"]
    d = next(x for x in diffs if x["benchmark"] == "mr" and x["key"] == "gloss"
             and x["metric"] == "test_accuracy")
    ours = [res["runs"][("mr", "gloss", s)][0]["test_accuracy"] for s in SEEDS]
    ce = [res["runs"][("mr", "ce", s)][0]["test_accuracy"] for s in SEEDS]
    t = stats.ttest_rel(ours, ce)
    assert d["baseline"] == "ce" and d["n_pairs"] == 3
    assert d["mean_diff"] == pytest.approx(np.mean(np.subtract(ours, ce)))
    assert d["p_value"] == pytest.approx(t.pvalue) and d["t_stat"] == pytest.approx(t.statistic)
    assert d["ci_low"] <= d["mean_diff"] <= d["ci_high"]
    one = next(x for x in diffs if x["key"] == "gloss+global" and x["metric"] == "test_accuracy")
    assert one["n_pairs"] == 1 and one["p_value"] is None
    missing = next(x for x in diffs if x["key"] == "gloss@0.1")
    assert missing["baseline"] == "ce@0.1" and missing["note"] == "CE missing"
    assert missing["mean_diff"] is None
    assert _row(res, "mr", "gloss")["delta_test_accuracy_p_value"] == d["p_value"]


def test_global_graph_rows_are_also_compared_with_the_batch_loss(results):
    d = next(x for x in results["json"]["differences"] if x["key"] == "gloss+global"
             and x["baseline"] == "gloss" and x["metric"] == "test_accuracy")
    glob = results["runs"][("r8", "gloss+global", 0)][0]["test_accuracy"]
    batch = results["runs"][("r8", "gloss", 0)][0]["test_accuracy"]
    assert d["n_pairs"] == 1 and d["mean_diff"] == pytest.approx(glob - batch)
    assert _row(results, "r8", "gloss+global")["delta_batch_test_accuracy_mean_diff"] == d["mean_diff"]
    assert "| gloss+global | gloss | test_accuracy | 1 |" in results["paths"]["report.md"].read_text()


def test_convergence_and_search(results):
    res = results
    conv = {(c["benchmark"], c["key"]): c for c in res["json"]["convergence"]}
    need = []
    for s in SEEDS:
        f1 = res["runs"][("mr", "ce", s)][1]["val_macro_f1"].to_numpy()
        need.append(int(np.argmax(f1 >= 0.99 * f1.max())) + 1)
    assert conv[("mr", "ce")]["epochs_to_99"] == pytest.approx(np.mean(need))
    search = res["json"]["search"]
    mr = next(c for c in search["counts"] if c["benchmark"] == "mr")
    assert (mr["trials"], mr["terminated"], mr["stopped_early"], mr["errored"]) == (4, 2, 1, 1)
    assert search["errors"] == [{"benchmark": "mr", "loss": "gloss", "trial_id": "mr_2",
                                 "error": "CUDA out of memory"}]
    best = {b["benchmark"]: b for b in search["best"]}
    assert best["mr"]["trial_id"] == "mr_3" and best["r8"]["trial_id"] == "r8_3"
    assert set(best["mr"]["searched"]) == {"lam", "sigma", "k"}
    all_t = res["trials"]["mr"] + res["trials"]["r8"]
    for dev in ("cpu", "gpu"):
        want = sum(t["time_s"] * t["num_workers"] for t in all_t if t["device"] == dev) / 3600
        assert search["hours_by_device"][dev] == pytest.approx(want)
    md = (res["out"] / "report.md").read_text()
    assert "CUDA out of memory" in md and "Stopped early" in md


def test_markdown_has_paper_figures_labelled(results):
    md = (results["out"] / "report.md").read_text()
    assert PAPER_CITATION in md and "G-Loss paper (arXiv 2604.25853)" in md
    for enc, acc in (("BERT-base", "87.14"), ("RoBERTa-large", "90.82"), ("BERT-base", "98.04")):
        assert re.search(rf"G-Loss, paper \({enc}\)[^\n]*{re.escape(acc)}", md), (enc, acc)
    assert "n/a" in md                                  # gloss@0.1 has no CE baseline
    assert "(figures/val_macro_f1_mr.png)" in md
    assert "broken" in md                               # skipped file listed


def test_html_self_contained(results):
    text = (results["out"] / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script" not in text.lower() and "@import" not in text and "url(" not in text
    srcs = re.findall(r"""<img[^>]*\bsrc="([^"]*)\"""", text)
    n_png = len(list((results["out"] / "figures").glob("*.png")))
    assert len(srcs) == n_png and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert text.count("<table") >= 5


def test_missing_or_empty_results_dir(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "nope"))):
        build_report(tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(GlossRayError, match=re.escape(str(tmp_path / "empty"))):
        build_report(tmp_path / "empty")


def test_default_out_dir(results, tmp_path):
    src = results["root"] / "runs" / "mr-ce-1.0-s0"
    shutil.copytree(src, tmp_path / "one" / "run")
    paths = build_report(tmp_path / "one")
    assert paths["report.html"] == tmp_path / "one" / "report" / "report.html"


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_html_in_headless_chromium(results, tmp_path):
    html_path = results["out"] / "report.html"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
             "--v=0"]
    p = subprocess.run(flags + ["--dump-dom", html_path.as_uri()], capture_output=True,
                       text=True, timeout=50)
    dom = p.stdout
    assert p.returncode == 0, p.stderr[-2000:]
    assert dom.count("<table") >= 5 and "data:image/png;base64," in dom
    assert "Hyper-parameter search" in dom and "Convergence" in dom
    page_errors = [ln for ln in p.stderr.splitlines()
                   if "CONSOLE" in ln or "Uncaught" in ln or "report.html" in ln]
    assert not page_errors, page_errors


def test_run_key():
    from gloss_ray.report import run_key
    m = {"loss": "gloss", "global_graph": True, "label_fraction": 0.1,
         "config": {"variant": "paper"}}
    assert run_key(m) == "gloss+global@0.1"
    assert run_key(m, multi_variant=True) == "gloss/paper+global@0.1"
    assert run_key({"loss": "ce", "label_fraction": 1.0}) == "ce"


def test_statistics_without_drawing():
    """gloss_ray.report.stats is plain maths: exact paired difference, reproducible bootstrap."""
    from gloss_ray.report.stats import bootstrap_ci, describe, paired_difference
    ours, base = {0: 0.8, 1: 0.9, 2: 0.7, 9: 0.5}, {0: 0.75, 1: 0.8, 2: 0.72}
    d = paired_difference(ours, base)
    diff = np.subtract([0.8, 0.9, 0.7], [0.75, 0.8, 0.72])
    assert d["n_pairs"] == 3 and d["seeds"] == [0, 1, 2]
    assert d["mean_diff"] == pytest.approx(diff.mean())
    assert (d["ci_low"], d["ci_high"]) == bootstrap_ci(diff) == bootstrap_ci(diff)
    assert diff.min() <= d["ci_low"] <= d["mean_diff"] <= d["ci_high"] <= diff.max()
    assert d["p_value"] == pytest.approx(stats.ttest_rel([0.8, 0.9, 0.7], [0.75, 0.8, 0.72]).pvalue)
    assert describe([1, 2, None, float("nan"), True]) == {"mean": 1.5, "std": float(np.std([1, 2], ddof=1)),
                                                           "n": 2}


def test_report_orders_and_labels_with_the_option_names():
    from gloss_ray.options import BENCHMARK_LABELS, BENCHMARKS, DENSE, LOSSES
    from gloss_ray.report.collect import bench_rank, key_rank
    from gloss_ray.report.figures import bench_label, value_label
    assert sorted(["custom", *reversed(BENCHMARKS)], key=bench_rank) == [*BENCHMARKS, "custom"]
    assert sorted(["zzz", *(f"{x}+global" for x in reversed(LOSSES))], key=key_rank) \
        == [*(f"{x}+global" for x in LOSSES), "zzz"]
    assert [bench_label(b) for b in BENCHMARKS] == [BENCHMARK_LABELS[b] for b in BENCHMARKS]
    assert value_label("k", None) == value_label("k", DENSE) == DENSE and value_label("sigma", None) == "None"
    assert value_label("lr", 2e-5) == "2e-05" and value_label("k", 8) == "8"


def test_python_m_entry_point(results, tmp_path, capsys):
    from gloss_ray.report import main
    assert main([]) == 2 and "usage" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2 and "does not exist" in capsys.readouterr().err
    assert main([str(results["root"] / "runs" / "mr-ce-1.0-s0"), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "report.html")


def test_report_names_the_trial_the_search_retrained_by_the_spaces_metric_and_mode():
    """A search on ``train_loss`` (min): the report's best trial is the one with the lowest train
    loss -- the one the sweep retrained -- not the one with the best validation macro-F1."""
    from gloss_ray.report.stats import search_summary
    from gloss_ray.sweep.search import best_trial      # what run_search retrains

    trials = [{"trial_id": tid, "benchmark": "mr", "loss": "gloss", "status": "TERMINATED",
               "config": {"lr": lr}, "best_val_macro_f1": f1, "metric": "train_loss", "mode": "min",
               "best_metric": loss}
              for tid, lr, f1, loss in (("a", 1e-5, 0.81, 0.40), ("b", 1e-4, 0.78, 0.12), ("c", 1e-3, 0.70, 0.55))]
    best = search_summary(trials)["best"][0]
    assert best["trial_id"] == best_trial(trials)["trial_id"] == "b"
    assert (best["metric"], best["mode"], best["best_metric"]) == ("train_loss", "min", 0.12)
