"""Global document graph: exact/approximate kNN, backend choice, embedding bank, neighbour lookup, pseudo-labels."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gloss_ray.errors import ConfigError
from gloss_ray.graph import (EmbeddingBank, GlobalNeighbours, KnnIndex, choose_backend, exact_knn_torch,
                             faiss_gpu_available, label_homophily, propagate_labels_knn, recall_at_k)
from gloss_ray.graph import index as index_mod
from gloss_ray.graph.synthetic import clustered_unit_vectors

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
    idx = KnnIndex.build(x, backend)
    assert idx.backend == backend and idx.build_seconds >= 0
    res = idx.search(x, 5, exclude_ids=torch.arange(200), batch_size=64)
    expect = brute_force(x, x, 5, exclude_self=True)[1]
    assert torch.equal(res.ids.cpu(), expect)
    # index over a subset, reported in external ids; two ids excluded per query
    rows = torch.arange(0, 200, 2)
    sub = KnnIndex.build(x[rows], backend, ids=rows)
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
    idx = KnnIndex.build(x, backend)
    res = idx.search(x, 16, exclude_ids=torch.arange(len(x)))
    rec = recall_at_k(res.ids, exact.ids)
    assert rec >= 0.95, (idx, rec)
    assert not (res.ids == torch.arange(len(x)).unsqueeze(1)).any()
    assert label_homophily(res.ids, labels) > 0.9


def test_ivf_fixed_params_and_list_major_search(corpus, monkeypatch):
    x, _, _ = corpus
    idx = KnnIndex.build(x, "faiss-ivf", nlist=64, nprobe=5)
    assert idx.params["nlist"] == 64 and idx._index.nprobe == 5 and "calib_recall" not in idx.params
    q = x[:3000]
    monkeypatch.setattr(index_mod, "LIST_MAJOR_MIN_QUERIES", 10**9)  # FAISS's own scan
    ref = idx.search(q, 16)
    monkeypatch.setattr(index_mod, "LIST_MAJOR_MIN_QUERIES", 1)  # list-by-list matmul scan
    got = idx.search(q, 16)
    assert (got.ids == ref.ids).float().mean() > 0.999  # equal up to float rounding among near-ties
    assert torch.allclose(got.scores, ref.scores, atol=1e-5)
    idx = KnnIndex.build(x, "faiss-ivf", target_recall=None)
    assert idx.params["nprobe"] == max(8, -(-idx.params["nlist"] // 80))


# ------------------------------------------------------------------ backend choice
def test_choose_backend_auto_and_errors(monkeypatch):
    assert choose_backend(1_000, "cpu") == "faiss-flat"
    assert choose_backend(50_000, "cpu") == "faiss-flat"
    assert choose_backend(50_001, "cpu") == "faiss-ivf"
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


def test_faiss_gpu_request_without_gpu_build():
    if faiss_gpu_available():
        pytest.skip("a FAISS GPU build is installed")
    with pytest.raises(ConfigError, match="faiss-gpu"):
        KnnIndex.build(unit(10, 4), "faiss-gpu", device="cuda")


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
    assert bank.fill_fraction == 0 and bank.version == 0 and bank.refreshed_at_step is None
    order = torch.randperm(103, generator=torch.Generator().manual_seed(2))
    stats = bank.refresh(encode, order.split(10), step=7)
    with torch.no_grad():
        direct = F.normalize(model(feats), dim=1)
    assert torch.allclose(bank.as_tensor(torch.float32), direct, atol=atol)
    assert bank.as_tensor().dtype == dtype
    assert bank.version == 1 and bank.refreshed_at_step == 7 and bank.fill_fraction == 1.0
    assert stats["docs"] == 103 and stats["seconds"] >= stats["encode_seconds"] >= 0
    # sharded refresh: two workers each encode half, then merge
    a, b = EmbeddingBank(103, 8, dtype=dtype), EmbeddingBank(103, 8, dtype=dtype)
    a.refresh(encode, [torch.arange(0, 50)])
    b.refresh(encode, [torch.arange(50, 103)])
    assert a.fill_fraction == pytest.approx(50 / 103)
    a.merge(b)
    assert torch.allclose(a.as_tensor(torch.float32), direct, atol=atol) and a.fill_fraction == 1.0


def test_bank_online_update_and_set_rows():
    bank = EmbeddingBank(6, 3, dtype=torch.float32, labels=torch.tensor([0, 1, 0, 1, -1, 2]))
    e0, e1 = torch.eye(3)[0], torch.eye(3)[1]
    bank.set_rows(torch.tensor([0, 1]), torch.stack([2 * e0, 3 * e0]))
    assert torch.allclose(bank.vectors[1], e0)  # normalised
    bank.update_online(torch.tensor([0, 2]), torch.stack([e1, e1]), momentum=0.5)
    assert torch.allclose(bank.vectors[0], F.normalize(e0 + e1, dim=0))  # blended
    assert torch.allclose(bank.vectors[2], e1)  # never filled: takes the new vector
    bank.update_online(torch.tensor([1]), e1.unsqueeze(0))  # momentum 0 = replace
    assert torch.allclose(bank.vectors[1], e1)
    assert bank.fill_fraction == pytest.approx(0.5) and bank.version == 0
    with pytest.raises(ValueError):
        bank.update_online(torch.tensor([1]), e1.unsqueeze(0), momentum=1.0)
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
    pred, conf = propagate_labels_knn(res.ids.numpy(), res.scores.numpy(), labels, 2, sigma=sigma)
    hidden = labels < 0
    assert (pred[hidden] == truth.numpy()[hidden]).mean() >= 0.95
    assert (pred[known] == labels[known]).all() and (conf[known] == 1).all()
    assert ((conf >= 0.5) & (conf <= 1)).all()


def test_propagation_unreached_nodes_and_bad_input():
    ids = np.array([[1], [0], [3], [2]])
    scores = np.full((4, 1), 0.9, dtype=np.float32)
    pred, conf = propagate_labels_knn(ids, scores, np.array([1, -1, -1, -1]), 2)
    assert pred.tolist() == [1, 1, -1, -1] and conf.tolist()[2:] == [0.0, 0.0]
    with pytest.raises(ValueError):
        propagate_labels_knn(ids, scores, np.array([2, -1, -1, -1]), 2)
