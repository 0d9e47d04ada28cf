# Ray job: build the experiment report (`gloss-ray report`) from a results folder, from the
# repository root:
#
#   ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/report.py s3://YOUR-BUCKET/gloss-ray/sweep-mr-r8
#
# RESULTS may be a local folder or an s3:// / gs:// URI; without it, $GLOSS_RAY_STORAGE is used.
# For a URI only the small result files (metrics.json, history.csv, trials.json, plots/*.png) are
# fetched - no checkpoints or models - and the report is uploaded to RESULTS/report (or --out).
# Then fetch it with e.g. `aws s3 cp --recursive s3://YOUR-BUCKET/gloss-ray/sweep-mr-r8/report ./report`.
# Connecting to the cluster, watching jobs, fetching results: docs/cluster.md.
"""Entry point for ``ray job submit``: ``gloss-ray report`` that also reads and writes object storage."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # jobs/finetune.py holds the helpers
from finetune import STORAGE_ENV, load_cli, run  # noqa: E402


def _storage():
    """:mod:`gloss_ray.storage`, from the installed package or else from this checkout."""
    load_cli()
    from gloss_ray import storage

    return storage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/report.py", description=__doc__)
    parser.add_argument("results_dir", nargs="?", help=f"results folder or URI (default ${STORAGE_ENV})")
    parser.add_argument("--out", help="output folder or URI (default RESULTS/report)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    results = args.results_dir or os.environ.get(STORAGE_ENV)
    if not results:
        parser.error(f"give RESULTS_DIR or set ${STORAGE_ENV}")
    storage = _storage()
    out = args.out or storage.join(results, "report")
    if not storage.is_uri(results) and not storage.is_uri(out):
        return run("report", [results, "--out", out], storage_option=False)

    with tempfile.TemporaryDirectory(prefix="gloss_ray_report_") as tmp:
        local_results, local_out = Path(tmp) / "results", Path(tmp) / "report"
        if storage.is_uri(results):
            print(f"[gloss-ray job] fetching result files from {results}", flush=True)
            print(f"[gloss-ray job] {storage.fetch_report_inputs(results, local_results)} file(s) fetched", flush=True)
        else:
            local_results = Path(results)
        status = run("report", [str(local_results), "--out", str(local_out)], storage_option=False)
        if status == 0:
            storage.upload_dir(local_out, out)     # a URI or a local folder
            print(f"[gloss-ray job] report written to {out}", flush=True)
        return status


if __name__ == "__main__":
    sys.exit(main())
