"""``gloss-ray`` command line.

    gloss-ray train --benchmark mr --loss gloss --epochs 3 --workers 2 [--gpu] [--config f.yaml] [--storage DIR]
    gloss-ray predict --model-dir RUN/model --input texts.txt [--output preds.csv]
    gloss-ray embed   --model-dir RUN/model --input texts.txt --output emb.npy
    gloss-ray tune    --benchmarks mr,r8 --losses ce,gloss --space tune_spaces/default.yaml --samples 8
    gloss-ray bench   --benchmarks mr,r8 --losses ce,gloss --seeds 3
    gloss-ray report  RESULTS_DIR
    gloss-ray data download [mr r8 r52 ohsumed 20ng] [--dest DIR]

Every ``train`` option is a field of :class:`gloss_ray.config.TrainConfig` (``--lam`` <-> ``lam``), so a
YAML file given with ``--config`` uses the same names; flags given on the command line win.
Bad input ends with one line ``gloss-ray: error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

import yaml

from .config import TrainConfig
from .options import LOSSES
from .errors import GlossRayError
from .storage import redact

HELP = {
    "benchmark": "benchmark name: mr, r8, r52, ohsumed, 20ng (files under --data-dir/<name>/)",
    "data_dir": "folder (or s3:// / gs:// URI) holding <benchmark>/{train,validation,test}.parquet (default: "
                "$GLOSS_RAY_DATA, ./data, ~/.cache/gloss_ray/data; else downloaded there)",
    "train_file": "training file (.csv, .jsonl or .parquet; a path or an s3:// / gs:// URI) instead of a benchmark",
    "hf_dataset": "a Hugging Face hub dataset name (needs internet)",
    "max_train": "use at most this many training documents (a stratified subset)",
    "max_eval": "use at most this many validation / test documents",
    "model": "encoder: hub name or local folder (default: the packaged all-MiniLM-L6-v2, offline)",
    "loss": f"one of {', '.join(LOSSES)}",
    "lam": "weight of the auxiliary loss: (1-lam)*CE + lam*aux",
    "gamma": "G-Loss: fraction of the batch whose labels stay visible",
    "sigma": "G-Loss kernel width: a number, or root | dicm | batch | batch-dicm",
    "k": "G-Loss: keep each node's k strongest edges ('dense' = all)",
    "variant": "G-Loss form: nll (principled) or paper (the authors' code)",
    "lam_schedule": "constant | linear_warmup | cosine | step, or a YAML dict",
    "sigma_schedule": "multiplier on sigma over training (same forms as --lam-schedule)",
    "k_schedule": "k over training (same forms as --lam-schedule)",
    "head_lr": "learning rate of the classifier head (default: --lr)",
    "global_k": "global graph: corpus neighbours per batch document (0 = off)",
    "pseudo_confidence": "global graph with --label-fraction < 1: an unlabelled neighbour joins with its pseudo-label "
                         "only if the label's share of its spread scores is at least this (0 = all)",
    "workers": "Ray Train workers (one per GPU with --gpu)",
    "cpus_per_worker": "CPUs each worker reserves; its PyTorch threads (default: 1 with --gpu, else the "
                       "machine's CPUs shared by the workers)",
    "gpus_per_worker": "share of a GPU each worker reserves with --gpu (Ray's fractional GPUs): 0.25 runs four "
                       "workers -- e.g. four runs of a sweep -- on one GPU; each still sees the whole GPU's memory",
    "max_steps": "stop after this many optimiser steps in all, mid-epoch if need be (schedules end there)",
    "storage": "where runs are written: a folder or s3://... / gs://... (Ray storage_path)",
    "name": "run name; re-use it with the same --storage to resume",
    "batch_size": "documents per worker per step (global batch = batch_size x workers)",
}


def _parse_scalar(text: str):
    if text.lower() in ("dense", "none", "null"):
        return None
    return yaml.safe_load(text)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field. A flag not given leaves no attribute (``SUPPRESS``), so a
    flag given always overrides the YAML file, also when its value is None (``--k dense``)."""
    p.add_argument("--config", help="YAML file of options (same names as the flags)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            if default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const=False,
                               default=argparse.SUPPRESS, help=f"turn off {f.name}")
            else:
                p.add_argument(flag, action="store_const", const=True, default=argparse.SUPPRESS,
                               help=HELP.get(f.name, f.name))
            continue
        if f.name in ("k", "sigma", "margin") or "schedule" in f.name:
            typ = _parse_scalar                          # words too: dense / none, root, cosine ...
        else:                                            # from the annotation ("int | None" -> int)
            typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        p.add_argument(flag, type=typ, default=argparse.SUPPRESS, metavar=f.name.upper(),
                       help=HELP.get(f.name, f.name.replace("_", " ")) + (f" (default: {default})" if default not in (None, "") else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gloss-ray", description="Fine-tune text encoders with G-Loss on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_options(sub.add_parser("train", help="fine-tune one model (Ray Train)"))

    for name in ("predict", "embed"):
        p = sub.add_parser(name, help=f"{name} a file of texts with a saved model")
        p.add_argument("--model-dir", required=True, help="a run's model folder")
        p.add_argument("--input", required=True, help=".txt (one text per line), .csv, .jsonl or .parquet")
        p.add_argument("--text-column", default="text")
        p.add_argument("--output", help="output file (.csv/.jsonl for predict; .npy/.parquet for embed)")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--max-length", type=int, default=None,
                       help="truncate texts to this many tokens (default: the length the model was trained with)")

    p = sub.add_parser("tune", help="Ray Tune search over losses and benchmarks, then final runs and a report")
    _add_sweep_options(p)
    p.add_argument("--space", default="tune_spaces/default.yaml")
    p.add_argument("--samples", type=int, default=8, help="trials per benchmark x loss")
    p.add_argument("--grace-epochs", type=int, default=1, help="ASHA: epochs before a trial may be stopped")

    p = sub.add_parser("bench", help="fixed configurations x seeds, no search (e.g. to reproduce the paper's table)")
    _add_sweep_options(p)

    p = sub.add_parser("report", help="summarise a results folder into report.md / report.html / results.csv")
    p.add_argument("results_dir")
    p.add_argument("--out", help="output folder (default: RESULTS_DIR)")

    from .download import add_parser as add_data_parser  # gloss-ray data download [NAME ...] [--dest DIR]
    add_data_parser(sub)
    return parser


def _add_sweep_options(p):
    """The options of tune and bench: the fields of :class:`gloss_ray.sweep.SweepOptions`."""
    from .options import BENCHMARKS

    p.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    p.add_argument("--losses", default="ce,gloss,scl",
                   help="comma-separated losses; bench also takes LOSS+global and LOSS@FRACTION (e.g. gloss+global@0.2)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--storage", default="runs")
    p.add_argument("--name", default=None, help="sweep name; re-use it to resume an interrupted sweep")
    p.add_argument("--config", help="YAML of base TrainConfig options for every run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base option (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per run")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--concurrency", type=int, default=None,
                   help="runs (trials) at a time (default: as many as the cluster's GPUs, or CPUs, hold)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep finished runs' and trials' Train checkpoints (default: removed; models and metrics stay)")


