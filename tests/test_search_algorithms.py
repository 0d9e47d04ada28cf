"""``gloss-ray tune --search-alg / --scheduler`` (:mod:`gloss_ray.sweep.algorithms`): every search
algorithm and scheduler on a tiny space (a 1-layer random BERT on 32 documents of mr, two epochs),
the wrong combinations refused in one line before Ray starts, the names in trials.json and in the
report, PBT cloning a trial's checkpoint into another; and a sweep on S3 (the loopback moto server)
writing its report there. Optuna + ASHA, the default, is tests/test_sweep.py's sweep."""
import json
import re
import uuid

import pytest

from gloss_ray import cli
from gloss_ray.sweep import algorithms

pytestmark = pytest.mark.ray

SPACE = """
metric: train_loss
mode: min
losses:
  gloss:
    lr: {loguniform: [1.0e-5, 3.0e-3]}
    lam: {uniform: [0.2, 0.8]}
"""
GRID_SPACE = """
metric: train_loss
mode: min
loss: gloss
params:
  lam: {choice: [0.3, 0.7]}
"""
LR_ONLY = """
metric: train_loss
mode: min
loss: gloss
params:
  lr: {loguniform: [1.0e-5, 3.0e-3]}
"""


def _sets(model: str, data_dir, epochs: int = 2) -> list[str]:
    sets = {"model": model, "data_dir": str(data_dir), "max_train": 32, "max_eval": 24, "max_length": 16,
            "batch_size": 16, "epochs": epochs, "progress": "false", "cpus_per_worker": 1}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _space(tmp_path, text: str, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _error(capsys, argv) -> str:
    """``gloss-ray ARGV`` fails with exit status 2 and one ``gloss-ray: error:`` line."""
    assert cli.main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if not re.match(r"^(\x1b\[\d+m)?\(", ln)]
    assert len(lines) == 1 and lines[0].startswith("gloss-ray: error:"), lines
    return lines[0]


# --------------------------------------------------------------------------- refused before Ray starts
def test_wrong_combinations_are_refused_in_one_line_before_anything_runs(tmp_path, tiny_model_dir, data_dir,
                                                                          capsys, monkeypatch):
    out = tmp_path / "out"
    space, grid, lr_only = _space(tmp_path, SPACE), _space(tmp_path, GRID_SPACE, "g.yaml"), _space(tmp_path, LR_ONLY, "l.yaml")

    def tune(*extra, space=space):
        return ["tune", "--benchmarks", "mr", "--losses", "gloss", "--space", space, "--storage", str(out),
                "--name", "sw", *_sets(tiny_model_dir, data_dir), *extra]

    for extra, where, msg in (
            (("--search-alg", "bohb", "--scheduler", "asha"), space, "--scheduler asha: --search-alg bohb runs with"),
            (("--scheduler", "bohb"), space, "--scheduler bohb: --search-alg bohb runs with"),
            (("--scheduler", "pbt"), space, "--scheduler pbt: takes --search-alg random or grid, not optuna"),
            (("--scheduler", "pbt", "--search-alg", "hyperopt"), space, "not hyperopt"),
            (("--search-alg", "grid"), space, "--search-alg grid: "),
            (("--search-alg", "grid", "--samples", "2"), grid, "--samples: not used by --search-alg grid"),
    ):
        err = _error(capsys, tune(*extra, space=where))
        assert msg in err, err
    assert "lr is a loguniform range" in _error(capsys, tune("--search-alg", "grid"))
    if algorithms.pbt_supported():
        assert "searches none of lam" in _error(capsys, tune("--search-alg", "random", "--scheduler", "pbt",
                                                             space=lr_only))
    else:                                       # refused, never run without its checkpoints
        assert "--scheduler pbt: not available yet" in _error(capsys, tune("--search-alg", "random",
                                                                            "--scheduler", "pbt", space=space))

    # a package that is not installed: the choice is refused, never replaced by another
    monkeypatch.setitem(algorithms._PACKAGES, "hyperopt", ("hyperopt", "no_such_package_gloss_ray"))
    err = _error(capsys, tune("--search-alg", "hyperopt"))
    assert "--search-alg hyperopt: needs the Python package(s) no_such_package_gloss_ray, not installed" in err
    assert not out.exists()                                    # nothing started or written

    # an interrupted search resumes with the choice it started with; one started before the choice
    # existed (no search.json) was optuna + asha
    exp = out / "sw" / "search" / "mr__gloss"
    exp.mkdir(parents=True)
    algorithms.check_resume(str(exp), "optuna", "asha")
    err = _error(capsys, tune("--search-alg", "random"))
    assert f"{exp} was started with --search-alg optuna --scheduler asha" in err
    algorithms.write_meta(str(exp), "random", "fifo", "random", "train_loss", "min")
    algorithms.check_resume(str(exp), "random", "fifo")
    assert "started with --search-alg random --scheduler fifo" in _error(capsys, tune())


