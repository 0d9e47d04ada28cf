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

from .config import OPTIONS, PATHS_NOTE, TrainConfig
from .data import CACHE_ENV, cache_dir
from .options import BENCHMARKS, LOSSES, TRACKERS
from .errors import ConfigError, GlossRayError
from .log import fail, say
from .sweep.algorithms import SCHEDULERS, SEARCH_ALGS

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
        opt = OPTIONS[f.name]
        if not opt.flag:
            continue
        flag = "--" + f.name.replace("_", "-")
        default, text = f.default, opt.help
        if isinstance(default, bool):
            if default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const=False,
                               default=argparse.SUPPRESS, help=text)
            else:
                p.add_argument(flag, action="store_const", const=True, default=argparse.SUPPRESS, help=text)
            continue
        if opt.words:
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

    _add_data_download(sub.add_parser("data", help="get the benchmark corpora"))
    return parser


def _add_data_download(data) -> None:
    """``gloss-ray data download [NAME ...] [--dest DIR] [--force]``."""
    p = data.add_subparsers(dest="data_command", required=True).add_parser(
        "download", help="download and convert benchmarks (default: all five)")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks: {', '.join(BENCHMARKS)}")
    p.add_argument("--dest", help=f"folder to write <name>/ into (default: {cache_dir()}, see ${CACHE_ENV})")
    p.add_argument("--force", action="store_true", help="download again even if already there")


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
                        f"through Ray Data ({PATHS_NOTE})")
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
                        f"({PATHS_NOTE}); the report goes to <storage>/<name>/report/ either way (on s3:// / gs:// "
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
    p.add_argument("--report-to", default=None, metavar="TRACKERS",
                   help=f"experiment trackers every run of the sweep logs to, comma-separated, of {', '.join(TRACKERS)}: "
                        "as gloss-ray train --report-to; MLflow gets one run per trial and per final / bench run, "
                        "all under one experiment named after the sweep (--set experiment=NAME to change it), "
                        "and the sweep's report as artifacts of one more run; --set log_every=N sets the steps "
                        "between per-step metric rows, --set log_model=true adds each run's model folder "
                        "(default: none)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI with --report-to mlflow: a server (http://host:5000) or a database "
                        "(sqlite:///path/mlflow.db) (default: sqlite:///<storage>/mlflow.db, artifacts in "
                        "<storage>/mlartifacts; --storage must then be a local folder)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep finished runs' and trials' Train checkpoints, about 350 MB each for MiniLM "
                        "(default: deleted once a run's metrics are written; models and metrics stay)")


def _train_overrides(args) -> dict:
    """The options given on the command line (None included: ``--k dense``)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}


def train_config(args) -> TrainConfig:
    """``train``'s configuration: the ``--config`` YAML, then every flag given on the command line."""
    return TrainConfig.from_sources(args.config, {**_train_overrides(args), "command": args.command_line})


def fetch_data(benchmark: str | None, data_dir: str | None) -> str | None:
    """The one place gloss-ray fetches data: on the driver, before a run or a sweep starts, a named
    benchmark that no data folder holds (:func:`gloss_ray.data.find_benchmark`) is downloaded, with a line
    saying so (:func:`gloss_ray.download.find_or_download`). Returns the data folder to pin in the run's
    options (Ray workers and trials may not share the driver's environment); ``data_dir`` without a
    benchmark."""
    if benchmark is None:
        return data_dir
    from .download import find_or_download

    return str(find_or_download(benchmark, data_dir))


def cmd_train(args) -> int:
    from .train.launch import fit
    from .train.outputs import chance_note

    cfg = train_config(args)
    cfg = dataclasses.replace(cfg, data_dir=fetch_data(cfg.benchmark, cfg.data_dir))
    m = fit(cfg)
    print(f"test accuracy {m.get('test_accuracy', float('nan')):.4f}  macro-F1 {m.get('test_macro_f1', float('nan')):.4f}  "
          f"best epoch {m['best_epoch']}  wall {m['wall_time_s']:.0f}s")
    note = chance_note(m)
    if note:
        say(note)
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
    plan = sweep.make_plan(sweep.SweepOptions(**{k: v for k, v in vars(args).items() if k in fields}))
    for base in plan.bases.values():        # every option checked; now the data, then the sweep
        base["data_dir"] = fetch_data(base["benchmark"], base["data_dir"])
    return sweep.main(plan)


def cmd_report(args) -> int:
    from .report import build_report

    paths = build_report(args.results_dir, args.out)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def cmd_data(args) -> int:
    """``gloss-ray data download``: prints each benchmark folder."""
    from .download import download

    for folder in download(args.names, args.dest, force=args.force):
        print(folder)
    return 0


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
        fail(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        fail("interrupted; re-run the same command with the same --name to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
