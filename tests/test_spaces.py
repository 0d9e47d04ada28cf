"""Search-space files: every shipped file validates, bad files fail with a one-line error naming
the file and key, and the Ray Tune conversion is accepted by the Optuna searcher."""

import re
from pathlib import Path

import pytest

from gloss_ray.errors import ConfigError
from gloss_ray.config import OPTIONS
from gloss_ray.options import BENCHMARKS, LOSSES
from gloss_ray.sweep.spaces import KNOWN_PARAMS, Dist, decode_params, load_space, to_tune

REPO = Path(__file__).resolve().parents[1]
SPACE_DIR = REPO / "tune_spaces"
SPACE_FILES = sorted(SPACE_DIR.glob("*.yaml")) + sorted(SPACE_DIR.glob("*.yml"))
# the space files README.md, docs/*.md and the CLI's help tell users to pass
NAMED = sorted({m for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "gloss_ray" / "cli.py"]
                for m in re.findall(r"tune_spaces/[\w.-]+\.ya?ml", doc.read_text())})


@pytest.mark.parametrize("name", NAMED)
def test_every_space_file_the_docs_name_loads_for_each_benchmark(name):
    space = load_space(REPO / name)
    assert all(space.for_run(b, loss) for b in BENCHMARKS for loss in space.losses)


@pytest.mark.parametrize("path", SPACE_FILES, ids=lambda p: p.name)
def test_every_space_file_validates(path):
    space = load_space(path)
    assert space.losses and space.mode in ("max", "min")
    for loss in space.losses:
        for bench in BENCHMARKS:
            spec = space.for_run(bench, loss)
            assert set(spec) <= set(KNOWN_PARAMS)
            assert "lr" in spec
            to_tune(spec)


def test_default_holds_all_losses_and_matches_single_files():
    default = load_space(SPACE_DIR / "default.yaml")
    assert set(default.losses) == set(LOSSES)
    gloss = default.for_run("mr", "gloss")
    for name in ("lam", "lam_schedule", "sigma", "sigma_schedule", "k", "gamma", "lr"):
        assert isinstance(gloss[name], Dist), name
    assert None in gloss["k"].args                       # dense graph is searched
    for loss in LOSSES:
        single = SPACE_DIR / f"{loss}.yaml"
        if single.exists():
            for bench in BENCHMARKS:
                assert load_space(single).for_run(bench, loss) == default.for_run(bench, loss), \
                    (loss, bench)


def test_overrides_merge_order(tmp_path):
    p = tmp_path / "multi.yaml"
    p.write_text("""
params: {lr: 1.0e-5, epochs: 3}
overrides: {r8: {epochs: 5}}
losses:
  ce: {lr: 2e-5}
  gloss:
    params: {k: dense, sigma: 0.5}
    overrides: {r8: {epochs: 7}, r52: {k: {choice: [dense, 16]}}}
""")
    s = load_space(p)
    assert s.for_run("mr", "ce") == {"lr": 2e-5, "epochs": 3}      # 2e-5 read as a float
    assert s.for_run("r8", "ce") == {"lr": 2e-5, "epochs": 5}
    assert s.for_run("r8", "gloss") == {"lr": 1e-5, "epochs": 7, "k": None, "sigma": 0.5}
    assert s.for_run("r52", "gloss")["k"] == Dist("choice", (None, 16))
    with pytest.raises(ConfigError, match="multi.yaml.*scl"):
        s.for_run("mr", "scl")