def test_every_choice_explains_itself_in_help():
    from gloss_ray.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["tune"]
    helps = {a.dest: a.help for a in sub._actions}
    for name in algorithms.SEARCH_ALGS:
        assert re.search(rf"\b{name} \(", helps["search_alg"]), name
    for name in algorithms.SCHEDULERS:
        assert re.search(rf"\b{name} \(", helps["scheduler"]), name
    assert "(default: optuna)" in helps["search_alg"] and "(default: asha;" in helps["scheduler"]


# --------------------------------------------------------------------------- the searches
@pytest.fixture(scope="module")
def base(tiny_model_dir, data_dir, tmp_path_factory):
    from gloss_ray.sweep.plan import SweepOptions, base_configs

    sets = _sets(tiny_model_dir, data_dir)
    opts = SweepOptions(command="tune", benchmarks="mr", losses="gloss", seeds=1,
                        storage=str(tmp_path_factory.mktemp("unused")), name=None, config=None,
                        set=sets[1::2], workers=1, gpu=False, concurrency=2, keep_checkpoints=False)
    return base_configs(opts, ["mr"], ["gloss"])[("mr", "gloss")]


def _search(tmp_path, base, text: str, alg: str, sched: str, samples: int, epochs: int = 2, grace: int = 1,
            keep_checkpoints: bool = False):
    """One real search (gloss_ray.sweep.search.run_search) of mr x gloss; returns (records, its folder)."""
    from gloss_ray.sweep.ray_cleanup import run_registry
    from gloss_ray.sweep.search import run_search
    from gloss_ray.sweep.spaces import load_space

    sweep = tmp_path / f"{alg}-{sched}"
    with run_registry(str(sweep)) as registry:
        records, best = run_search(str(sweep), "mr", "gloss", {**base, "epochs": epochs},
                                   load_space(_space(tmp_path, text, f"{alg}-{sched}.yaml")), registry=registry,
                                   samples=samples, grace_epochs=grace, concurrency=2,
                                   search_alg=alg, scheduler=sched, keep_checkpoints=keep_checkpoints)
    assert best is not None
    return records, sweep


def test_each_search_algorithm_and_scheduler_runs_and_the_report_names_them(ray_local, base, tmp_path):
    from gloss_ray.report import build_report

    for alg, sched, text, samples in (("hyperopt", "asha", SPACE, 2), ("random", "fifo", SPACE, 2),
                                      ("grid", "asha", GRID_SPACE, 1), ("bohb", "bohb", SPACE, 2)):
        records, sweep = _search(tmp_path, base, text, alg, sched, samples)
        exp = sweep / "search" / "mr__gloss"
        assert json.loads((exp / "search.json").read_text())["requested"] == {"search_alg": alg, "scheduler": sched}
        assert len(records) == 2 and all(t["status"] != "ERROR" for t in records), records
        assert {(t["search_alg"], t["scheduler"]) for t in records} == {(alg, sched)}
        if alg == "grid":                                      # every combination once
            assert sorted(t["config"]["lam"] for t in records) == [0.3, 0.7]
        else:                                                  # sampled: two different configurations
            assert records[0]["config"]["lr"] != records[1]["config"]["lr"]
        if sched == "fifo":                                    # nothing stopped early
            assert [t["iterations"] for t in records] == [2, 2]
        build_report(sweep)
        md = (sweep / "report" / "report.md").read_text()
        assert f"| mr | gloss | {alg} | {sched} |" in md, md
        methods = json.loads((sweep / "report" / "results.json").read_text())["search"]["methods"]
        assert methods == [{"benchmark": "mr", "loss": "gloss", "search_alg": alg, "scheduler": sched}]