def _train_overrides(args) -> dict:
    """The options given on the command line (None included: ``--k dense``)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}


def train_config(args) -> TrainConfig:
    """``train``'s configuration: the ``--config`` YAML, then every flag given on the command line."""
    cfg = TrainConfig.from_sources(args.config, _train_overrides(args))
    cfg.extra["command"] = args.command_line     # for the model card
    return cfg


def cmd_train(args) -> int:
    from .train.launch import fit
    from .train.outputs import chance_note

    cfg = train_config(args)
    m = fit(cfg)
    print(f"test accuracy {m.get('test_accuracy', float('nan')):.4f}  macro-F1 {m.get('test_macro_f1', float('nan')):.4f}  "
          f"best epoch {m['best_epoch']}  wall {m['wall_time_s']:.0f}s")
    note = chance_note(m)
    if note:
        print(note)
    return 0


def cmd_predict_embed(args) -> int:
    from .inference import embed_file, predict_file

    fn = predict_file if args.command == "predict" else embed_file
    out = fn(args.model_dir, args.input, args.output, text_column=args.text_column, batch_size=args.batch_size,
             max_length=args.max_length)
    print(f"wrote {out}")
    return 0


def cmd_sweep(args) -> int:
    from . import sweep

    fields = {f.name for f in dataclasses.fields(sweep.SweepOptions)}   # the sweep's flags, by name
    return sweep.main(sweep.SweepOptions(**{k: v for k, v in vars(args).items() if k in fields}))


def cmd_report(args) -> int:
    from .report import build_report

    paths = build_report(args.results_dir, args.out)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def cmd_data(args) -> int:
    from .download import cli

    return cli(args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, with ``command_line`` (the command as typed, for the model card)."""
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["gloss-ray", *(sys.argv[1:] if argv is None else argv)])
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    args = parse_args(argv)
    handlers = {"train": cmd_train, "predict": cmd_predict_embed, "embed": cmd_predict_embed,
                "tune": cmd_sweep, "bench": cmd_sweep, "report": cmd_report, "data": cmd_data}
    try:
        return handlers[args.command](args)
    except GlossRayError as e:
        print(f"gloss-ray: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gloss-ray: interrupted; re-run the same command with the same --name to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
