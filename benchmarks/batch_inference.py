"""Corpus-scale inference (issue 28): documents/s and memory of ``gloss-ray predict`` in one process (one
local file, the default path) against ``gloss-ray predict`` through Ray Data (a folder of Parquet
shards, the model on an actor pool), on the same documents, on this machine's CPU.

    python benchmarks/build_large_corpus.py /tmp/corpus100k --size 100000          # the corpus
    gloss-ray train --benchmark mr --max-train 1000 --max-eval 200 --epochs 1 --storage /tmp/runs --name m
    python benchmarks/batch_inference.py --model-dir /tmp/runs/m/model --input /tmp/corpus100k/train.parquet \\
        --docs 100000 --configs process,ray:1x1,process

The first ``--docs`` texts of ``--input`` are written once as one Parquet file (the in-process path's
input) and as ``--shards`` Parquet shards in a folder (Ray Data's input). Each configuration runs as
``gloss-ray predict`` (``gloss_ray.cli.main``) in a fresh child process, one after the other:
``process`` (in this process, PyTorch's default threads) or ``ray:AxC`` (``--actors A --cpus-per-actor
C`` on a local Ray instance the child starts, as the command does). The child times Ray's start
separately from the command. While it runs, this script samples (every 0.2 s, ``psutil``) the resident
memory of the child and of every process below it -- a local Ray instance's daemons and workers are
its descendants -- and keeps the peaks: the driver's, the largest model actor's (``ray::MapWorker``),
and the whole tree's. RSS counts the pages of Ray's shared object store that a process has touched,
so the tree's sum over-counts them. Each output is checked: one row per document.

Prints a table; writes ``benchmarks/results/batch_inference_cpu.json`` (``--out``), with the load
average before and after every configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
cfg = json.loads(sys.argv[1])
ray_start = 0.0
if cfg["ray"]:
    from gloss_ray.train.launch import init_ray
    init_ray()
    ray_start = time.perf_counter() - t0
from gloss_ray import cli
t1 = time.perf_counter()
code = cli.main(cfg["argv"])
print("RESULT " + json.dumps({"code": code, "ray_start_s": ray_start, "command_s": time.perf_counter() - t1,
                              "wall_s": time.perf_counter() - t0}), flush=True)
"""


def _psutil():
    try:
        import psutil
    except ImportError:   # Ray bundles psutil (ray/thirdparty_files) and puts it on sys.path
        import ray  # noqa: F401
        import psutil
    return psutil


class Sampler(threading.Thread):
    """Peak RSS of a process, of its largest ``ray::MapWorker`` descendant and of its whole tree."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = {"driver_rss_mb": 0.0, "actor_rss_mb": 0.0, "tree_rss_mb": 0.0}
        self.done = threading.Event()

    def run(self) -> None:
        psutil = _psutil()
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0.0
            for p in procs:
                try:
                    rss = p.memory_info().rss / 2**20
                    name = " ".join(p.cmdline()[:1])
                except psutil.Error:
                    continue
                total += rss
                if p.pid == self.pid:
                    self.peak["driver_rss_mb"] = max(self.peak["driver_rss_mb"], rss)
                elif "MapWorker" in name:
                    self.peak["actor_rss_mb"] = max(self.peak["actor_rss_mb"], rss)
            self.peak["tree_rss_mb"] = max(self.peak["tree_rss_mb"], total)
            time.sleep(self.every)


def _rows(path: Path) -> int:
    if path.is_dir():
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(f).num_rows for f in path.rglob("*.parquet"))
    return len(pd.read_csv(path))


def run_config(name: str, model_dir: str, single: Path, shards: Path, work: Path, batch_size: int) -> dict:
    out = work / f"out-{name.replace(':', '-')}"
    argv = ["predict", "--model-dir", model_dir, "--batch-size", str(batch_size)]
    if name == "process":
        argv += ["--input", str(single), "--output", str(out) + ".csv"]
        out = Path(str(out) + ".csv")
    else:
        actors, cpus = name.split(":")[1].split("x")
        argv += ["--input", str(shards), "--output", str(out), "--actors", actors, "--cpus-per-actor", cpus]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps({"ray": name != "process", "argv": argv})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=work)
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.done.set()
    sampler.join()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    res = json.loads(line[len("RESULT "):])
    res.update(sampler.peak, config=name, rows=_rows(out), load_before=load_before, load_after=os.getloadavg())
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="a saved model folder (a run's model/)")
    p.add_argument("--input", required=True, help="Parquet file with a text column (e.g. build_large_corpus.py's train)")
    p.add_argument("--docs", type=int, default=20_000, help="documents: the first N of --input")
    p.add_argument("--shards", type=int, default=8, help="Parquet shards the documents are cut into for Ray Data")
    p.add_argument("--batch-size", type=int, default=64, help="--batch-size of gloss-ray predict")
    p.add_argument("--configs", default="process,ray:1x1,process",
                   help="comma-separated: process, ray:AxC (A actors of C CPUs; at most the machine's CPUs less "
                        "one in all, see gloss_ray/batch_inference.py); a repeated one runs again")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batch_inference_cpu.json"))
    a = p.parse_args(argv)

    frame = pd.read_parquet(a.input, columns=["text"]).head(a.docs)
    frame.insert(0, "id", range(len(frame)))
    results = []
    with tempfile.TemporaryDirectory(prefix="gloss_ray_bench_infer_") as tmp:
        work = Path(tmp)
        single, shards = work / "docs.parquet", work / "shards"
        frame.to_parquet(single, index=False)
        shards.mkdir()
        step = -(-len(frame) // a.shards)
        for i in range(0, len(frame), step):
            frame.iloc[i:i + step].to_parquet(shards / f"part-{i // step:03d}.parquet", index=False)
        for name in a.configs.split(","):
            r = run_config(name, a.model_dir, single, shards, work, a.batch_size)
            if r["rows"] != len(frame):
                raise SystemExit(f"{name}: {r['rows']} output rows for {len(frame)} documents")
            r["docs_per_s"] = len(frame) / r["command_s"]
            results.append(r)
            _write(a, argv, frame, results)
            print(f"{name:10s} {r['docs_per_s']:7.1f} docs/s  command {r['command_s']:7.1f}s  ray start "
                  f"{r['ray_start_s']:5.1f}s  peak RSS driver {r['driver_rss_mb']:6.0f} MB, actor "
                  f"{r['actor_rss_mb']:6.0f} MB, all {r['tree_rss_mb']:6.0f} MB  load {r['load_before'][0]:.1f}"
                  f"->{r['load_after'][0]:.1f}", flush=True)

    print(f"\n{'config':10s} {'docs/s':>8s} {'command s':>10s} {'ray start s':>12s} {'driver MB':>10s} "
          f"{'actor MB':>9s} {'all MB':>8s}")
    for r in results:
        print(f"{r['config']:10s} {r['docs_per_s']:8.1f} {r['command_s']:10.1f} {r['ray_start_s']:12.1f} "
              f"{r['driver_rss_mb']:10.0f} {r['actor_rss_mb']:9.0f} {r['tree_rss_mb']:8.0f}")
    _write(a, argv, frame, results)
    print(f"wrote {a.out}")


def _write(a, argv, frame, results) -> None:
    """The JSON so far (written after every configuration, so a later one that fails keeps the others)."""
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({
        "command": "python benchmarks/batch_inference.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "docs": len(frame), "shards": a.shards, "batch_size": a.batch_size, "machine": platform.processor() or
        platform.machine(), "cpus": os.cpu_count(), "torch_threads_default": __import__("torch").get_num_threads(),
        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
