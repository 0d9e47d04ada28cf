"""The commands in README.md and docs/*.md parse with gloss-ray's own parser: every ``gloss-ray ...``
command (and every ``python jobs/<script>.py ...`` job, which takes the same options) in a shell code
block -- backslash continuations joined -- or in an inline code span. Every flag must exist and every
choice named must be accepted. Nothing is run: no Ray, no data, no model."""
import argparse
import re
import shlex
from pathlib import Path

import pytest

from gloss_ray.cli import _train_overrides, build_parser
from gloss_ray.config import OPTIONS
from gloss_ray.options import BENCHMARKS, LOSSES
from gloss_ray.sweep.plan import parse_loss_spec, parse_sets, split_list

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
JOBS = {"jobs/finetune.py": "train", "jobs/sweep.py": "tune", "jobs/benchmark.py": "bench", "jobs/report.py": "report",
        "jobs/predict.py": "predict"}      # jobs/predict.py embed ...: gloss-ray embed
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
STOP = {"&&", "||", ";", "|", "&", ">", ">>", "<", "2>", "2>&1"}
PLACEHOLDER = re.compile(r"^([A-Z][A-Z0-9_]*|<[^>]*>|\$\{?\w+\}?.*)$")   # S, N, DIR, <dir>, $DATA...
ROOT_FILES = ("configs/", "tune_spaces/")     # paths the docs name inside this repository: must exist


class ParseError(Exception):
    pass


def _raise(message):
    raise ParseError(message)


def _strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The CLI's parser and its subparsers raising instead of exiting."""
    parser.error = _raise
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _strict(sub)
    return parser


PARSER = _strict(build_parser())


def _subparser(command: str) -> argparse.ArgumentParser:
    for action in PARSER._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


# --------------------------------------------------------------------------- extraction
def _tokens(text: str) -> list[str]:
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split, lex.commenters = True, "#"
    return list(lex)


def _commands_in(tokens: list[str]) -> list[list[str]]:
    """Every ``gloss-ray ...`` or ``python jobs/X.py ...`` in a shell line, up to the next operator,
    as ``["gloss-ray", subcommand, args...]``."""
    out = []
    for i, tok in enumerate(tokens):
        if tok == "gloss-ray" and (i == 0 or tokens[i - 1] not in ("cd", "clone", "REPOSITORY_URL")):
            rest = tokens[i + 1:]
        elif tok in JOBS and i > 0 and tokens[i - 1].startswith("python"):
            rest = tokens[i + 1:]
            rest = rest if tok == "jobs/predict.py" and rest[:1] == ["embed"] else [JOBS[tok], *rest]
        else:
            continue
        end = next((j for j, t in enumerate(rest) if t in STOP), len(rest))
        out.append(["gloss-ray", *rest[:end]])
    return out


def extract(path: Path) -> list[tuple[str, bool, list[str]]]:
    """``(where, full, argv)`` of every command in a Markdown file; ``full`` for code blocks (whole
    commands), not for inline spans (which may name a command without its required arguments)."""
    found, fence, block = [], None, []
    lines = path.read_text().splitlines()
    prose = []
    for n, line in enumerate(lines, 1):
        m = re.match(r"^\s*```\s*([\w-]*)", line)
        if m and fence is None:
            fence, block = m.group(1).lower(), []
            prose.append("")
            continue
        if m and fence is not None:
            if fence in SHELL_FENCES:
                joined, start = "", None
                for k, text in block:
                    start = start or k
                    if text.rstrip().endswith("\\"):
                        joined += text.rstrip()[:-1] + " "
                        continue
                    joined += text
                    if "gloss-ray" not in joined and "jobs/" not in joined:
                        joined, start = "", None
                        continue
                    try:
                        commands = _commands_in(_tokens(joined))
                    except ValueError as e:             # unbalanced quotes: a broken command
                        commands = [["gloss-ray", f"<not a shell command: {e}: {joined.strip()}>"]]
                    for argv in commands:
                        found.append((f"{path.name}:{start}", True, argv))
                    joined, start = "", None
            fence = None
            prose.append("")
            continue
        if fence is not None:
            block.append((n, line))
            prose.append("")
        else:
            prose.append(line)
    text = "\n".join(prose)
    for m in re.finditer(r"`(gloss-ray(?:\s[^`]*)?)`", text):
        span = re.sub(r"\s+", " ", m.group(1)).replace("[", " ").replace("]", " ").replace("...", " ")
        line = text.count("\n", 0, m.start()) + 1
        for argv in _commands_in(_tokens(span)):
            found.append((f"{path.name}:{line}", False, argv))
    return found


