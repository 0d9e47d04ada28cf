# Ray job: fine-tune one text encoder with `gloss-ray train` (Ray Train, one GPU per worker).
#
# On the cluster from cluster.yaml, with `ray dashboard cluster.yaml` running and
# RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 (see docs/cluster.md), from the repository root:
#
#   ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/finetune.py --benchmark mr --loss gloss --workers 4 --gpu --storage s3://YOUR-BUCKET/gloss-ray --name mr-gloss
#
# Without --storage the run goes to $GLOSS_RAY_STORAGE (set on every node by cluster.yaml).
# Re-submitting with the same --name and --storage resumes from the run's last checkpoint.
# Every other option is a `gloss-ray train` option (python jobs/finetune.py --help).
# Locally, `python jobs/finetune.py --benchmark mr --epochs 1 --max-train 256` starts a local Ray.
"""Entry point for ``ray job submit``: ``gloss-ray train`` with ``--storage`` defaulting to
``$GLOSS_RAY_STORAGE``. Works with gloss-ray installed or from a plain checkout.

The other jobs (sweep.py, benchmark.py, report.py) reuse :func:`run` and the helpers here."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

STORAGE_ENV = "GLOSS_RAY_STORAGE"


def load_cli():
    """``gloss_ray.cli``, from the installed package or else from the checkout this file is in."""
    try:
        from gloss_ray import cli
    except ImportError:
        root = str(Path(__file__).resolve().parents[1])
        sys.path.insert(0, root)
        # a local Ray started by this process hands its environment to the Ray Train workers
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        from gloss_ray import cli
    return cli


def has_option(argv: list[str], name: str) -> bool:
    """Whether ``argv`` sets ``--name`` (also as ``--name=x`` or an abbreviation), as argparse reads it."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(name, dest="value")
    known, _ = parser.parse_known_args([a for a in argv if a != "--"])
    return known.value is not None


def with_default_storage(argv: list[str]) -> list[str]:
    storage = os.environ.get(STORAGE_ENV)
    if has_option(argv, "--storage") or not storage:
        return list(argv)
    return [*argv, "--storage", storage]


def run(command: str, argv: list[str], storage_option: bool = True) -> int:
    """``gloss-ray COMMAND ARGV`` in this process (the job's driver); returns the exit status."""
    argv = with_default_storage(argv) if storage_option else list(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli = load_cli()
    if storage_option and not has_option(argv, "--storage") and os.environ.get("RAY_ADDRESS"):
        print(f"[gloss-ray job] no --storage and no ${STORAGE_ENV}: outputs stay in the job's working "
              "directory on the head node", flush=True)
    print(f"[gloss-ray job] gloss-ray {command} {' '.join(argv)}  (gloss_ray from "
          f"{Path(cli.__file__).parent})", flush=True)
    return cli.main([command, *argv])


def main(argv: list[str] | None = None) -> int:
    return run("train", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
