"""The README's first command (the first ``bash`` block's first line that runs gloss-ray), and where
its ``metrics.json`` must land: ``<--storage>/<--name>/metrics.json`` relative to the current folder.

    python3 .ci/readme_command.py README.md                       # print the command
    python3 .ci/readme_command.py README.md --check-metrics --min-accuracy 0.75
"""
import argparse
import json
import re
import shlex
import sys
from pathlib import Path


def first_command(readme: str) -> str:
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", Path(readme).read_text(), re.S):
        for line in block.splitlines():
            cmd = line.split("#")[0].strip()
            if cmd and "gloss-ray" in cmd:
                return cmd
    sys.exit(f"{readme}: no command running gloss-ray in a bash block")


def expected_metrics(cmd: str) -> Path:
    run = shlex.split(cmd.split("&&")[-1])
    opts = {k: v for k, v in zip(run, run[1:]) if k.startswith("--")}
    if "--name" not in opts:
        sys.exit(f"the README's first command names no run (--name): {cmd}")
    return Path(opts.get("--storage", "runs")) / opts["--name"] / "metrics.json"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("readme")
    p.add_argument("--check-metrics", action="store_true")
    p.add_argument("--min-accuracy", type=float, default=0.75)
    a = p.parse_args()
    cmd = first_command(a.readme)
    if not a.check_metrics:
        print(cmd)
        return
    path = expected_metrics(cmd)
    if not path.is_file():
        sys.exit(f"FAIL: {path.resolve()} was not written by: {cmd}")
    acc = json.loads(path.read_text())["test_accuracy"]
    print(f"{path}: test accuracy {acc:.4f} (need >= {a.min_accuracy})")
    if acc < a.min_accuracy:
        sys.exit("FAIL: the first run did not learn enough")


if __name__ == "__main__":
    main()