BAD = {
    "unknown top-level key": ("loss: ce\nparams: {lr: 1.0e-5}\nsearcher: optuna\n", "searcher"),
    "unknown param": ("loss: gloss\nparams: {lr: 1.0e-5, alpha: 0.3}\n", "params.alpha"),
    "lo >= hi": ("loss: gloss\nparams: {lam: {uniform: [0.9, 0.1]}}\n", "params.lam"),
    "loguniform lo <= 0": ("loss: ce\nparams: {lr: {loguniform: [0, 1.0e-4]}}\n", "params.lr"),
    "bad constant": ("loss: gloss\nparams: {gamma: 1.5}\n", "params.gamma"),
    "bad choice": ("loss: gloss\nparams: {sigma: {choice: [root, median]}}\n", "params.sigma"),
    "bad schedule": ("loss: gloss\nparams: {lam_schedule: exp}\n", "params.lam_schedule"),
    "k not int": ("loss: gloss\nparams: {k: {uniform: [1, 8]}}\n", "params.k"),
    "randint out of range": ("loss: gloss\nparams: {k: {randint: [0, 8]}}\n", "params.k"),
    "range outside valid": ("loss: ce\nparams: {lr: {uniform: [-0.5, 1.0e-3]}}\n", "params.lr"),
    "unknown distribution": ("loss: ce\nparams: {lr: {normal: [0, 1]}}\n", "params.lr"),
    "unknown benchmark": ("loss: gloss\nparams: {lam: 0.5}\noverrides: {imdb: {lam: 0.2}}\n",
                          "overrides.imdb"),
    "override bad value": ("loss: gloss\nparams: {lam: 0.5}\noverrides: {r8: {lam: -1}}\n",
                           "overrides.r8.lam"),
    "unknown loss": ("losses: {gloss: {lam: 0.5}, focal: {lr: 1.0e-5}}\n", "losses.focal"),
    "loss param in multi form": ("losses: {scl: {params: {tau: 0.1}}}\n", "losses.scl.params.tau"),
    "duplicate key": ("loss: ce\nparams:\n  lr: 1.0e-5\n  lr: 2.0e-5\n", "lr"),
    "both loss and losses": ("loss: ce\nlosses: {ce: {}}\n", "loss"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_space_names_file_and_key(tmp_path, case):
    text, key = BAD[case]
    p = tmp_path / "bad_space.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_space(p)
    msg = str(e.value)
    assert "bad_space.yaml" in msg and key in msg and "\n" not in msg, msg


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_space(tmp_path / "nope.yaml")


def test_to_tune_types_and_optuna_accepts_it():
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical, Float, Integer

    spec = load_space(SPACE_DIR / "default.yaml").for_run("r52", "gloss")
    spec.update(epochs=3, batch_size=Dist("randint", (8, 33)),
                margin=Dist("quniform", (0.1, 1.0, 0.1)))
    space = to_tune(spec)
    assert isinstance(space["lr"], Float) and isinstance(space["k"], Categorical)
    assert isinstance(space["batch_size"], Integer) and space["epochs"] == 3
    assert space["k"].categories == [None, 16, 32]

    converted = OptunaSearch.convert_search_space(space)
    assert set(converted) == set(space) - {"epochs"}        # constants are not searched
    searcher = OptunaSearch(space={k: v for k, v in space.items() if k != "epochs"},
                            metric="val_macro_f1", mode="max", seed=0)
    for i in range(8):
        cfg = decode_params(searcher.suggest(f"t{i}"))
        assert cfg["k"] in (None, 16, 32)
        assert 1e-5 <= cfg["lr"] <= 1e-4 and 0.6 <= cfg["gamma"] <= 0.9
        assert cfg["sigma"] in ("root", "dicm", "batch", 0.3, 0.5)


def test_decode_params():
    assert decode_params({"k": "dense", "lr": 1e-5}) == {"k": None, "lr": 1e-5}
    assert decode_params({"k": 8}) == {"k": 8}


@pytest.mark.parametrize("name, value", [("workers", 2), ("storage", "runs"), ("refresh_every", 2)])
def test_a_space_cannot_search_an_option_that_is_not_searchable(tmp_path, name, value):
    """What a run is (its workers, its storage, how often its graph refreshes) is not a search parameter:
    a space naming one is refused, naming it, though the option itself is valid."""
    OPTIONS[name].check(value)
    p = tmp_path / "s.yaml"
    p.write_text(f"loss: gloss\nparams: {{lr: 1.0e-5, {name}: {value}}}\n")
    with pytest.raises(ConfigError, match=rf"s\.yaml: params\.{name}"):
        load_space(p)


def test_a_space_searches_the_head_rate_and_the_global_graph(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("loss: gloss\nparams: {head_lr: {loguniform: [1.0e-4, 1.0e-2]}, global_k: {choice: [0, 8]}}\n")
    spec = load_space(p).for_run("mr", "gloss")
    assert spec == {"head_lr": Dist("loguniform", (1e-4, 1e-2)), "global_k": Dist("choice", (0, 8))}


def test_space_values_are_checked_by_the_options_own_check(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("loss: ce\nparams: {lr: 0}\n")
    with pytest.raises(ConfigError, match="params.lr: value 0 is invalid: must be a number > 0"):
        load_space(p)
