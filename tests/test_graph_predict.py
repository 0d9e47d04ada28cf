"""Graph prediction (issue 25): propagation over the training corpus at inference, the blend with the
classifier chosen on validation only, the graph files in a saved model folder, and a tiny training run
that writes all three scores. One training run, in one process (LocalSession, no Ray)."""
import json
import math

import numpy as np
import pytest
import torch

from gloss_ray.config import TrainConfig
from gloss_ray.errors import ConfigError
from gloss_ray.graph.predict import (META_FILE, WEIGHTS_FILE, GraphPredictor, SplitOutputs, harmonic_transductive,
                                     kernel_vote, load_graph_predictor, score_splits)
from gloss_ray.graph.index import make_index


def _unit(*rows):
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------------- propagation
def test_toy_training_graph_propagates_the_expected_labels_and_scores():
    """Two training clusters; each query takes its neighbours' class, and its scores are the kernel-weighted
    vote exp((s - 1) / sigma^2) of the k nearest training documents, normalised."""
    train = _unit([1, 0, 0], [0.95, 0.3, 0], [0, 1, 0], [0, 0.95, 0.3], [0, 0, 1])
    labels = torch.tensor([0, 0, 1, 1, 2])
    gp = GraphPredictor(train, labels, num_classes=3, sigma=0.4, k=2)
    queries = _unit([0.9, 0.1, 0], [0.1, 1, 0.05], [0.05, 0.1, 1])
    proba = gp.graph_proba(queries)
    assert proba.argmax(1).tolist() == [0, 1, 2]
    torch.testing.assert_close(proba.sum(1), torch.ones(3, dtype=torch.float64))
    # the third query by hand: its two nearest are doc 4 (class 2) and doc 3 (class 1)
    q = queries[2].double()
    s = train.double() @ q
    w4, w3 = math.exp((s[4] - 1) / 0.16), math.exp((s[3] - 1) / 0.16)
    expected = torch.tensor([0.0, w3 / (w3 + w4), w4 / (w3 + w4)], dtype=torch.float64)
    torch.testing.assert_close(proba[2], expected, atol=1e-5, rtol=0)   # FAISS scores are float32
    # k = 5: every training document votes
    s_all = train.double() @ queries[0].double()
    w = torch.exp((s_all - 1) / 0.16)
    full = torch.stack([w[labels == c].sum() for c in range(3)]) / w.sum()
    torch.testing.assert_close(gp.graph_proba(queries[:1], k=5)[0], full, atol=1e-5, rtol=0)


def test_tiny_sigma_does_not_underflow_every_weight():
    """With sigma = 1e-3 every raw kernel weight is 0 in float64; the vote still follows the nearest."""
    train = _unit([1, 0], [0, 1])
    gp = GraphPredictor(train, torch.tensor([0, 1]), num_classes=2, sigma=1e-3, k=2)
    assert gp.graph_proba(_unit([0.6, 0.8], [0.8, 0.6])).argmax(1).tolist() == [1, 0]


def test_transductive_mode_equals_the_exact_harmonic_solution_and_lets_queries_vote():
    """Queries joining the graph: the iterated solution equals (I - T_UU)^-1 T_UL Y_L solved densely with
    T = D^-1 (W + W^T) on the same kNN graph; and a query whose only neighbours are queries of class 1 gets
    class 1 through them (inductively it would only see its nearest training documents)."""
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(12, 4, generator=g), dim=1)
    labels = torch.arange(12) % 3
    queries = torch.nn.functional.normalize(torch.randn(7, 4, generator=g), dim=1)
    nodes = torch.cat([train, queries])
    k, sigma = 4, 0.7
    res = make_index(nodes, "torch-exact").search(nodes, k, exclude_ids=torch.arange(19))
    got = harmonic_transductive(res.ids, res.scores, labels, 12, 3, sigma, iters=5000, tol=1e-14)
    w = torch.zeros(19, 19, dtype=torch.float64)
    for i in range(19):
        for j, s in zip(res.ids[i].tolist(), res.scores[i].double().tolist()):
            w[i, j] = math.exp((s - 1) / sigma ** 2)
    a = w + w.T
    t = a / a.sum(1, keepdim=True)
    y = torch.nn.functional.one_hot(labels, 3).double()
    exact = torch.linalg.solve(torch.eye(7, dtype=torch.float64) - t[12:, 12:], t[12:, :12] @ y)
    torch.testing.assert_close(got, exact / exact.sum(1, keepdim=True), atol=1e-9, rtol=0)

    # a chain: class-0 and class-1 training pairs; queries q0..q2 walk from class 1 towards class 0
    train = _unit([1, 0], [0.99, 0.14], [0, 1], [0.14, 0.99])       # at 0, 8 (class 0) and 82, 90 degrees
    chain = _unit([0.309, 0.951], [0.530, 0.848], [0.743, 0.669])  # at 72, 58 and 42 degrees
    gp = GraphPredictor(train, torch.tensor([0, 0, 1, 1]), num_classes=2, sigma=0.5, transductive=True)
    trans = gp.graph_proba(chain, k=1)
    assert trans.argmax(1).tolist() == [1, 1, 1]          # q2 -> q1 -> q0 -> the class-1 document at 82 degrees
    induct = GraphPredictor(train, torch.tensor([0, 0, 1, 1]), num_classes=2, sigma=0.5).graph_proba(chain, k=1)
    assert induct.argmax(1).tolist()[2] == 0                # alone, q2's nearest training document is class 0


