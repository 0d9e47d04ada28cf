#!/usr/bin/env bash
# CI: the README's first command, read from the README (not a copy of it), typed as a new user
# would in a fresh clone in a temporary folder; fails unless metrics.json lands where the command
# says (--storage/--name, relative to the clone) with test accuracy >= 0.75.
#   bash .ci/first_run.sh            (GLOSS_RAY_DATA must point at the benchmarks: CI is offline)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d /tmp/gloss-ray-first-run.XXXX)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
cd "$work/clone"
cmd="$(python3 .ci/readme_command.py README.md)"
echo "README's first command: $cmd"
# A venv that sees the packages CI already installed, so the README's install step only links the
# clone (the command still runs it as written).
python3 -m venv --system-site-packages "$work/venv"
. "$work/venv/bin/activate"
SECONDS=0
bash -c "$cmd" 2>&1 | tee "$work/run.log"
echo "first command: ${SECONDS} s"
python3 .ci/readme_command.py README.md --check-metrics --min-accuracy 0.75 --log "$work/run.log"
