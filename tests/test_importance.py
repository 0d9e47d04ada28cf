"""gloss_ray.report.importance: which searched parameters mattered."""
import json

import numpy as np

from gloss_ray.report.importance import parameter_effects, rung_metric, with_rung_metrics


def _trials(score, n=24, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cfg = {"lam": float(rng.uniform(0.1, 0.9)), "variant": ["nll", "paper"][i % 2],
               "k": [None, 8, 16][i % 3], "lr": 3e-5}
        out.append({"trial_id": f"t{i}", "config": cfg, "rung_metric": score(cfg, rng)})
    return out


def test_the_parameter_that_decides_the_score_ranks_first():
    trials = _trials(lambda c, rng: 0.80 + 0.03 * (c["k"] is None) + rng.normal(0, 1e-4))
    effects = parameter_effects(trials)
    assert effects[0]["param"] == "k"
    assert effects[0]["importance"] > 0.5
    assert effects[0]["levels"][0]["value"] == "dense"


def test_a_numeric_parameter_reports_the_direction_of_its_effect():
    trials = _trials(lambda c, rng: 0.9 - 0.1 * c["lam"])
    lam = next(e for e in parameter_effects(trials) if e["param"] == "lam")
    assert lam["kind"] == "numeric" and lam["spearman"] < -0.99


def test_constant_parameters_and_unscored_trials_are_left_out():
    trials = _trials(lambda c, rng: 0.8 + 0.01 * c["lam"])
    trials[0]["rung_metric"] = None
    effects = parameter_effects(trials)
    assert "lr" not in {e["param"] for e in effects}
    assert {e["n"] for e in effects} == {len(trials) - 1}


def test_each_trial_is_scored_at_the_first_epoch_from_tunes_result_file(tmp_path):
    search = tmp_path / "search" / "mr__gloss"
    (search / "a1").mkdir(parents=True)
    rows = [{"epoch": 1, "val_macro_f1": 0.71}, {"epoch": 2, "val_macro_f1": 0.83}]
    (search / "a1" / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (search / "trials.json").write_text("[]")
    assert rung_metric(search / "a1", "val_macro_f1") == 0.71
    scored = with_rung_metrics([{"trial_id": "a1", "source": str(search / "trials.json")},
                                {"trial_id": "gone", "source": str(search / "trials.json")}])
    assert [t["rung_metric"] for t in scored] == [0.71, None]


def _tune_folder(root, n=6):
    """A Tune experiment folder as a running search leaves it: params.json and result.json per
    trial, trial_ended.json for the trials Tune ended, no trials.json yet."""
    exp = root / "search" / "mr__gloss"
    exp.mkdir(parents=True)
    for started in ("2026-12-07_13-44-52", "2026-12-07_15-46-07"):      # started, then resumed once
        (exp / f"experiment_state-{started}.json").write_text("{}")
    for i in range(n):
        t = exp / f"t{i}"
        t.mkdir()
        (t / "params.json").write_text(json.dumps({"lam": 0.1 * (i + 1), "k": "dense" if i % 2 else 16}))
        epochs = 3 if i < 2 else 1
        rows = [{"epoch": e, "val_macro_f1": 0.70 + 0.005 * i + 0.03 * e, "time_total_s": 60.0 * e}
                for e in range(1, epochs + 1)]
        (t / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        if i < 4:
            (t / "trial_ended.json").write_text(json.dumps({"status": "TERMINATED", "epoch": epochs}))
    return exp


def test_a_search_that_has_not_finished_is_read_from_tunes_own_files(tmp_path):
    from gloss_ray.report.collect import collect

    _tune_folder(tmp_path)
    found = collect(tmp_path).trials
    assert len(found) == 6                      # each trial once, however often the search restarted
    trials = {t["trial_id"]: t for t in found}
    assert [trials[f"t{i}"]["status"] for i in range(6)] == \
        ["TERMINATED", "TERMINATED", "STOPPED_EARLY", "STOPPED_EARLY", "UNFINISHED", "UNFINISHED"]
    assert trials["t1"]["config"]["k"] is None and abs(trials["t0"]["best_val_macro_f1"] - 0.79) < 1e-12


def test_the_report_of_a_running_search_names_the_best_trial_so_far_and_what_mattered(tmp_path):
    from gloss_ray.report import build_report

    _tune_folder(tmp_path)
    text = build_report(tmp_path)["report.md"].read_text()
    assert "Not finished" in text and "| mr | gloss | t1 |" in text
    assert "Which parameters mattered" in text and "| lam |" in text


def test_trials_that_all_scored_the_same_give_no_importance_and_no_error():
    # the CI failure of stop 29: a tiny sweep whose trials all scored 0.294 made Optuna's fANOVA
    # raise "Encountered zero total variance in all trees" inside the report
    trials = _trials(lambda c, rng: 0.29411765, n=3)
    effects = parameter_effects(trials)
    assert effects and all(e["importance"] is None for e in effects)
    assert {e["param"] for e in effects} == {"lam", "variant", "k"}