# ---------------------------------------------------------------------------------------------- selection
def _two_clusters():
    g = torch.Generator().manual_seed(1)
    centres = _unit([1, 0, 0, 0], [0, 1, 0, 0])
    train = torch.cat([centres[c] + 0.05 * torch.randn(10, 4, generator=g) for c in (0, 1)])
    return train, torch.tensor([0] * 10 + [1] * 10), centres


def test_alpha_is_chosen_on_validation_never_on_test():
    """Validation: the classifier is right and the graph wrong (documents sit in the other class's cluster);
    test: the reverse. Chosen on validation, alpha is 1 (the classifier) and the blend scores as badly as the
    classifier on test; chosen on test it would have leaned on the graph and scored 1."""
    train, labels, centres = _two_clusters()
    gp = GraphPredictor(train, labels, num_classes=2, sigma=0.5)
    y = np.array([0, 1, 0, 1, 0, 1])
    right = torch.nn.functional.one_hot(torch.as_tensor(y), 2).float() * 3.0       # softmax 0.95 on y
    wrong = torch.nn.functional.one_hot(torch.as_tensor(1 - y), 2).float() * 3.0
    val = SplitOutputs(right, centres[1 - y], y)       # embeddings in the wrong cluster
    test = SplitOutputs(wrong, centres[y], y)          # embeddings in the right cluster
    out = score_splits(gp, {"validation": val, "test": test}, ks=(5, 10))
    assert out["graph_blend_alpha"] == 1.0 and gp.alpha == 1.0
    assert out["val_blend_macro_f1"] == out["val_classifier_macro_f1"] == 1.0
    assert out["test_graph_macro_f1"] == 1.0
    assert out["test_blend_macro_f1"] == out["test_classifier_macro_f1"] == 0.0
    assert {g["alpha"] for g in out["graph_val_grid"]} == {0.0, 0.25, 0.5, 0.75, 1.0}
    # the same splits with their roles swapped: now the graph wins
    swapped = score_splits(gp, {"validation": test, "test": val}, ks=(5, 10))
    assert swapped["graph_blend_alpha"] <= 0.5 and swapped["test_blend_macro_f1"] == 0.0


def test_k_is_chosen_on_validation_never_on_test():
    """Five class-0 documents right at the queries, 45 class-1 documents a little further: k <= 10 votes
    class 0, k >= 20 class 1. Validation says class 0, test (the same documents) says class 1: the graph's k
    comes from validation (5: ties go to the smaller k), and the test score is that k's, i.e. 0."""
    g = torch.Generator().manual_seed(2)
    near = _unit([1, 0, 0]) + 0.01 * torch.randn(5, 3, generator=g)
    far = _unit([0.5, 0.866, 0]) + 0.01 * torch.randn(45, 3, generator=g)
    gp = GraphPredictor(torch.cat([near, far]), torch.tensor([0] * 5 + [1] * 45), num_classes=2, sigma=2.0)
    q = _unit([1, 0, 0.01], [1, 0.01, 0], [1, 0, -0.01])
    logits = torch.zeros(3, 2)
    out = score_splits(gp, {"validation": SplitOutputs(logits, q, np.zeros(3, int)),
                            "test": SplitOutputs(logits, q, np.ones(3, int))})
    by_k = gp.graph_proba_by_k(q, (5, 10, 20, 50))
    assert [int(by_k[k].argmax(1)[0]) for k in (5, 10, 20, 50)] == [0, 0, 1, 1]   # the construction holds
    assert out["graph_k"] == 5
    assert out["val_graph_accuracy"] == 1.0 and out["test_graph_accuracy"] == 0.0


