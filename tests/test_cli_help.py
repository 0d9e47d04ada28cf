"""Every option of every ``gloss-ray`` subcommand explains itself in ``--help``: what it does, its
choices, its default and its unit. No Ray, no data: only the parser is built."""
import argparse
import dataclasses
import re

import pytest

from gloss_ray.cli import build_parser
from gloss_ray.config import TrainConfig
from gloss_ray.graph.index import BACKENDS
from gloss_ray.model import POOLINGS
from gloss_ray.options import (BENCHMARKS, CLASS_WEIGHTS, LOSSES, MASKS, SCHEDULE_KINDS, SIGMA_STRATEGIES,
                               VARIANTS)

# the names an option takes, by dest (argparse ``choices`` are checked too)
CHOICES = {
    "benchmark": BENCHMARKS, "benchmarks": BENCHMARKS, "names": BENCHMARKS,
    "loss": LOSSES, "losses": LOSSES, "variant": VARIANTS, "mask": MASKS, "class_weights": CLASS_WEIGHTS,
    "pooling": POOLINGS, "index": ("auto", *BACKENDS), "sigma": SIGMA_STRATEGIES,
    "lam_schedule": SCHEDULE_KINDS, "sigma_schedule": SCHEDULE_KINDS, "k_schedule": SCHEDULE_KINDS,
    "k": ("dense", "null"),
}
# words that say nothing about an option by themselves
FILLER = {"a", "an", "the", "of", "to", "for", "and", "or", "in", "on", "off", "turn", "use", "set", "value",
          "option", "this", "is", "be", "it", "its", "by", "with", "default", "none", "true", "false"}
# what a number counts or measures: a numeric option's help names one of these
UNITS = re.compile(
    r"\b(tokens?|documents?|docs|texts?|epochs?|steps?|seconds?|trials?|runs?|seeds?|workers?|CPUs?|GPUs?|"
    r"neighbours?|nodes?|edges?|fraction|share|rate|weight|multiplier|probability|ratio|norm|temperature|"
    r"margin|confidence|distance|integer|count)\b", re.I)


def _subcommands(parser, prefix="gloss-ray"):
    """``(name, parser)`` of every subcommand, nested ones (``data download``) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, f"{prefix} {name}")
    if prefix != "gloss-ray":
        yield prefix, parser


def _options():
    out = []
    for command, parser in _subcommands(build_parser()):
        fmt = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = fmt._expand_help(action) if action.help else ""
            out.append(pytest.param(command, action, text, id=f"{command} {(action.option_strings or [action.dest])[0]}"))
    return out


def _default(command: str, action: argparse.Action):
    """The value the option has when not given: ``train``'s flags leave the TrainConfig field's."""
    if action.default is argparse.SUPPRESS and command == "gloss-ray train":
        fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        return fields.get(action.dest)
    return None if action.default is argparse.SUPPRESS else action.default


def name_words(action: argparse.Action) -> set[str]:
    names = [action.dest, action.metavar or "", *action.option_strings]
    return {w for n in names if isinstance(n, str) for w in re.split(r"[^a-z0-9]+", n.lower()) if w}


def only_repeats_name(help_text: str, action: argparse.Action) -> bool:
    """True when the help, less its ``(default: ...)`` part and filler words, says no more than the
    option's own name (``--pooling POOLING  pooling (default: cls)``)."""
    text = re.sub(r"\(default:[^)]*\)", " ", help_text or "").lower()
    words = [w for w in re.split(r"[^a-z0-9]+", text) if w and w not in FILLER]
    return len(set(words) - name_words(action)) < 3


def _shows(text: str, value) -> bool:
    forms = {str(value), f"{value:g}" if isinstance(value, float) else str(value)}
    return any(re.search(rf"(?<![\w.-]){re.escape(f)}(?![\w-])", text) for f in forms)


@pytest.mark.parametrize("line, dest, metavar, flags", [
    ("pooling (default: cls)", "pooling", "POOLING", ["--pooling"]),
    ("mask (default: random)", "mask", "MASK", ["--mask"]),
    ("index (default: auto)", "index", "INDEX", ["--index"]),
    ("global weight", "global_weight", "GLOBAL_WEIGHT", ["--global-weight"]),
    ("turn off progress", "progress", None, ["--no-progress"]),
    ("", "text_column", None, ["--text-column"]),
])
def test_the_check_catches_help_that_only_repeats_the_name(line, dest, metavar, flags):
    """The examples of issue 24: the check below must flag them."""
    action = argparse.Action(flags, dest, metavar=metavar, help=line)
    assert only_repeats_name(line, action)


@pytest.mark.parametrize("command, action, text", _options())
def test_every_option_explains_itself(command, action, text):
    flag = (action.option_strings or [action.dest])[0]
    assert text.strip(), f"{command} {flag}: no help text"
    assert not only_repeats_name(text, action), f"{command} {flag}: help only repeats the name: {text!r}"

    for choice in list(CHOICES.get(action.dest, ())) + list(action.choices or ()):
        assert re.search(rf"(?<![\w-]){re.escape(str(choice))}(?![\w-])", text), \
            f"{command} {flag}: help does not name the choice {choice!r}: {text!r}"

    default = _default(command, action)
    takes_value = action.nargs != 0
    if takes_value and default not in (None, "", [], False):
        assert "default" in text and _shows(text, default), \
            f"{command} {flag}: help does not show the default {default!r}: {text!r}"

    numeric = action.type in (int, float) or isinstance(default, (int, float)) and not isinstance(default, bool)
    if takes_value and numeric:
        assert UNITS.search(text), f"{command} {flag}: a number, but the help names no unit: {text!r}"


def test_every_train_option_has_a_flag_and_provenance_has_none():
    """The options a user sets are flags; what gloss-ray records itself (the command line, a sweep's stage
    and trial) is not."""
    from gloss_ray.config import OPTIONS

    parser = dict(_subcommands(build_parser()))["gloss-ray train"]
    dests = {a.dest for a in parser._actions}
    assert {name for name, opt in OPTIONS.items() if opt.flag} <= dests
    assert {"command", "stage", "trial_id"} & dests == set()
