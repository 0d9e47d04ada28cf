# Ray job: classify (`gloss-ray predict`) or embed (`gloss-ray embed`) a corpus with a saved model, through
# Ray Data on the cluster's nodes, from the repository root:
#
#   ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/predict.py --model-dir s3://YOUR-BUCKET/gloss-ray/mr-gloss/model --input s3://YOUR-BUCKET/corpus/ --output s3://YOUR-BUCKET/predictions/mr-gloss/ --gpu
#   ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/predict.py embed --model-dir s3://YOUR-BUCKET/gloss-ray/mr-gloss/model --input s3://YOUR-BUCKET/corpus/ --output s3://YOUR-BUCKET/embeddings/mr-gloss/ --gpu
#
# The input is a file or a prefix of shards (.parquet, .csv, .jsonl or .txt), the output a new prefix of
# Parquet shards (<key>, label, confidence / <key>, embedding); --gpu gives each model actor one GPU
# (not yet run on a GPU: tested on a CPU head only), --actors sets how many (default: the cluster's
# GPUs). A job always runs through Ray Data (as `gloss-ray predict --ray`), so a single file is
# spread over the cluster too. Give the model, input and output as s3:// / gs:// URIs or as paths
# that exist on every node (a relative path means the job's uploaded working directory).
# Options: python jobs/predict.py --help (= gloss-ray predict --help; `embed --help` for embed).
# Connecting to the cluster, watching jobs, fetching results: docs/cluster.md.
"""Entry point for ``ray job submit``: ``gloss-ray predict`` (or, with ``embed`` first,
``gloss-ray embed``) through Ray Data."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # jobs/finetune.py holds the helpers
from finetune import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("predict", "embed") else "predict"
    if "--ray" not in argv and not {"-h", "--help"} & set(argv):
        argv.append("--ray")
    return run(command, argv, storage_option=False)


if __name__ == "__main__":
    sys.exit(main())
