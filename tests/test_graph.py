"""Global document graph: exact/approximate kNN, backend choice, embedding bank, neighbour lookup, pseudo-labels."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gloss_ray.errors import ConfigError
from gloss_ray.graph import (EmbeddingBank, GlobalNeighbours, KnnIndex, LabelSpreading, choose_backend,
                             exact_knn_torch, faiss_gpu_available, label_homophily, make_index,
                             recall_at_k)
from gloss_ray.graph import global_graph as global_graph_mod
from gloss_ray.graph import index as index_mod
from gloss_ray.graph.global_graph import GlobalGraph
from synthetic import clustered_unit_vectors

faiss = pytest.importorskip("faiss")


def brute_force(bank: torch.Tensor, queries: torch.Tensor, k: int, exclude_self: bool = False):
    sim = queries.double() @ bank.double().T
    if exclude_self:
        sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1)


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ------------------------------------------------------------------ exact kNN
@pytest.mark.parametrize("exclude_self", [False, True])
def test_exact_knn_torch_matches_brute_force(exclude_self):
    x = unit(300, 16)
    res = exact_knn_torch(x, x, 7, exclude_self=exclude_self, chunk=64)
    v, i = brute_force(x, x, 7, exclude_self)
    assert res.ids.dtype == torch.int64 and res.scores.dtype == torch.float32 and res.ids.shape == (300, 7)
    assert torch.equal(res.ids, i)
    assert torch.allclose(res.scores.double(), v, atol=1e-5)
    if exclude_self:
        assert not (res.ids == torch.arange(300).unsqueeze(1)).any()


def test_exact_knn_torch_queries_padding_and_dtype():
    bank, q = unit(50, 8), unit(20, 8, seed=1)
    res = exact_knn_torch(bank, q, 5, chunk=3)
    assert torch.equal(res.ids, brute_force(bank, q, 5)[1])
    padded = exact_knn_torch(bank[:3], q, 5)
    assert (padded.ids[:, 3:] == -1).all() and torch.isinf(padded.scores[:, 3:]).all()
    low = exact_knn_torch(bank, q, 5, dtype=torch.bfloat16)
    assert low.scores.dtype == torch.float32 and recall_at_k(low.ids, res.ids) > 0.8
    with pytest.raises(ValueError, match="exclude_self"):
        exact_knn_torch(bank, q, 5, exclude_self=True)


@pytest.mark.parametrize("backend", ["torch-exact", "faiss-flat"])
def test_index_exact_backends_exclude_ids_and_id_map(backend):
    x = unit(200, 16)
    idx = make_index(x, backend)
    assert idx.backend == backend and idx.build_seconds >= 0
    res = idx.search(x, 5, exclude_ids=torch.arange(200), batch_size=64)
    expect = brute_force(x, x, 5, exclude_self=True)[1]
    assert torch.equal(res.ids.cpu(), expect)
    # index over a subset, reported in external ids; two ids excluded per query
    rows = torch.arange(0, 200, 2)
    sub = make_index(x[rows], backend, ids=rows)
    excl = torch.stack([torch.arange(200), torch.full((200,), -1)], 1)
    got = sub.search(x, 3, exclude_ids=excl).ids.cpu()
    sim = x @ x[rows].T
    sim[rows, torch.arange(100)] = float("-inf")
    assert torch.equal(got, rows[sim.topk(3, dim=1).indices])


# ------------------------------------------------------------------ approximate recall
@pytest.fixture(scope="module")
def corpus():
    x, labels = clustered_unit_vectors(10_000, 64, 50, seed=3)
    exact = exact_knn_torch(x, x, 16, exclude_self=True)
    return x, labels, exact


@pytest.mark.parametrize("backend", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_backends_reach_recall(corpus, backend):
    x, labels, exact = corpus
    idx = make_index(x, backend)
    res = idx.search(x, 16, exclude_ids=torch.arange(len(x)))
    rec = recall_at_k(res.ids, exact.ids)
    assert rec >= 0.95, (idx, rec)
    assert not (res.ids == torch.arange(len(x)).unsqueeze(1)).any()
    assert label_homophily(res.ids, labels) > 0.9


@pytest.mark.parametrize("codec", ["pqfs", "pq-bank", "sq8", "flat"])
def test_ivf_fixed_params_and_codecs(corpus, codec):
    x, _, exact = corpus
    idx = make_index(x, "faiss-ivf", nlist=64, nprobe=16, codec=codec, k_factor=16)
    assert idx.params["nlist"] == 64 and idx.nprobe == 16 and idx.params["nprobe"] == 16
    assert idx.params["codec"] == codec and "calib_recall" not in idx.params
    res = idx.search(x[:2000], 17, exclude_ids=torch.arange(2000))
    assert recall_at_k(res.ids[:, :16], exact.ids[:2000]) > 0.8
    assert (res.scores[:, :-1] >= res.scores[:, 1:]).all()
    if codec in ("pqfs", "pq-bank"):  # exact re-ranking: scores are true inner products
        assert idx.params["k_factor"] == 16
        assert idx.params["factory"] == "IVF64,PQ16x4fs" + (",RFlat" if codec == "pqfs" else "")
        got = (x[:2000].unsqueeze(1) * x[res.ids]).sum(-1)
        assert torch.allclose(got, res.scores, atol=1e-4)
    if codec == "pq-bank":   # re-ranked against the indexed tensor itself, not a copy: no bytes beyond it
        assert idx.nbytes(x) == idx.nbytes() - x.numel() * x.element_size() > 0
    idx = make_index(x, "faiss-ivf", target_recall=None, codec=codec)
    assert idx.params["nprobe"] == max(8, -(-idx.params["nlist"] // 80))
    with pytest.raises(ConfigError, match="codec"):
        make_index(x[:500], "faiss-ivf", codec="pq")


# ------------------------------------------------------------------ backend choice
def test_choose_backend_auto_and_errors(monkeypatch):
    # fastest measured full-graph backend on the reference CPU (docs/benchmarks.md section 3, issue 13)
    assert choose_backend(1_000, "cpu") == "faiss-flat"
    assert choose_backend(index_mod.EXACT_MAX_N, "cpu") == "faiss-flat"
    assert choose_backend(index_mod.EXACT_MAX_N + 1, "cpu") == "faiss-ivf"
    assert choose_backend(10**6, "cpu") == "faiss-ivf"
    assert make_index(unit(50, 8)).backend == "faiss-flat"
    assert choose_backend(10, "cpu", "faiss-hnsw") == "faiss-hnsw"
    monkeypatch.setattr(index_mod, "faiss_gpu_available", lambda: False)
    assert choose_backend(10**6, "cuda") == "torch-exact"
    assert choose_backend(10, "cuda:1") == "torch-exact"
    with pytest.raises(ConfigError, match="FAISS GPU build"):
        choose_backend(10, "cuda", "faiss-gpu")
    monkeypatch.setattr(index_mod, "faiss_gpu_available", lambda: True)
    assert choose_backend(10**6, "cuda") == "faiss-gpu"
    with pytest.raises(ValueError, match="torch-exact, faiss-flat, faiss-ivf, faiss-hnsw, faiss-gpu"):
        choose_backend(10, "cpu", "annoy")
    monkeypatch.setattr(index_mod, "_faiss", lambda: None)
    assert choose_backend(10**6, "cpu") == "torch-exact"
    with pytest.raises(ConfigError, match="needs FAISS"):
        choose_backend(10, "cpu", "faiss-flat")


def test_faiss_that_fails_to_load_is_a_config_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "faiss":  # what faiss-gpu does when its CUDA wheels are missing
            raise RuntimeError("libcudart.so.12: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match=r'pip install "gloss-ray\[cpu\]"'):
        choose_backend(10, "cpu")


def test_faiss_gpu_request_without_gpu_build():
    if faiss_gpu_available():
        pytest.skip("a FAISS GPU build is installed")
    with pytest.raises(ConfigError, match="faiss-gpu"):
        make_index(unit(10, 4), "faiss-gpu", device="cuda")


# ------------------------------------------------------------------ helpers
def test_recall_and_homophily_by_hand():
    exact = np.array([[1, 2], [0, 2], [0, -1]])
    approx = np.array([[2, 3], [0, 2], [1, -1]])
    assert recall_at_k(approx, exact) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    labels = np.array([0, 0, 1, -1])
    ids = np.array([[1, 2], [0, 3], [2, -1]])  # edges: 0-1 same, 0-2 diff, 1-0 same, 1-3 unknown, 2-2 same
    assert label_homophily(ids, labels) == pytest.approx(3 / 4)
    assert label_homophily(np.array([[0]]), labels, self_ids=np.array([2])) == 0.0
    assert np.isnan(label_homophily(np.array([[-1]]), labels))


# ------------------------------------------------------------------ bank
def tiny_encoder():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))
    feats = torch.randn(103, 12, generator=torch.Generator().manual_seed(1))

    def encode(idx: torch.Tensor):
        assert not torch.is_grad_enabled()
        return idx, model(feats[idx])
    return model, feats, encode


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_bank_refresh_equals_direct_encoding(dtype, atol):
    model, feats, encode = tiny_encoder()
    bank = EmbeddingBank(103, 8, dtype=dtype)
    assert not bank.filled.any() and bank.version == 0 and bank.refreshed_at_step is None
    order = torch.randperm(103, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        bank.load([encode(part) for part in order.split(10)], step=7)
        direct = F.normalize(model(feats), dim=1)
    assert torch.allclose(bank.as_tensor(torch.float32), direct, atol=atol)
    assert bank.as_tensor().dtype == dtype
    assert bank.version == 1 and bank.refreshed_at_step == 7 and bank.filled.all()
    # sharded refresh: two workers each encode half; every worker loads both parts
    a = EmbeddingBank(103, 8, dtype=dtype)
    with torch.no_grad():
        a.load([encode(torch.arange(0, 50))])
        assert a.filled.tolist() == [True] * 50 + [False] * 53
        a.load([encode(torch.arange(0, 50)), encode(torch.arange(50, 103))])
    assert torch.allclose(a.as_tensor(torch.float32), direct, atol=atol) and a.filled.all() and a.version == 2


def test_bank_online_update_and_set_rows():
    bank = EmbeddingBank(6, 3, dtype=torch.float32, labels=torch.tensor([0, 1, 0, 1, -1, 2]))
    e0, e1 = torch.eye(3)[0], torch.eye(3)[1]
    bank.set_rows(torch.tensor([0, 1]), torch.stack([2 * e0, 3 * e0]))
    assert torch.allclose(bank.vectors[1], e0)  # normalised
    bank.update_online(torch.tensor([0, 2]), torch.stack([2 * e1, e1]))  # the batch's rows replaced, normalised
    assert torch.equal(bank.vectors[0], e1) and torch.equal(bank.vectors[2], e1) and torch.equal(bank.vectors[1], e0)
    assert bank.filled.tolist() == [True, True, True, False, False, False] and bank.version == 0
    with pytest.raises(IndexError):
        bank.set_rows(torch.tensor([6]), e1.unsqueeze(0))


# ------------------------------------------------------------------ global neighbours
def make_neighbour_setup():
    x, labels = clustered_unit_vectors(400, 16, 4, rank=2, seed=5)
    labels = labels.clone()
    labels[torch.arange(0, 400, 5)] = -1  # 20% unknown
    bank = EmbeddingBank(400, 16, dtype=torch.float32, labels=labels)
    bank.set_rows(torch.arange(400), x)
    return bank, x, labels


@pytest.mark.parametrize("labelled_only,batch_size", [(True, 40), (False, 40), (False, 250)])
def test_global_neighbours_excludes_batch_and_unknown(labelled_only, batch_size):
    """Batch of 250 of 400 docs: most first-round candidates are excluded, forcing re-searches."""
    bank, x, labels = make_neighbour_setup()
    index = bank.build_index("faiss-flat", labelled_only=labelled_only)
    gn = GlobalNeighbours(bank, index)
    batch = torch.arange(0, batch_size)
    emb = (x[batch] + 0.01 * torch.randn(batch_size, 16, generator=torch.Generator().manual_seed(0))).requires_grad_()
    ids, vecs, labs = gn.lookup(batch, emb, k=5, max_nodes=1000)
    # reference: per query, the 5 best docs outside the batch with a known label; union
    q = F.normalize(emb.detach(), dim=1)
    sim = q @ x.T
    sim[:, batch] = float("-inf")
    sim[:, labels < 0] = float("-inf")
    top = sim.topk(5, dim=1)
    best = {}
    for s_row, i_row in zip(top.values.tolist(), top.indices.tolist()):
        for s, i in zip(s_row, i_row):
            best[i] = max(best.get(i, -2.0), s)
    assert set(ids.tolist()) == set(best)
    assert len(set(ids.tolist())) == len(ids)  # deduplicated
    assert not torch.isin(ids, batch).any() and (labs >= 0).all()
    assert torch.equal(labs, labels[ids]) and torch.allclose(vecs, x[ids])
    assert not vecs.requires_grad and vecs.dtype == emb.dtype
    scores = torch.tensor([best[i] for i in ids.tolist()])
    assert (scores[:-1] >= scores[1:] - 1e-6).all()  # best first
    # max_nodes keeps the highest-scoring
    few, _, _ = gn.lookup(batch, emb, k=5, max_nodes=7)
    assert torch.equal(few, ids[:7])


def test_global_neighbours_empty_cases():
    bank, x, _ = make_neighbour_setup()
    gn = GlobalNeighbours(bank, bank.build_index("torch-exact"))
    for k, m in [(0, 10), (3, 0)]:
        ids, vecs, labs = gn.lookup(torch.arange(8), x[:8], k=k, max_nodes=m)
        assert ids.shape == (0,) and vecs.shape == (0, 16) and labs.shape == (0,)
        assert ids.dtype == labs.dtype == torch.long


# ------------------------------------------------------------------ pseudo-labels
@pytest.mark.parametrize("sigma", [None, 0.3])
def test_propagation_recovers_two_clusters(sigma):
    g = torch.Generator().manual_seed(0)
    n = 600
    truth = torch.arange(n) % 2
    centres = F.normalize(torch.randn(2, 32, generator=g), dim=1)
    x = F.normalize(centres[truth] + 0.9 * torch.randn(n, 32, generator=g) / 32**0.5, dim=1)
    res = exact_knn_torch(x, x, 10, exclude_self=True)
    labels = np.full(n, -1)
    known = np.random.default_rng(0).choice(n, n // 10, replace=False)  # 10% labelled
    labels[known] = truth.numpy()[known]
    pred, conf = (t.numpy() for t in LabelSpreading(res.ids, res.scores, sigma).spread(labels, 2))
    hidden = labels < 0
    assert (pred[hidden] == truth.numpy()[hidden]).mean() >= 0.95
    assert (pred[known] == labels[known]).all() and (conf[known] == 1).all()
    assert ((conf >= 0.5) & (conf <= 1)).all()


def test_propagation_unreached_nodes_and_bad_input():
    ids = np.array([[1], [0], [3], [2]])
    scores = np.full((4, 1), 0.9, dtype=np.float32)
    spreading = LabelSpreading(ids, scores)
    pred, conf = spreading.spread(np.array([1, -1, -1, -1]), 2)
    assert pred.tolist() == [1, 1, -1, -1] and conf.tolist()[2:] == [0.0, 0.0]
    with pytest.raises(ValueError):
        spreading.spread(np.array([2, -1, -1, -1]), 2)


def test_label_spreading_torch_product_equals_scipy():
    # the sparse-tensor product used on a GPU device, run on CPU against the SciPy one used on CPU
    x, truth = clustered_unit_vectors(300, 16, 3, rank=2, seed=3)
    res = exact_knn_torch(x, x, 8, exclude_self=True)
    labels = np.where(np.arange(300) % 4 == 0, truth.numpy(), -1)
    spreading = LabelSpreading(res.ids, res.scores)
    pred, conf = spreading.spread(labels, 3)
    csr = spreading._csr
    spreading.matrix = torch.sparse_csr_tensor(torch.from_numpy(csr.indptr.astype(np.int64)),
                                               torch.from_numpy(csr.indices.astype(np.int64)),
                                               torch.from_numpy(csr.data), csr.shape)
    spreading._csr = None
    pred_t, conf_t = spreading.spread(labels, 3)
    assert torch.equal(pred, pred_t)
    torch.testing.assert_close(conf, conf_t, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ global graph: no label echo
def _global_graph(emb, known, truth, num_classes, k=8, max_nodes=256, **kw):
    g = GlobalGraph(len(emb), emb.shape[1], known, truth, num_classes, k, max_nodes, backend="torch-exact", **kw)
    g.refresh(lambda idx: emb[torch.as_tensor(idx)], 0)
    return g


def test_extra_nodes_do_not_depend_on_the_batch_labels():
    # 20% of the labels known; every batch document also has an unlabelled exact duplicate in the corpus.
    # Changing the labels of the batch documents must not change a single extra node or label: before,
    # the unlabelled neighbours (the duplicates first) carried pseudo-labels spread from the batch's labels.
    n, c = 1000, 4
    base = unit(n, 16, seed=1)
    truth = np.random.default_rng(0).integers(0, c, n)
    batch = np.arange(0, 500, 5)                       # 100 labelled documents
    known = np.full(n, -1)
    known[batch] = truth[batch]
    known[np.arange(1, n, 10)] = truth[np.arange(1, n, 10)]
    emb = torch.cat([base, base[batch]])               # + unlabelled duplicates of the batch
    truth2, known2 = np.concatenate([truth, truth[batch]]), np.concatenate([known, np.full(len(batch), -1)])
    other = known2.copy()
    other[batch] = (other[batch] + 1) % c              # the same corpus, the batch's labels changed
    bi = torch.as_tensor(batch)
    a = _global_graph(emb, known2, truth2, c).lookup(bi, emb[bi])
    b = _global_graph(emb, other, truth2, c).lookup(bi, emb[bi])
    assert len(a[1]) > 0 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("use_global", [True, False])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.2])
def test_random_labels_give_chance_accuracy_on_hidden_nodes(fraction, use_global):
    # Labels independent of the embeddings: nothing can predict a hidden node's label, through the batch
    # or the extra nodes (real lookup + propagation). Before: 0.38 at 50% and 0.55 at 20% known labels.
    from gloss_ray.losses import label_propagation
    from gloss_ray.losses.gloss import random_mask
    from gloss_ray.train.inputs import known_label_subset

    n, c, batch = 2000, 4, 64
    emb = unit(n, 16, seed=0)
    truth = np.random.default_rng(0).integers(0, c, n)
    keep = known_label_subset(truth, fraction, 0) if fraction < 1 else np.arange(n)
    known = np.full(n, -1)
    known[keep] = truth[keep]
    g = _global_graph(emb, known, truth, c) if use_global else None
    rng, hits, total = np.random.default_rng(1), 0, 0
    for step in range(30):
        bi = torch.as_tensor(rng.choice(keep, batch, replace=False))
        x, lab = emb[bi].double(), torch.as_tensor(truth[bi.numpy()])
        vis = random_mask(batch, 0.7, torch.Generator().manual_seed(step))
        if g is not None:
            ex_emb, ex_lab = g.lookup(bi, emb[bi])
            x, lab = torch.cat([x, ex_emb.double()]), torch.cat([lab, ex_lab])
            vis = torch.cat([vis, torch.ones(len(ex_lab), dtype=torch.bool)])
        f_u = label_propagation(x, lab, vis, 0.5, c)
        hits += int((f_u.argmax(1) == lab[~vis]).sum())
        total += int((~vis).sum())
    assert abs(hits / total - 1 / c) < 0.07  # ~4 standard deviations of 570 guesses at chance


def test_pseudo_confidence_threshold_drops_unsure_pseudo_labels():
    x, truth = unit(600, 16, seed=4), np.random.default_rng(4).integers(0, 3, 600)  # mixed neighbourhoods
    known = np.where(np.arange(600) % 5 == 0, truth, -1)
    batch = torch.arange(0, 100, 5)
    loose = _global_graph(x, known, truth, 3).labels_for_batch(batch)
    strict = _global_graph(x, known, truth, 3, pseudo_confidence=0.6).labels_for_batch(batch)
    unknown = torch.as_tensor(known) < 0
    assert (strict[~unknown] == loose[~unknown]).all()
    kept = unknown & (strict >= 0)
    assert (strict[kept] == loose[kept]).all() and kept.sum() < (unknown & (loose >= 0)).sum()


def test_pseudo_confidence_is_an_option():
    from gloss_ray.cli import _train_overrides, build_parser
    from gloss_ray.config import TrainConfig

    args = build_parser().parse_args(["train", "--benchmark", "mr", "--pseudo-confidence", "0.9"])
    assert TrainConfig.from_sources(None, _train_overrides(args)).pseudo_confidence == 0.9
    with pytest.raises(ConfigError, match="pseudo_confidence"):
        TrainConfig(benchmark="mr", pseudo_confidence=1.5)


def test_ivf_calibration_counts_ties_between_duplicates_as_hits():
    # 200 documents with 19 exact copies each (4000 of 5800 rows): the 16 nearest others of a copy are 16 of
    # its 19 twins, all at similarity 1, and any 16 of them are right. Before, calibration matched ids, so
    # twins other than exact search's picks were misses: recall stayed ~0.83 and nprobe / k_factor went to
    # their maximum (nprobe = nlist, k_factor 256: a brute-force scan).
    base, _ = clustered_unit_vectors(2000, 32, 8, rank=4, seed=0)
    x = torch.cat([base] + [base[:200]] * 19).contiguous()
    idx = make_index(x, "faiss-ivf", codec="pq-bank")
    assert idx.params["calib_recall"] >= 0.96
    assert idx.params["nprobe"] < idx.params["nlist"] / 4 and idx.params["k_factor"] < 256
    q = index_mod.held_out_queries(len(x), 1000, idx.calib_rows, seed=1)
    assert index_mod.tie_aware_recall(x, q, idx.search(x[q], 16, exclude_ids=q).ids, 16) >= 0.95


# ------------------------------------------------------------------ recall on queries not used for calibration
def _record_calibration_queries(monkeypatch) -> list:
    """Row positions each index build searched during its recall calibration (exclude_ids of those searches)."""
    seen, building = [], []
    build, search = KnnIndex.build.__func__, KnnIndex.search

    def recording_build(cls, *a, **kw):
        building.append(True)
        try:
            return build(cls, *a, **kw)
        finally:
            building.pop()

    def recording_search(self, queries, k, *a, **kw):
        if building and kw.get("exclude_ids") is not None:
            seen.append(torch.as_tensor(kw["exclude_ids"]).reshape(-1).cpu())
        return search(self, queries, k, *a, **kw)

    monkeypatch.setattr(KnnIndex, "build", classmethod(recording_build))
    monkeypatch.setattr(KnnIndex, "search", recording_search)
    return seen


@pytest.mark.parametrize("backend", ["faiss-ivf", "faiss-hnsw"])
def test_diagnostic_recall_queries_are_not_the_calibration_queries(monkeypatch, backend):
    calib = _record_calibration_queries(monkeypatch)
    queries = []
    recall = global_graph_mod.tie_aware_recall
    monkeypatch.setattr(global_graph_mod, "tie_aware_recall", lambda v, q, *a: queries.append(q) or recall(v, q, *a))
    x, truth = clustered_unit_vectors(3000, 16, 8, rank=4, seed=6)
    g = GlobalGraph(3000, 16, truth.numpy(), truth.numpy(), 8, 8, 64, backend=backend)
    g.refresh(lambda idx: x[torch.as_tensor(idx)], 0)
    assert calib and len(queries) == 1 and len(queries[0]) == 1000 and 0 < g.diagnostics().recall_at_k <= 1
    assert not torch.isin(queries[0], torch.cat(calib)).any()


def test_benchmark_recall_queries_are_not_the_calibration_queries(monkeypatch):
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "global_graph.py"
    spec = importlib.util.spec_from_file_location("bench_global_graph", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calib = _record_calibration_queries(monkeypatch)
    samples = []
    truth_fn = bench.ground_truth
    monkeypatch.setattr(bench, "ground_truth",
                        lambda x, k, sample, dev: samples.append(sample) or truth_fn(x, k, sample, dev))
    x, labels = clustered_unit_vectors(3000, 16, 8, rank=4, seed=7)
    class Args(argparse.Namespace):  # options not given here are off (None)
        def __getattr__(self, name):
            return None

    args = Args(k=8, backends=["faiss-ivf", "faiss-hnsw"], device="cpu", torch_dtype="", max_exact_full=50_000,
                exact_sample=2000, batch_size=16, lookups=1)
    rows = bench.run_corpus("synthetic", x, labels, args)
    assert len(rows) == 2 and calib and len(samples) == 1
    assert not torch.isin(samples[0], torch.cat(calib)).any()
    assert len(samples[0]) == 2000  # every doc but the 1,000 calibration queries


# ------------------------------------------------------------------ one bank per node
def _shared_bank_worker(rank, world, out):
    import os

    import torch.distributed as dist

    from gloss_ray.graph.shared import node_zeros
    # rendezvous through a file (a FileStore): no TCP store listening on any interface
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        store = node_zeros((1000, 8), torch.float32, "test")
        bank = EmbeddingBank(1000, 8, torch.float32, vectors=store.tensor, writer=store.writer)
        bank.set_rows(torch.tensor([3 + rank]), torch.ones(1, 8))     # only the writer's row lands
        dist.barrier()
        torch.save({"shared": store.shared, "writer": store.writer, "path_left": os.path.exists(store.path),
                    "rows": bank.vectors[3:5].clone(), "filled": bank.filled[3:5].clone()}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_node_zeros_gives_the_workers_of_a_node_one_copy(tmp_path):
    """Two ranks on one machine map one /dev/shm file (unlinked once mapped); the first writes,
    the other sees its rows and writes nothing itself."""
    import torch.multiprocessing as mp

    from gloss_ray.graph.shared import shm_room
    if shm_room() < 300 << 20:
        pytest.skip("no /dev/shm with room here")
    mp.spawn(_shared_bank_worker, args=(2, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["shared"] and r1["shared"] and (r0["writer"], r1["writer"]) == (True, False)
    assert not r0["path_left"] and not r1["path_left"]
    one = F.normalize(torch.ones(8), dim=0)
    for r in (r0, r1):           # row 3 written by rank 0 (the writer); rank 1's row 4 was not written
        assert torch.allclose(r["rows"][0], one) and torch.equal(r["rows"][1], torch.zeros(8))
    assert r0["filled"].tolist() == [True, False] and r1["filled"].tolist() == [False, True]


def test_node_zeros_on_one_process_is_a_private_tensor():
    from gloss_ray.graph.shared import node_zeros

    store = node_zeros((10, 4), torch.float32, "test")
    assert not store.shared and store.writer and torch.equal(store.tensor, torch.zeros(10, 4))