# ---------------------------------------------------------------------------------------------- saved folders
@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """A saved model folder (transformers + sentence-transformers) of the tiny BERT, without graph files."""
    from gloss_ray.model import TextClassifier, load_tokenizer

    out = tmp_path_factory.mktemp("graph_folder") / "model"
    torch.manual_seed(0)
    TextClassifier.from_encoder(tiny_model_dir, 2).save_pretrained(out, load_tokenizer(tiny_model_dir),
                                                                   ["neg", "pos"], max_length=16)
    return out


TEXTS = ["a wonderful , moving film", "boring and dull", "an ordinary film"]


def _st_and_pipeline(folder):
    from sentence_transformers import SentenceTransformer
    from test_model_formats import no_warnings
    from transformers import pipeline

    with no_warnings():
        emb = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
        scores = pipeline("text-classification", model=str(folder), device="cpu")(TEXTS, top_k=None)
    return emb, [{d["label"]: d["score"] for d in row} for row in scores]


def test_folder_without_graph_files_has_no_graph_predictor_and_still_classifies(saved):
    from gloss_ray.model import TextClassifier, load_tokenizer

    assert not (saved / WEIGHTS_FILE).exists()
    assert load_graph_predictor(saved) is None
    model = TextClassifier.from_pretrained(saved).eval()
    batch = load_tokenizer(str(saved))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits, emb = model(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (3, 2) and emb.shape == (3, 32)


def test_graph_files_round_trip_and_do_not_disturb_sentence_transformers_or_pipeline(saved, tmp_path):
    import shutil

    before = _st_and_pipeline(saved)
    folder = tmp_path / "with_graph"
    shutil.copytree(saved, folder)
    g = torch.Generator().manual_seed(3)
    train = torch.randn(30, 32, generator=g)
    gp = GraphPredictor(train, torch.arange(30) % 2, num_classes=2, sigma=0.3, k=20, alpha=0.25, graph_k=5)
    gp.save(folder)
    assert {p.name for p in folder.iterdir()} - {p.name for p in saved.iterdir()} == {WEIGHTS_FILE, META_FILE}
    after = _st_and_pipeline(folder)
    np.testing.assert_allclose(after[0], before[0], atol=1e-6, rtol=0)
    for a, b in zip(after[1], before[1]):
        assert a.keys() == b.keys() == {"neg", "pos"}
        assert all(abs(a[c] - b[c]) < 1e-6 for c in a)

    loaded = load_graph_predictor(folder)
    assert (loaded.sigma, loaded.alpha, loaded.k, loaded.graph_k, loaded.num_classes) == (0.3, 0.25, 20, 5, 2)
    from safetensors.torch import load_file
    stored = load_file(str(folder / WEIGHTS_FILE))
    assert stored["embeddings"].dtype == torch.float16 and stored["embeddings"].shape == (30, 32)
    torch.testing.assert_close(loaded.labels, gp.labels)
    queries = torch.randn(8, 32, generator=g)
    logits = torch.randn(8, 2, generator=g)
    torch.testing.assert_close(loaded.blend_proba(logits, queries), gp.blend_proba(logits, queries),
                               atol=2e-3, rtol=0)     # float16 storage


def test_transductive_needs_graph_predict_and_both_are_booleans():
    with pytest.raises(ConfigError, match="graph_transductive"):
        TrainConfig(benchmark="mr", graph_transductive=True)
    with pytest.raises(ConfigError, match="graph_predict"):
        TrainConfig(benchmark="mr", graph_predict="yes")
    assert TrainConfig(benchmark="mr").graph_predict is False     # off by default


def test_report_shows_the_graph_scores(tmp_path):
    from test_report import _run

    from gloss_ray.report import build_report

    rng = np.random.default_rng(0)
    for seed in (0, 1):
        _run(tmp_path, "mr", "ce", seed, rng)
        m, _ = _run(tmp_path, "mr", "gloss", seed, rng)
        path = tmp_path / "runs" / f"mr-gloss-1.0-s{seed}" / "metrics.json"
        m.update(test_classifier_macro_f1=m["test_macro_f1"], test_graph_macro_f1=0.70 + seed / 100,
                 test_blend_macro_f1=0.80, test_graph_accuracy=0.7, test_blend_accuracy=0.8, graph_blend_alpha=0.5,
                 graph_blend_k=10, graph_k=20)
        path.write_text(json.dumps(m))
    build_report(tmp_path, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Graph prediction" in md and "70.50 ± 0.71" in md
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    gl = next(r for r in rows if r["key"] == "gloss")
    assert gl["test_graph_macro_f1_mean"] == pytest.approx(0.705) and gl["test_blend_macro_f1_n"] == 2
    assert "test_graph_macro_f1_mean" not in next(r for r in rows if r["key"] == "ce")


# ---------------------------------------------------------------------------------------------- a run
def test_tiny_run_with_graph_predict_writes_all_scores_and_the_graph_files(data_dir, tiny_model_dir, tmp_path):
    from gloss_ray.train.loop import train
    from gloss_ray.train.session import LocalSession

    cfg = TrainConfig(benchmark="mr", data_dir=str(data_dir), model=tiny_model_dir, loss="gloss", epochs=1,
                      max_train=96, max_eval=32, max_length=16, batch_size=16, max_steps=2, progress=False,
                      storage=str(tmp_path), name="graph", cache_dir=str(tmp_path / "tok"), graph_predict=True)
    final = train(cfg, LocalSession(str(tmp_path / "graph")))
    m = json.loads((tmp_path / "graph" / "metrics.json").read_text())
    for split in ("val", "test"):
        for how in ("classifier", "graph", "blend"):
            for metric in ("accuracy", "macro_f1"):
                assert 0.0 <= m[f"{split}_{how}_{metric}"] <= 1.0
    # the classifier scored again is the classifier scored by the run (the same best weights)
    assert m["test_classifier_accuracy"] == pytest.approx(m["test_accuracy"])
    assert m["val_classifier_macro_f1"] == pytest.approx(m["best_val_macro_f1"])
    assert m["graph_blend_alpha"] in (0.0, 0.25, 0.5, 0.75, 1.0) and m["graph_blend_k"] in (5, 10, 20, 50)
    assert len(m["graph_val_grid"]) == 20 and m["graph_train_docs"] == 96
    assert m["graph_sigma"] == pytest.approx(final["graph_sigma"]) and m["graph_sigma"] > 0
    assert m["graph_sigma_source"].startswith("G-Loss's (root)")
    # the best validation grid point is the chosen one
    best = max(g["macro_f1"] for g in m["graph_val_grid"])
    assert m["val_blend_macro_f1"] == pytest.approx(best)
    gp = load_graph_predictor(tmp_path / "graph" / "model")
    assert gp is not None and (gp.alpha, gp.k, gp.graph_k) == (m["graph_blend_alpha"], m["graph_blend_k"], m["graph_k"])
    assert gp.sigma == pytest.approx(m["graph_sigma"]) and len(gp.labels) == 96


def test_predict_graph_uses_the_saved_blend_and_says_so_when_the_folder_has_none(saved, tmp_path, capsys):
    """``gloss-ray predict --graph``: with graph files, the labels are the saved predictor's blend of the
    classifier and the graph (here alpha 0: the graph alone, whose training documents are the
    texts themselves with labels the classifier does not give); without them, the classifier's labels and
    one line on stderr."""
    import shutil

    import pandas as pd

    from gloss_ray.cli import main
    from gloss_ray.model import TextClassifier, encode, load_tokenizer

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    model = TextClassifier.from_pretrained(saved)
    batch = load_tokenizer(str(saved))(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    logits, emb = encode(model, [batch], torch.device("cpu"))
    flipped = 1 - logits.argmax(1)                 # the graph's labels: never the classifier's
    folder = tmp_path / "with_graph"
    shutil.copytree(saved, folder)
    GraphPredictor(emb, flipped, num_classes=2, sigma=0.05, k=1, alpha=0.0).save(folder)

    def labels(model_dir, *flags):
        out = tmp_path / "out.csv"
        assert main(["predict", "--model-dir", str(model_dir), "--input", str(texts), "--output", str(out),
                     *flags]) == 0
        return pd.read_csv(out)["label"].tolist()

    names = ["neg", "pos"]
    assert labels(folder) == [names[i] for i in logits.argmax(1).tolist()]           # no --graph: classifier
    assert labels(folder, "--graph") == [names[i] for i in flipped.tolist()]        # --graph: the saved blend
    capsys.readouterr()
    assert labels(saved, "--graph") == [names[i] for i in logits.argmax(1).tolist()]
    err = capsys.readouterr().err
    assert "no graph-prediction files" in err and "classifier alone" in err
