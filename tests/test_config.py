"""TrainConfig files and options: configs/*.yaml, numbers from YAML, bench loss specs, the head's rate."""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from gloss_ray.config import TrainConfig
from gloss_ray.errors import ConfigError
from gloss_ray.sweep import base_configs, parse_loss_spec

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))
# the config files README.md and docs/*.md tell users to pass
NAMED = sorted({m for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]
                for m in re.findall(r"configs/[\w.-]+\.yaml", doc.read_text())})


@pytest.mark.parametrize("name", NAMED)
def test_every_config_file_the_docs_name_makes_a_run(name):
    assert TrainConfig.from_sources(str(REPO / name), {"benchmark": "mr"}).run_name.startswith("mr-")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_is_a_valid_train_config(path):
    raw = yaml.safe_load(path.read_text())
    cfg = TrainConfig.from_sources(str(path), {"benchmark": "mr"})
    for key, value in raw.items():              # every key is read, and as a number where one is meant
        assert getattr(cfg, key) == (float(value) if isinstance(getattr(cfg, key), float) else value), key


def test_config_file_with_an_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("max_train: 10\nlearning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*learning_rate"):
        TrainConfig.from_sources(str(p), {"benchmark": "mr"})


def test_yaml_exponent_without_dot_is_read_as_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-4\nhead_lr: 3e-3\n")              # YAML 1.1 loads both as strings
    cfg = TrainConfig.from_sources(str(p), {"benchmark": "mr"})
    assert (cfg.lr, cfg.head_lr) == (1e-4, 3e-3)


def test_a_word_where_a_number_is_meant_names_the_key():
    with pytest.raises(ConfigError, match="lr: must be a number > 0, got 'fast'"):
        TrainConfig.from_dict({"benchmark": "mr", "lr": "fast"})
    with pytest.raises(ConfigError, match="head_lr"):
        TrainConfig.from_dict({"benchmark": "mr", "head_lr": 0})


@pytest.mark.parametrize("key, value", [("pooling", "max"), ("index", "annoy"), ("dropout", 1.5), ("seed", -1),
                                        ("benchmark", "imdb"), ("progress", "yes"), ("text_column", ""),
                                        ("max_train", 0), ("stage", "warmup")])
def test_every_option_is_checked_on_the_driver(key, value):
    """Options that were only checked on a worker (or never) fail where the config is made, naming the key."""
    with pytest.raises(ConfigError, match=rf"^run\.yaml: {key}: must be .*, got {value!r}$"):
        TrainConfig.from_dict({"benchmark": "mr", key: value}, source="run.yaml")


def test_a_benchmark_name_is_read_in_any_case():
    assert TrainConfig(benchmark="MR").benchmark == "MR"


def test_label_fraction_works_with_every_loss_but_global_k_only_with_gloss():
    assert TrainConfig(benchmark="mr", loss="ce", label_fraction=0.2).label_fraction == 0.2
    with pytest.raises(ConfigError, match="global_k"):
        TrainConfig(benchmark="mr", loss="ce", global_k=16)


# --------------------------------------------------------------------------- bench loss specs
@pytest.mark.parametrize("spec, parsed", [("ce", ("ce", False, None)), ("gloss+global", ("gloss", True, None)),
                                          ("ce@0.2", ("ce", False, 0.2)), ("gloss+global@0.2", ("gloss", True, 0.2))])
def test_loss_spec_is_parsed(spec, parsed):
    assert parse_loss_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["gloss+glob", "ce@", "ce@0.2.1", "@0.2", "gloss global"])
def test_malformed_loss_spec_is_an_error_naming_it(spec):
    with pytest.raises(ConfigError, match="--losses"):
        parse_loss_spec(spec)


def _args(*sets, config=None):
    return SimpleNamespace(workers=1, gpu=False, set=list(sets), config=config)


def test_bench_specs_compare_batch_and_global_gloss():
    bases = base_configs(_args(), ["mr"], ["ce", "gloss", "gloss+global", "gloss+global@0.2"])
    got = {spec: (d["loss"], d["global_k"], d["label_fraction"]) for (_, spec), d in bases.items()}
    assert got == {"ce": ("ce", 0, 1.0), "gloss": ("gloss", 0, 1.0), "gloss+global": ("gloss", 16, 1.0),
                   "gloss+global@0.2": ("gloss", 16, 0.2)}


