"""Ray's own overhead: the same fine-tuning loop (gloss_ray.train.loop.train) run through Ray Train with
one worker, as ``gloss-ray train`` runs it by default, vs in one plain PyTorch process using all the
machine's threads.

    python benchmarks/ray_overhead.py                 # MR slice, all-MiniLM-L6-v2, CPU
    python benchmarks/ray_overhead.py --gpu           # on a GPU machine

The Ray run uses gloss-ray's defaults: a local Ray instance that sees every core, and automatic
``cpus_per_worker`` (one worker holding all CPUs; its PyTorch threads = the CPUs it reserved);
``--ray-cpus N`` sets the worker's CPUs instead. The plain run uses ``--threads`` (default: all cores).

Compares the mean training-epoch time (the loop over batches + validation, as recorded in
history.csv) and the whole job's wall time (which for Ray includes starting the worker group).
Ray runs first, so the plain run's process state (threads, model) cannot slow the Ray driver.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def epoch_times(run_dir: Path) -> list[float]:
    return [float(r["epoch_time_s"]) for r in csv.DictReader(open(run_dir / "history.csv"))]


def main() -> None:
    import torch

    from gloss_ray.config import TrainConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--benchmark", default="mr")
    ap.add_argument("--max-train", type=int, default=640)
    ap.add_argument("--max-eval", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="plain run's PyTorch threads")
    ap.add_argument("--ray-cpus", type=float, default=None, help="Ray worker's CPUs (default: automatic)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--loss", default="gloss")
    ap.add_argument("--model", default=None, help="encoder folder or name (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--data-dir", default=None, help="benchmark folder (default: $GLOSS_RAY_DATA, ./data, cache)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ray_overhead_"))
    base = dict(benchmark=args.benchmark, loss=args.loss, epochs=args.epochs, max_train=args.max_train,
                max_eval=args.max_eval, max_length=args.max_length, batch_size=args.batch_size, patience=100,
                progress=False, storage=str(tmp), gpu=args.gpu, max_failures=0, model=args.model, data_dir=args.data_dir)
    results = {}

    # Ray Train, one worker
    from gloss_ray.train.launch import fit, init_ray

    init_ray(include_dashboard=False)
    cfg = TrainConfig(**base, name="ray", cpus_per_worker=args.ray_cpus)
    t = time.time()
    m = fit(cfg)
    results["ray"] = {"wall_s": time.time() - t, "epoch_s": epoch_times(tmp / "ray"),
                      "cpus_per_worker": m["config"]["cpus_per_worker"]}

    # plain PyTorch, one process
    from gloss_ray.train.loop import train
    from gloss_ray.train.session import LocalSession

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**base, name="plain")
    t = time.time()
    train(cfg, LocalSession(str(tmp / "plain")))
    results["plain"] = {"wall_s": time.time() - t, "epoch_s": epoch_times(tmp / "plain"), "threads": args.threads}

    mean = {k: sum(v["epoch_s"]) / len(v["epoch_s"]) for k, v in results.items()}
    ratio = mean["ray"] / mean["plain"]
    print(f"\nRay Train overhead: {args.benchmark} ({args.max_train} train docs), {args.loss}, "
          f"{'GPU' if args.gpu else 'CPU'}; Ray worker {results['ray']['cpus_per_worker']:g} CPU(s), "
          f"plain {args.threads} thread(s)")
    print(f"{'mode':<8} {'epoch s (mean)':>15} {'epochs':>24} {'job wall s':>11}")
    for k, v in results.items():
        print(f"{k:<8} {mean[k]:>15.2f} {str([round(x, 1) for x in v['epoch_s']]):>24} {v['wall_s']:>11.1f}")
    print(f"ratio Ray / plain (epoch): {ratio:.3f}")
    out = Path(args.out or Path(__file__).parent / "results" / f"ray_overhead_{'gpu' if args.gpu else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "epoch_ratio": ratio}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
