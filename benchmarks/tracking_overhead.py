"""What experiment tracking costs a training step: the same fine-tuning (gloss_ray.train.loop.train, in one
process) with ``--report-to mlflow`` on MLflow's local store (sqlite, gloss-ray's default) and a
per-step row every ``--log-every`` steps, against the same run with no tracker, side by side.

    python benchmarks/tracking_overhead.py                       # MR slice, all-MiniLM-L6-v2, CPU
    python benchmarks/tracking_overhead.py --repeats 3 --log-every 10

Three measures, per training step:

* **in the loop**: the seconds spent inside the trackers' per-step and per-epoch calls
  (``Trackers.log_metrics``, timed around the real calls) over the run's steps, as a share of the
  untracked run's mean step. This is the overhead itself, and is what the goal (<= 2%) is read on.
* **side by side**: the mean step time (history.csv's ``train_seconds`` over the steps; a step's
  seconds include the tracker calls made before it) of tracked and untracked runs, alternated
  ``--repeats`` times. On a shared machine its noise can exceed the overhead; it is the cross-check.

* **synchronous, for comparison**: one synchronous ``mlflow.log_metrics`` of a per-step row to the
  same store, timed ``--sync-calls`` times, over ``--log-every`` steps: what the loop would pay if it
  waited for the store (gloss-ray queues its metrics with MLflow's asynchronous logging instead).

The one-off costs of a tracked run -- starting the MLflow run (``setup_mlflow``: store, experiment,
parameters) and logging the report files at the end -- are reported apart: they do not grow with
the number of steps. Writes a table and ``benchmarks/results/tracking_overhead_<device>.json`` with
the load average before and after.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(cls, name: str, sink: list[float]) -> None:
    """Record the seconds of every call of ``cls.name`` in ``sink`` (the real method runs)."""
    real = getattr(cls, name)

    def wrapper(self, *a, **kw):
        t = time.perf_counter()
        try:
            return real(self, *a, **kw)
        finally:
            sink.append(time.perf_counter() - t)
    setattr(cls, name, wrapper)


def sync_probe(tracking_uri: str, calls: int, steps_csv: Path) -> float:
    """Seconds of one *synchronous* ``mlflow.log_metrics`` of a per-step row (the first row of
    ``steps_csv``) to the same store, the mean of ``calls``: what the loop would wait for at each
    per-step row if gloss-ray did not queue its metrics (MLflow's asynchronous logging)."""
    import mlflow

    row = {f"step/{k}": float(v) for k, v in next(csv.DictReader(open(steps_csv))).items() if v and k != "step"}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("gloss-ray")
    with mlflow.start_run(run_name="sync-probe"):
        mlflow.log_metrics(row, step=0, synchronous=True)           # warm: the run's first write
        t = time.perf_counter()
        for i in range(calls):
            mlflow.log_metrics(row, step=i + 1, synchronous=True)
        return (time.perf_counter() - t) / max(calls, 1)


def main() -> None:
    from gloss_ray.config import TrainConfig
    from gloss_ray.train import tracking
    from gloss_ray.train.loop import train
    from gloss_ray.train.session import LocalSession

    ap = argparse.ArgumentParser()
    ap.add_argument("--benchmark", default="mr")
    ap.add_argument("--max-train", type=int, default=1280, help="training documents (steps = this / batch size)")
    ap.add_argument("--max-eval", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--log-every", type=int, default=10, help="steps between per-step rows")
    ap.add_argument("--repeats", type=int, default=2, help="tracked/untracked pairs, alternated")
    ap.add_argument("--sync-calls", type=int, default=20, help="synchronous log calls timed for comparison")
    ap.add_argument("--model", default=None, help="encoder (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    in_loop, starts, ends = [], [], []
    timed(tracking.Trackers, "log_metrics", in_loop)
    timed(tracking.MlflowTracker, "__init__", starts)
    timed(tracking.Trackers, "log_artifacts", ends)

    tmp = Path(tempfile.mkdtemp(prefix="tracking_overhead_"))
    base = dict(benchmark=args.benchmark, loss="gloss", epochs=1, max_train=args.max_train, max_eval=args.max_eval,
                max_length=args.max_length, batch_size=args.batch_size, patience=100, progress=False,
                storage=str(tmp), model=args.model, data_dir=args.data_dir, log_every=args.log_every,
                cache_dir=str(tmp / "tok"))
    load_before = os.getloadavg()
    runs = []
    for i in range(args.repeats):
        for tracked in (False, True):
            name = f"{'mlflow' if tracked else 'none'}-{i}"
            cfg = TrainConfig(**base, name=name, report_to="mlflow" if tracked else None)
            calls = len(in_loop)
            t = time.perf_counter()
            train(cfg, LocalSession(str(tmp / name)))
            wall = time.perf_counter() - t
            row = next(csv.DictReader(open(tmp / name / "history.csv")))
            steps = int(round(float(row["train_docs"]) / args.batch_size))      # one worker: its documents
            runs.append({"tracked": tracked, "steps": steps, "step_s": float(row["train_seconds"]) / steps,
                         "tracker_calls": len(in_loop) - calls, "tracker_s": sum(in_loop[calls:]), "wall_s": wall})
            print(f"{name}: {steps} steps, {runs[-1]['step_s']:.3f} s/step, tracker calls "
                  f"{runs[-1]['tracker_calls']} taking {runs[-1]['tracker_s']:.3f} s, wall {wall:.0f} s", flush=True)
    sync_s = sync_probe(f"sqlite:///{tmp}/mlflow.db", args.sync_calls, tmp / f"none-0" / "steps.csv")
    load_after = os.getloadavg()

    plain = [r["step_s"] for r in runs if not r["tracked"]]
    tracked = [r for r in runs if r["tracked"]]
    step = statistics.mean(plain)
    per_step = statistics.mean(r["tracker_s"] / r["steps"] for r in tracked)
    side = statistics.mean(r["step_s"] for r in tracked)
    result = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "store": "MLflow local sqlite (sqlite:///<storage>/mlflow.db)", "log_every": args.log_every,
        "steps_per_run": runs[0]["steps"], "batch_size": args.batch_size, "max_length": args.max_length,
        "model": args.model or "all-MiniLM-L6-v2 (packaged)", "threads": __import__("torch").get_num_threads(),
        "untracked_step_s": step, "tracked_step_s": side,
        "side_by_side_overhead": side / step - 1,
        "tracker_s_per_step": per_step, "in_loop_overhead": per_step / step,
        "tracker_s_per_call": statistics.mean(in_loop) if in_loop else None,
        "sync_log_s_per_call": sync_s, "sync_overhead": sync_s / args.log_every / step,
        "mlflow_start_s": statistics.mean(starts) if starts else None,
        "report_artifacts_s": statistics.mean(ends) if ends else None,
        "runs": runs, "load_average_before": load_before, "load_average_after": load_after,
    }
    print()
    print("| run | s/step | tracker s/step | overhead |")
    print("|---|---|---|---|")
    print(f"| no tracking | {step:.3f} | - | - |")
    print(f"| MLflow every {args.log_every} steps | {side:.3f} | {per_step:.4f} | in the loop "
          f"{result['in_loop_overhead']:.2%}, side by side {result['side_by_side_overhead']:+.2%} |")
    print(f"| (synchronous logging, for comparison) | | {sync_s / args.log_every:.4f} | "
          f"{result['sync_overhead']:.2%} |")
    print(f"one-off: MLflow run start {result['mlflow_start_s']:.1f} s, report artifacts "
          f"{result['report_artifacts_s']:.1f} s; load average {load_before} -> {load_after}")
    out = Path(args.out or Path(__file__).parent / "results" / "tracking_overhead_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