def test_synchronous_pbt_never_perturbs_a_last_epoch_nor_leaves_trials_waiting_on_an_ended_one():
    """The scheduler alone (no Ray cluster): trial S ends after epoch 2, L runs 4, perturbing every 2
    epochs. S's last epoch is no perturbation point (it goes on, to its end); L, waiting paused at the
    synchronisation point for S, runs again once S has ended (Ray 2.60 alone would wait forever)."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.pbt import _PBTTrialState

    from gloss_ray.sweep.search import SynchronousPBT

    class FakeTrial:                  # what PopulationBasedTraining reads of a trial here
        PAUSED = Trial.PAUSED

        def __init__(self, name, epochs):
            self.trial_id = self.experiment_tag = name
            self.config, self.status, self.num_failures = {"lam": 0.5, "epochs": epochs}, Trial.RUNNING, 0

        def is_finished(self):
            return self.status == Trial.TERMINATED

    short, long_ = FakeTrial("S", 2), FakeTrial("L", 4)
    controller = type("C", (), {"get_trials": lambda self: [short, long_],
                                "get_live_trials": lambda self: [t for t in (short, long_) if not t.is_finished()]})()
    pbt = SynchronousPBT(time_attr="epoch", metric="train_loss", mode="min", perturbation_interval=2,
                         hyperparam_mutations={"lam": [0.3, 0.5, 0.7]}, synch=True, last_epoch=4)
    for t in (short, long_):
        pbt._trial_state[t] = _PBTTrialState(t)
    result = lambda epoch: {"epoch": epoch, "train_loss": 1.0 / epoch}  # noqa: E731
    assert pbt.on_trial_result(controller, long_, result(1)) == TrialScheduler.CONTINUE
    assert pbt.on_trial_result(controller, short, result(1)) == TrialScheduler.CONTINUE
    assert pbt.on_trial_result(controller, short, result(2)) == TrialScheduler.CONTINUE    # its last epoch
    assert pbt.on_trial_result(controller, long_, result(2)) == TrialScheduler.PAUSE       # waits for S
    long_.status = Trial.PAUSED
    assert pbt.choose_trial_to_run(controller) is None
    pbt.on_trial_complete(controller, short, result(2))
    short.status = Trial.TERMINATED
    assert pbt.choose_trial_to_run(controller) is long_


def _progress_rows(trial_dir):
    """Tune's progress.csv of a trial: one row per reported epoch, numbers as floats (epoch as int)."""
    import csv

    with open(trial_dir / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row = {}
        for k, v in r.items():
            try:
                row[k] = float(v)
            except (TypeError, ValueError):
                row[k] = v
        row["epoch"] = int(row["epoch"])
        out.append(row)
    return out


@pytest.mark.skipif(not algorithms.pbt_supported(), reason="--scheduler pbt needs gloss_ray.train.launch.fit("
                    "start_checkpoint=...): Ray Train 2.60 refuses resume_from_checkpoint")
def test_pbt_continues_the_worse_trial_from_the_better_ones_checkpoint(ray_local, base, tmp_path):
    """PBT, 2 trials x 2 epochs, perturbing after every epoch but the last (synchronously): once both
    reported epoch 1, the worse one goes on from a copy of the better one's checkpoint with a mutated
    lam (lr, not mutable, copied): its next Train run (run-1) starts at the donor's epoch 1 (its
    history restored from the donor's checkpoint), and its epoch 2 is trained with the new configuration."""
    from gloss_ray.report.collect import tune_result_rows
    from gloss_ray.sweep.search import _remove_trial_checkpoints, run_folders

    records, sweep = _search(tmp_path, base, SPACE, "random", "pbt", samples=2, epochs=2, keep_checkpoints=True)
    exp = sweep / "search" / "mr__gloss"
    assert len(records) == 2 and {(t["search_alg"], t["scheduler"]) for t in records} == {("random", "pbt")}
    assert all(t["status"] == "TERMINATED" and t["iterations"] == 2 for t in records), records
    rows = {d.name: tune_result_rows(d) for d in exp.iterdir() if (d / "result.json").exists()}
    assert sorted(rows) == [t["trial_id"] for t in records]
    # Tune's trial state: trial id -> experiment tag, "<tag>@perturbed[lam=...]" once PBT exploited it;
    # pbt_global.txt names the trials by the tag they started with
    state = json.loads(sorted(exp.glob("experiment_state-*.json"))[-1].read_text())
    tags = {d["trial_id"]: d["experiment_tag"] for d in (json.loads(t[0]) for t in state["trial_data"])}
    by_tag = {tag.split("@perturbed[")[0]: tid for tid, tag in tags.items()}
    steps = [json.loads(line) for line in (exp / "pbt_global.txt").read_text().splitlines()]
    assert len(steps) == 1, steps            # after epoch 1 only: epoch 2 is the last, never perturbed
    # [target tag, donor tag, their training_iteration as Ray logs it (see SynchronousPBT), donor config, new]
    target_tag, donor_tag, _, _, donor_config, new = steps[0]
    target, donor = by_tag[target_tag], by_tag[donor_tag]
    assert tags[target].startswith(f"{target_tag}@perturbed[") and tags[donor] == donor_tag

    # epoch 1, as PBT saw it: both reported, each with its own lam; the donor's train_loss (min) is better.
    # Read from progress.csv: Tune may rewrite a paused trial's result.json when it restarts it (seen
    # here: only epoch 2 left there), while progress.csv keeps every epoch (without the config)
    epochs = {t: _progress_rows(exp / t) for t in (target, donor)}
    assert [[r["epoch"] for r in epochs[t]] for t in (target, donor)] == [[1, 2], [1, 2]]
    own_1, donor_1 = epochs[target][0], epochs[donor][0]
    assert donor_1["train_loss"] < own_1["train_loss"]
    assert donor_1["lam"] == pytest.approx(donor_config["lam"])          # the objective's lam is the config's
    assert own_1["lam"] != pytest.approx(donor_config["lam"])
    assert new["lam"] != donor_config["lam"] and 0.2 <= new["lam"] <= 0.8 and new["lr"] == donor_config["lr"]

    # the target's run-1 started from a copy of the donor's epoch-1 checkpoint, the donor's from its own
    # (synchronous PBT pauses every trial at the round); nothing restarted them after the last epoch
    assert run_folders(str(exp / target)) == run_folders(str(exp / donor)) == ["run", "run-1"]
    def first_state(t):
        return json.loads(sorted((exp / t / "run-1").glob("checkpoint_*/state.json"))[0].read_text())

    for t in (target, donor):
        first = first_state(t)
        assert first["epoch"] == 2 and [h["epoch"] for h in first["history"]] == [1, 2]
        assert first["history"][0]["train_loss"] == pytest.approx(donor_1["train_loss"], rel=1e-9)
        assert first["history"][0]["val_macro_f1"] == pytest.approx(donor_1["val_macro_f1"], rel=1e-9)
    assert first_state(target)["history"][0]["train_loss"] != own_1["train_loss"]

    # epoch 2 of the target: trained with the new configuration (the objective's lam is the new one)
    own_2 = rows[target][-1]
    assert own_2["epoch"] == 2
    assert own_2["config"] == new and own_2["lam"] == pytest.approx(new["lam"])
    assert own_2["train_loss"] == pytest.approx(first_state(target)["history"][1]["train_loss"], rel=1e-9)
    # each trial's record, params.json and last result carry the configuration its last epoch ran with
    for rec in records:
        params = json.loads((exp / rec["trial_id"] / "params.json").read_text())
        assert rec["config"] == params == rows[rec["trial_id"]][-1]["config"]

    _remove_trial_checkpoints("mr x gloss", [type("R", (), {"path": str(exp / t)})() for t in rows])
    assert [p for p in exp.rglob("checkpoint_*") if p.is_dir()] == []      # Train's and Tune's


# --------------------------------------------------------------------------- report on S3
def test_a_sweep_on_s3_writes_its_report_there(ray_local, moto_server, tiny_model_dir, data_dir, capsys):
    import pyarrow.fs as pafs

    bucket = f"gloss-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=moto_server, allow_bucket_creation=True).create_dir(bucket)
    storage = f"s3://{bucket}/sweeps"
    rc = cli.main(["bench", "--benchmarks", "mr", "--losses", "ce", "--seeds", "1", "--storage", storage,
                   "--name", "b", *_sets(tiny_model_dir, data_dir, epochs=1)])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"report: {storage}/b/report/report.md (also report.html, results.csv, results.json), uploaded" in out
    fs, root = pafs.FileSystem.from_uri(f"{storage}/b/report")
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root))}
    assert {"report.md", "report.html", "results.csv", "results.json"} <= names
    with fs.open_input_stream(f"{root}/results.json") as f:
        results = json.loads(f.read().decode())
    assert results["results_dir"] == f"{storage}/b"                       # not the temporary copy
    assert [r["dir"] for r in results["runs"]] == [f"{storage}/b/runs/mr/ce/seed0"]
    assert [(r["benchmark"], r["key"], r["n_seeds"]) for r in results["results"]] == [("mr", "ce", 1)]
