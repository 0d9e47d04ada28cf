"""Training data through Ray Data against the in-memory path (issue 23): worker and driver memory,
start-up and training throughput of bounded ``gloss-ray train`` runs at 100k and 1M documents, and
the same run with the data on S3 (a loopback moto server, as the tests use).

    python benchmarks/build_large_corpus.py /tmp/corpus100k --size 100000 --eval-size 2000 --seed 0
    python benchmarks/ray_data_ingest.py --corpus /tmp/corpus100k \\
        --configs memory:100k,ray-data:100k,ray-data:1m,ray-data-s3:100k

A corpus of N > 100k documents repeats the 100k training texts, each copy tagged (`` #<copy>``) so
that no two texts are equal, in 10 Parquet shards (a folder: Ray Data's input as a large corpus
comes). Validation and test are the corpus's 2,000 each. Each configuration runs ``gloss-ray train``
(MiniLM, G-Loss, max length 64, batch 32 per worker, 2 workers, ``--max-steps``, no global graph:
the bank's memory is the global graph's, measured in docs/benchmarks.md section 7) in a fresh child
process, with a fresh tokenisation cache. A thread samples the child's resident memory (the driver)
every 0.2 s (``VmHWM``); the workers' peaks are their own ``ru_maxrss`` (``peak_rss_mb_per_worker`` of
metrics.json). Prints a table; writes ``benchmarks/results/ray_data_ingest_cpu.json`` (``--out``) with
the load average before and after every configuration.
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
SIZES = {"100k": 100_000, "1m": 1_000_000}


def corpus(src: Path, n: int, work: Path) -> dict:
    """Split -> path: the corpus itself at 100k, else a folder of 10 shards of tagged copies."""
    files = {s: str(src / f"{s}.parquet") for s in ("train", "validation", "test")}
    base = pd.read_parquet(files["train"])
    if n <= len(base):
        return files
    out = work / f"train_{n}"
    if not out.exists():
        out.mkdir(parents=True)
        copies = -(-n // len(base))
        frame = pd.concat([base.assign(text=base["text"] + f" #{c}") if c else base for c in range(copies)])
        frame = frame.sample(frac=1.0, random_state=0).head(n).reset_index(drop=True)
        for i, part in enumerate(range(0, n, -(-n // 10))):
            frame.iloc[part:part + -(-n // 10)].to_parquet(out / f"part-{i:02d}.parquet", index=False)
    return {**files, "train": str(out)}


def to_s3(files: dict, endpoint: str) -> dict:
    """Upload the splits (a file, or a folder's shards) to a new bucket of the moto server."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
    fs.create_dir("ingest")
    out = {}
    for split, path in files.items():
        p = Path(path)
        for f in ([p] if p.is_file() else sorted(p.glob("*.parquet"))):
            key = f"ingest/{split}/{f.name}" if p.is_dir() else f"ingest/{split}.parquet"
            with fs.open_output_stream(key) as o:
                o.write(f.read_bytes())
        out[split] = f"s3://ingest/{split}" if p.is_dir() else f"s3://ingest/{split}.parquet"
    return out


def moto(port: int = 0) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            import urllib.request

            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    return proc, url


class Peak(threading.Thread):
    """Peak resident memory of one process: its ``VmHWM`` (Linux ``/proc``), read every 0.2 s until it exits."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            kib = next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:")), 0)
            self.peak_mb = max(self.peak_mb, kib / 1024)
            time.sleep(0.2)


def run_config(loader: str, files: dict, env: dict, work: Path, name: str, steps: int) -> dict:
    args = [sys.executable, "-m", "gloss_ray.cli", "train", "--train-file", files["train"],
            "--validation-file", files["validation"], "--test-file", files["test"], "--data-loader", loader,
            "--loss", "gloss", "--max-steps", str(steps), "--epochs", "1", "--max-length", "64", "--batch-size", "32",
            "--workers", "2", "--storage", str(work / "runs"), "--name", name, "--no-progress",
            "--cache-dir", str(work / f"tok_{name}")]
    import shutil

    shutil.rmtree(work / f"tok_{name}", ignore_errors=True)    # a fresh tokenisation cache: the in-memory path tokenises
    shutil.rmtree(work / "runs" / name, ignore_errors=True)    # and a new run, not a resumed one
    load0 = os.getloadavg()
    t = time.perf_counter()
    proc = subprocess.Popen(args, env=env, cwd=str(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = Peak(proc.pid)
    peak.start()
    out, _ = proc.communicate()
    peak.done.set()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{out[-4000:]}")
    m = json.loads((work / "runs" / name / "metrics.json").read_text())
    return {"config": name, "data_loader": m["data_loader"], "train_docs": m["train_docs"],
            "worker_peak_rss_mb": m["peak_rss_mb_per_worker"], "driver_peak_rss_mb": round(peak.peak_mb, 1),
            "tokenize_s": m["tokenize_s"], "train_docs_per_s": m["train_docs_per_s"],
            "train_tokens_per_s": m["train_tokens_per_s"], "train_wall_time_s": m["train_wall_time_s"],
            "run_wall_time_s": m["wall_time_s"], "command_wall_s": wall, "steps": steps,
            "test_accuracy": m.get("test_accuracy"), "load_before": load0, "load_after": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="folder of build_large_corpus.py's train/validation/test.parquet")
    ap.add_argument("--configs", default="memory:100k,ray-data:100k,ray-data:1m,ray-data-s3:100k")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_data_ingest_cpu.json"))
    a = ap.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="ingest_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    server, results = None, []
    try:
        for spec in a.configs.split(","):
            loader, size = spec.split(":")
            files = corpus(Path(a.corpus), SIZES[size], work)
            run_env = env
            if loader == "ray-data-s3":
                if server is None:
                    server, url = moto()
                    env_s3 = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
                              "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
                    os.environ.update(env_s3)
                files, run_env, loader = to_s3(files, url), {**env, **env_s3}, "ray-data"
            name = spec.replace(":", "_")
            print(f"[bench] {spec} ...", flush=True)
            row = run_config(loader, files, run_env, work, name, a.steps)
            row["config"] = spec
            results.append(row)
            print(json.dumps(row), flush=True)
            write(a, argv, results)          # after every configuration: a stopped series keeps its rows
    finally:
        if server is not None:
            server.terminate()
    print(f"\n{'config':<20}{'worker RSS MB':>18}{'driver MB':>11}{'tokenise s':>12}{'docs/s':>9}{'wall s':>9}")
    for r in results:
        tok = sum(r["tokenize_s"].values()) if r["tokenize_s"] else float("nan")
        print(f"{r['config']:<20}{'/'.join(f'{x:.0f}' for x in r['worker_peak_rss_mb']):>18}"
              f"{r['driver_peak_rss_mb']:>11.0f}{tok:>12.1f}{r['train_docs_per_s']:>9.1f}{r['run_wall_time_s']:>9.1f}")


def write(a, argv, results: list[dict]) -> None:
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(),
                                       "command": " ".join(["python", "benchmarks/ray_data_ingest.py", *(argv or sys.argv[1:])]),
                                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                       "results": results}, indent=2))


if __name__ == "__main__":
    main()
