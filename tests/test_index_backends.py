"""One class per kNN backend (issue 22, item 1): the factory, each backend's state for a resume, its bytes,
and the recall calibration as a function over any backend."""
import pytest
import torch

from gloss_ray.graph import index as index_mod
from gloss_ray.graph.global_graph import GlobalGraph
from gloss_ray.graph.index import (BACKEND_CLASSES, BACKENDS, FaissHnswIndex, FaissIvfIndex, calibrate, exact_knn_torch,
                                   make_index, restore_index, tie_aware_recall)
from synthetic import clustered_unit_vectors

faiss = pytest.importorskip("faiss")

N, DIM = 1600, 16     # >= 1,000 training vectors: the IVF PQ codecs train their codebooks


@pytest.fixture(scope="module")
def x():
    return clustered_unit_vectors(N, DIM, 6, rank=4, seed=11)[0]


def test_the_factory_builds_the_class_the_name_picks(x):
    assert list(BACKEND_CLASSES) == list(BACKENDS)
    for name in ("torch-exact", "faiss-flat", "faiss-hnsw"):
        idx = make_index(x[:300], name)
        assert type(idx) is BACKEND_CLASSES[name] and idx.backend == name and idx.ntotal == 300 and idx.dim == DIM
    assert type(make_index(x[:300])) is BACKEND_CLASSES["faiss-flat"]       # auto on CPU, small corpus
    with pytest.raises(ValueError, match="0 vectors"):
        make_index(x[:0], "faiss-flat")
    with pytest.raises(ValueError, match="ids must have shape"):
        make_index(x[:10], "torch-exact", ids=torch.arange(9))


def test_build_options_are_not_rewritten_by_what_the_build_chose(x):
    idx = make_index(x, "faiss-ivf", codec="sq8", seed=3)
    assert idx.options == {"codec": "sq8", "seed": 3}
    assert {"nlist", "nprobe", "factory", "calib_recall"} <= set(idx.params) and idx.params["seed"] == 3
    assert idx.params["nprobe"] == idx.nprobe and idx.calib_rows is not None


CASES = [("torch-exact", {}), ("faiss-flat", {}), ("faiss-hnsw", {}), ("faiss-ivf", {"codec": "pqfs"}),
         ("faiss-ivf", {"codec": "pq-bank"}), ("faiss-ivf", {"codec": "sq8"}), ("faiss-ivf", {"codec": "flat"})]


@pytest.mark.parametrize("backend,params", CASES)
@pytest.mark.parametrize("with_ids", [False, True])
def test_a_restored_index_searches_like_the_saved_one(backend, params, with_ids, x, tmp_path):
    ids = torch.arange(N) * 3 + 7 if with_ids else None
    idx = make_index(x, backend, ids=ids, **params)
    torch.save(idx.state_dict(), tmp_path / "index.pt")
    state = torch.load(tmp_path / "index.pt", weights_only=True)
    assert (state["faiss"].numel() > 0) == backend.startswith("faiss")
    back = restore_index(state, x, "cpu")
    assert type(back) is type(idx) and back.params == idx.params
    q = clustered_unit_vectors(200, DIM, 6, rank=4, seed=12)[0]
    exclude = ids[:200] if with_ids else None
    before, after = idx.search(q, 9, exclude_ids=exclude), back.search(q, 9, exclude_ids=exclude)
    assert torch.equal(before.ids, after.ids) and torch.equal(before.scores, after.scores)
    assert bool(torch.isin(after.ids, ids if with_ids else torch.arange(N)).all())


def test_no_index_has_a_state_too():
    assert restore_index(index_mod.empty_state(), torch.zeros(3, 4), "cpu") is None


def test_the_global_graph_state_keeps_its_index_fields(tmp_path):
    """A global graph saved before the backends became classes stored its index under these keys, with these
    encodings; reading them is what restore does (a change of format must keep reading this one)."""
    x, truth = clustered_unit_vectors(N, DIM, 4, rank=4, seed=1)
    g = GlobalGraph(N, DIM, truth.numpy(), truth.numpy(), 4, 8, 64, backend="faiss-ivf")
    g.refresh(lambda rows: x[torch.as_tensor(rows)], step=0, epoch=1)
    state = g.state_dict()
    assert {k for k in state if k.startswith("index_")} == {"index_backend", "index_faiss", "index_codec",
                                                            "index_id_map", "index_params"}
    assert state["index_backend"] == BACKENDS.index("faiss-ivf") and state["index_codec"] == 0     # pqfs
    assert state["index_faiss"].dtype == torch.uint8 and state["index_id_map"].numel() == 0
    assert set(state["index_params"]) == {"nlist", "k_factor", "nprobe", "calib_recall"}
    ix = faiss.deserialize_index(state["index_faiss"].numpy())
    assert faiss.extract_index_ivf(ix).nprobe == state["index_params"]["nprobe"]