def test_bench_global_k_option_applies_only_to_global_specs():
    bases = base_configs(_args("global_k=8"), ["mr"], ["ce", "gloss", "gloss+global"])
    assert [d["global_k"] for d in bases.values()] == [0, 0, 8]


def test_each_sweep_run_is_checked_with_its_own_loss(tmp_path):
    """A base file of a CE run with a global graph is fine for G-Loss runs and refused, naming the file
    and the loss spec, for the CE runs it would make."""
    base = tmp_path / "base.yaml"
    base.write_text("loss: ce\nglobal_k: 8\n")
    assert base_configs(_args(config=str(base)), ["mr"], ["gloss"])[("mr", "gloss")]["global_k"] == 8
    with pytest.raises(ConfigError, match=r"base\.yaml with --losses ce: global_k: the global graph feeds G-Loss"):
        base_configs(_args(config=str(base)), ["mr"], ["ce"])


def test_without_global_specs_the_options_apply_as_given():
    bases = base_configs(_args("global_k=8"), ["mr"], ["gloss"])
    assert bases[("mr", "gloss")]["global_k"] == 8
    with pytest.raises(ConfigError, match="global_k"):
        base_configs(_args("global_k=8"), ["mr"], ["ce", "gloss"])


# --------------------------------------------------------------------------- optimiser groups
def test_head_has_its_own_learning_rate_and_every_parameter_one_group(tiny_model_dir):
    import torch

    from gloss_ray.model import TextClassifier
    from gloss_ray.train.loop import param_groups

    model = TextClassifier.from_encoder(tiny_model_dir, 3)
    cfg = TrainConfig(benchmark="mr", lr=1e-4, head_lr=3e-3)
    groups = param_groups(model, cfg)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())          # each exactly once
    head = [g for g in groups if g.get("lr") == 3e-3]
    assert len(head) == 1 and {id(p) for p in head[0]["params"]} == {id(p) for p in model.head.parameters()}
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-4, 3e-3]
    same = param_groups(model, TrainConfig(benchmark="mr", lr=1e-4))
    assert {g.get("lr", 1e-4) for g in same} == {1e-4}


def test_tune_rejects_bench_specs_before_anything_runs(tmp_path, capsys):
    from gloss_ray import cli

    assert cli.main(["tune", "--benchmarks", "mr", "--losses", "ce,gloss+global", "--storage", str(tmp_path)]) == 2
    assert "gloss+global" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag, value, field", [("--k", "dense", "k"), ("--margin", "none", "margin"),
                                                ("--k-schedule", "null", "k_schedule")])
def test_a_flag_set_to_none_on_the_command_line_overrides_the_yaml_file(tmp_path, flag, value, field):
    from gloss_ray.cli import parse_args, train_config

    p = tmp_path / "run.yaml"
    p.write_text("benchmark: mr\nk: 8\nmargin: 2.0\nk_schedule: cosine\n")
    assert getattr(train_config(parse_args(["train", "--config", str(p)])), field) is not None
    assert getattr(train_config(parse_args(["train", "--config", str(p), flag, value])), field) is None


def test_flags_not_given_leave_the_yaml_values(tmp_path):
    from gloss_ray.cli import parse_args, train_config

    p = tmp_path / "run.yaml"
    p.write_text("benchmark: mr\nk: 8\nprogress: false\nlr: 1e-4\n")
    cfg = train_config(parse_args(["train", "--config", str(p), "--lr", "2e-5"]))
    assert (cfg.k, cfg.progress, cfg.lr) == (8, False, 2e-5)


def test_a_run_that_ends_at_chance_gets_one_line_suggesting_the_short_run_settings():
    from gloss_ray.train.outputs import SHORT_RUN_SETTINGS, chance_note

    note = chance_note({"test_macro_f1": 0.53, "num_classes": 2, "best_val_macro_f1": 0.55})
    assert note is not None and "\n" not in note and "chance" in note and SHORT_RUN_SETTINGS in note
    assert chance_note({"test_macro_f1": 0.79, "num_classes": 2}) is None
    assert chance_note({"test_macro_f1": 0.15, "num_classes": 8}) is not None
    assert chance_note({"best_val_macro_f1": 0.9, "num_classes": 8}) is None     # no test split: validation
