# Ray job: fixed configurations x seeds with `gloss-ray bench` (no search; e.g. the paper's table),
# from the repository root:
#
#   ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/benchmark.py --benchmarks mr,r8,r52,ohsumed,20ng --losses ce,gloss --seeds 3 --workers 1 --gpu --storage s3://YOUR-BUCKET/gloss-ray --name paper-table
#
# Each run uses --workers GPUs (with --gpu). Without --storage the results go to
# $GLOSS_RAY_STORAGE; an interrupted benchmark resumes when submitted again with the same --name and
# --storage. Options: python jobs/benchmark.py --help (= gloss-ray bench --help).
# Connecting to the cluster, watching jobs, fetching results: docs/cluster.md.
"""Entry point for ``ray job submit``: ``gloss-ray bench`` with ``--storage`` defaulting to
``$GLOSS_RAY_STORAGE``."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # jobs/finetune.py holds the helpers
from finetune import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run("bench", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