def test_bytes_beyond_the_bank(x):
    copy = x.clone()
    exact = make_index(x, "torch-exact")
    assert exact.nbytes(x) == 0 and exact.nbytes(copy) == exact.nbytes() == N * DIM * 4
    assert make_index(x, "faiss-flat").nbytes(x) == N * DIM * 4          # FAISS keeps its own copy
    hnsw = make_index(x, "faiss-hnsw", ef_search=32)
    assert hnsw.nbytes() == N * DIM * 4 + N * 2 * 32 * 4                 # vectors + level-0 links (2M)
    bank = make_index(x, "faiss-ivf", codec="pq-bank", nprobe=8)
    codes = bank.nbytes(x)
    assert 0 < codes < N * DIM and bank.nbytes(copy) == codes + N * DIM * 4
    refine = make_index(x, "faiss-ivf", codec="pqfs", nprobe=8)
    assert refine.nbytes(x) == codes + N * DIM * 4                       # IndexRefineFlat's copy


def test_calibrate_picks_the_smallest_setting_that_reaches_the_target(x):
    idx = make_index(x, "faiss-ivf", codec="flat", nlist=32, target_recall=None)
    assert idx.calib_rows is None and idx.calib_recall is None
    ladder, tried = [1, 2, 4, 8, 16, 32], []

    def apply(v):
        tried.append(v)
        idx.nprobe = v

    recall = calibrate(idx, x, ladder, apply, {"target_recall": 0.9, "calib_k": 8, "calib_queries": 300})
    rows = idx.calib_rows
    assert len(rows) == 300 and recall == idx.calib_recall >= 0.9 and tried == ladder[:len(tried)]
    assert idx.nprobe == tried[-1]
    kth = index_mod.kth_neighbour_scores(x, rows, 8)
    for v in tried[:-1]:                      # every smaller setting missed the target
        idx.nprobe = v
        assert tie_aware_recall(x, rows, idx.search(x[rows], 8, exclude_ids=rows).ids, 8, kth=kth) < 0.9
    assert calibrate(make_index(x[:1], "faiss-flat"), x[:1], ladder, apply, {}) is None   # nothing to measure


def test_calibration_runs_over_the_class_of_each_approximate_backend(monkeypatch, x):
    seen = []
    real = index_mod.calibrate
    monkeypatch.setattr(index_mod, "calibrate", lambda index, *a: seen.append(type(index)) or real(index, *a))
    hnsw, ivf = make_index(x, "faiss-hnsw"), make_index(x, "faiss-ivf")
    assert seen[0] is FaissHnswIndex and len(seen) >= 2 and set(seen[1:]) == {FaissIvfIndex}
    assert hnsw.params["calib_recall"] >= 0.96 and ivf.params["calib_recall"] >= 0.96
    calls = len(seen)
    make_index(x, "faiss-hnsw", ef_search=40)
    make_index(x, "faiss-ivf", nprobe=4)
    make_index(x, "torch-exact")
    assert len(seen) == calls                 # fixed settings and exact search: no calibration


def test_torch_exact_matches_exact_search_on_its_dtype(x):
    idx = make_index(x, "torch-exact", dtype="bfloat16", chunk=100)
    assert idx.vectors.dtype == torch.bfloat16 and idx.params["dtype"] == torch.bfloat16
    ref = exact_knn_torch(x.bfloat16(), x[:50].bfloat16(), 5)
    assert torch.equal(idx.search(x[:50], 5).ids, ref.ids)


@pytest.mark.skipif(not index_mod.faiss_gpu_available(), reason="needs a FAISS GPU build and a GPU")
def test_gpu_index_state_round_trip(x, tmp_path):          # pragma: no cover - no GPU build here
    idx = make_index(x.cuda(), "faiss-gpu", device="cuda")
    back = restore_index(idx.state_dict(), x.cuda(), "cuda")
    q = x[:100]
    assert torch.equal(idx.search(q, 8).ids, back.search(q, 8).ids)