COMMANDS = [c for path in DOCS for c in extract(path)]


# --------------------------------------------------------------------------- checks
def _fill_placeholders(sub: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """A placeholder value (``--seed S``, ``--model $MODEL``) becomes one the option's type reads."""
    by_flag = {s: a for a in sub._actions for s in a.option_strings}
    out = list(argv)
    for i in range(1, len(out)):
        action = by_flag.get(out[i - 1])
        if action is not None and action.nargs != 0 and PLACEHOLDER.match(out[i]):
            out[i] = {int: "1", float: "0.5"}.get(action.type, out[i]) if action.type in (int, float) \
                else ("1" if action.type is not None and action.type is not str else out[i])
    return out


def _check_train(args) -> None:
    """Every value given is one its option's own check accepts (placeholders such as DIR aside)."""
    for key, value in _train_overrides(args).items():
        if not (isinstance(value, str) and PLACEHOLDER.match(value)):
            try:
                OPTIONS[key].check(value)
            except ValueError as e:
                raise AssertionError(f"--{key.replace('_', '-')} {value!r}: {e}") from None


def _check_sweep(args) -> None:
    for b in split_list(args.benchmarks):
        assert b in BENCHMARKS, f"--benchmarks: {b!r} is not a benchmark"
    for spec in split_list(args.losses):
        loss, _, _ = parse_loss_spec(spec)
        assert loss in LOSSES, f"--losses: {loss!r} is not a loss"
    from gloss_ray.config import TrainConfig

    fields = {f for f in TrainConfig.__dataclass_fields__}
    for key, value in parse_sets(args.set).items():
        assert key in fields, f"--set {key}: not an option"
        if key in OPTIONS and not (isinstance(value, str) and PLACEHOLDER.match(value)):
            OPTIONS[key].check(value)


def _check_paths(args) -> None:
    for key in ("config", "space"):
        value = getattr(args, key, None)
        if isinstance(value, str) and value.startswith(ROOT_FILES):
            assert (REPO / value).is_file(), f"--{key} {value}: no such file in the repository"


def check(argv: list[str], full: bool) -> None:
    """Parse ``argv`` (``["gloss-ray", ...]``) with the CLI's parser and check the values it names."""
    rest = argv[1:]
    if not rest:
        return
    if rest[0] not in {a for act in PARSER._actions if isinstance(act, argparse._SubParsersAction)
                       for a in act.choices}:
        raise ParseError(f"unknown subcommand {rest[0]!r}")
    if "-h" in rest or "--help" in rest:
        return                      # `gloss-ray train --help`: the subcommand exists, nothing to parse
    rest = [rest[0], *_fill_placeholders(_subparser(rest[0]), rest[1:])]
    try:
        args = PARSER.parse_args(rest)
    except ParseError as e:
        if not full and "the following arguments are required" in str(e):
            return                  # an inline mention of a command, without its required arguments
        raise
    if args.command == "train":
        _check_train(args)
    elif args.command in ("tune", "bench"):
        _check_sweep(args)
    _check_paths(args)


def test_the_docs_have_commands_to_check():
    where = {w.split(":")[0] for w, _, _ in COMMANDS}
    assert {"README.md", "benchmarks.md", "cluster.md"} <= where
    assert any(full and len(argv) > 8 for _, full, argv in COMMANDS)     # multi-line ones joined


@pytest.mark.parametrize("bad", [
    "gloss-ray report runs docs/results/mr_cpu_subset",            # issue 28: two positionals
    "gloss-ray train --benchmark mr --no-such-flag 1",
    "gloss-ray train --benchmark mr --loss focal",
    "gloss-ray train --benchmark mr --sigma fixed",
    "gloss-ray train --benchmark mr --pooling max",
    "gloss-ray train --benchmark mr --index hnsw",
    "gloss-ray bench --benchmarks mr,imdb --losses ce",
    "gloss-ray bench --benchmarks mr --losses ce,focal",
    "gloss-ray bench --benchmarks mr --losses ce --set no_such_option=1",
    "gloss-ray tune --benchmarks mr --losses ce --space tune_spaces/missing.yaml",
])
def test_the_check_refuses_bad_commands(bad):
    with pytest.raises((ParseError, ValueError, AssertionError)):     # ConfigError is a ValueError
        check(shlex.split(bad), full=True)


def test_extraction_joins_continued_lines_and_reads_inline_spans(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("Run `gloss-ray report RESULTS_DIR`.\n\n```bash\n# comment\n"
                  "gloss-ray bench --benchmarks mr \\\n    --losses ce,gloss --seeds 3   # note\n"
                  "ray job submit --working-dir . -- python jobs/finetune.py --benchmark mr --gpu\n```\n")
    got = [(full, argv) for _, full, argv in extract(md)]
    assert (True, ["gloss-ray", "bench", "--benchmarks", "mr", "--losses", "ce,gloss", "--seeds", "3"]) in got
    assert (True, ["gloss-ray", "train", "--benchmark", "mr", "--gpu"]) in got
    assert (False, ["gloss-ray", "report", "RESULTS_DIR"]) in got


@pytest.mark.parametrize("where, full, argv", [pytest.param(*c, id=f"{c[0]} {' '.join(c[2][:3])}") for c in COMMANDS])
def test_documented_command_parses(where, full, argv):
    try:
        check(argv, full)
    except (ParseError, ValueError, AssertionError) as e:
        pytest.fail(f"{where}: {shlex.join(argv)}\n  -> {e}")


def test_every_flag_named_in_the_readme_exists():
    """Flags named alone in the README's prose (`--keep-checkpoints`) are options of some subcommand."""
    known = set()
    for act in PARSER._actions:
        if isinstance(act, argparse._SubParsersAction):
            for sub in act.choices.values():
                stack = [sub]
                while stack:
                    p = stack.pop()
                    for a in p._actions:
                        known.update(a.option_strings)
                        if isinstance(a, argparse._SubParsersAction):
                            stack.extend(a.choices.values())
    text = re.sub(r"```.*?```", "", (REPO / "README.md").read_text(), flags=re.S)
    named = set()
    for span in re.findall(r"`([^`]+)`", text):
        if span.startswith(("ray ", "pip ", "python ", "aws ", "bash ")):
            continue
        named.update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span))
    assert named, "no flags found in the README"
    unknown = sorted(named - known)
    assert not unknown, f"README names flags that no gloss-ray subcommand has: {unknown}"


def test_the_readmes_first_command_installs_then_runs_gloss_ray():
    """CI and a new user run the README's first command as written: the first line of a shell block
    that names gloss-ray (``.ci/readme_command.py``). It must be ``<install> && gloss-ray train ...``
    -- a ``git clone ... gloss-ray`` line there would be taken for it and fail on its placeholder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_command", REPO / ".ci" / "readme_command.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cmd = mod.first_command(str(REPO / "README.md"))
    install, _, run = cmd.rpartition("&&")
    assert install.strip().startswith("pip install -e"), cmd
    assert shlex.split(run)[:2] == ["gloss-ray", "train"], cmd
    _strict(build_parser()).parse_args(shlex.split(run)[1:])
