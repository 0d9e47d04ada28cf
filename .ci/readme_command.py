"""The README's first command (the first ``bash`` block's first line that runs gloss-ray), and where
its ``metrics.json`` must land: ``<--storage>/<--name>/metrics.json`` relative to the current folder.

    python3 .ci/readme_command.py README.md                       # print the command
    python3 .ci/readme_command.py README.md --check-metrics --min-accuracy 0.75 [--log RUN_LOG]
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


# Output a user cannot act on, each seen in a first run before it was fixed at its cause
NOISE = {
    "bytecode listing": re.compile(r"\b(LOAD_GLOBAL|RETURN_VALUE|LOAD_FAST)\b"),
    "Ray Train's per-epoch report dump": re.compile(r"Reporting training result"),
    "lr_scheduler order warning": re.compile(r"lr_scheduler\.step\(\)"),
    "FAISS loader chatter": re.compile(r"Loading faiss|Successfully loaded faiss"),
    "transformers load report": re.compile(r"LOAD REPORT|newly initialized"),
    "Ray token-auth notice": re.compile(r"Token authentication is enabled"),
    "traceback": re.compile(r"Traceback \(most recent call last\)"),
}


def check_log(path: str) -> list[str]:
    """Problems in the run's log: known noise, and a gloss-ray line printed more than once."""
    lines = Path(path).read_text(errors="replace").splitlines()
    problems = [f"{what}: {ln.strip()[:160]}" for ln in lines for what, pat in NOISE.items() if pat.search(ln)]
    ours = [re.sub(r"^.*?\[gloss-ray\]", "[gloss-ray]", ln) for ln in lines if "[gloss-ray]" in ln]
    problems += [f"printed twice: {ln[:160]}" for ln in sorted({x for x in ours if ours.count(x) > 1})]
    for ln in lines:                                       # shown, not failed: judged by a person
        if "warning" in ln.lower() and not any(p.endswith(ln.strip()[:160]) for p in problems):
            print(f"note: a warning in the log: {ln.strip()[:200]}")
    return problems


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("readme")
    p.add_argument("--check-metrics", action="store_true")
    p.add_argument("--min-accuracy", type=float, default=0.75)
    p.add_argument("--log", help="the run's output: fail on noise a user cannot act on")
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
    if a.log:
        problems = check_log(a.log)
        if problems:
            sys.exit("FAIL: the first run's log has output a user cannot act on:\n  " + "\n  ".join(problems))
        print(f"{a.log}: clean")


if __name__ == "__main__":
    main()
