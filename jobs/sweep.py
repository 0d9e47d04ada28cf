# Ray job: hyper-parameter search with `gloss-ray tune` (Ray Tune over benchmarks x losses, then the
# final runs with the best configurations and a report), from the repository root:
#
#   ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/sweep.py --benchmarks mr,r8 --losses ce,gloss --space tune_spaces/default.yaml --samples 16 --workers 1 --gpu --concurrency 4 --storage s3://YOUR-BUCKET/gloss-ray --name sweep-mr-r8
#
# Concurrent trials x --workers must fit the cluster's GPUs: with cluster.yaml's up to 4 one-GPU
# nodes and --workers 1, --concurrency 4. Pass --concurrency on an autoscaling cluster: by default
# it is sized to the GPUs present when the sweep starts (none, before the autoscaler adds nodes).
# Without --storage the sweep goes to $GLOSS_RAY_STORAGE. An interrupted sweep (cluster restart,
# stopped job) resumes when submitted again with the same --name and --storage.
# Options: python jobs/sweep.py --help (= gloss-ray tune --help).
# Connecting to the cluster, watching jobs, fetching results: docs/cluster.md.
"""Entry point for ``ray job submit``: ``gloss-ray tune`` with ``--storage`` defaulting to
``$GLOSS_RAY_STORAGE``."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # jobs/finetune.py holds the helpers
from finetune import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run("tune", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
