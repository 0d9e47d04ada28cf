"""GlobalGraph: its state for an exact resume, the refresh schedule of a restored graph, and one choice of
extra nodes for every rank (issue 21, item 6's graph part and "Also")."""
import datetime

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gloss_ray.graph.global_graph import GlobalGraph
from synthetic import clustered_unit_vectors

pytest.importorskip("faiss")

N, DIM, C = 1600, 16, 4     # 1,600 docs: faiss-ivf trains PQ codes (the pqfs codec, with its re-ranking)


def _corpus():
    x, truth = clustered_unit_vectors(N, DIM, C, rank=4, seed=1)
    known = np.where(np.arange(N) % 3 == 0, truth.numpy(), -1)      # a third known: pseudo-labels spread
    return x, truth.numpy(), known


def _graph(backend: str) -> GlobalGraph:
    x, truth, known = _corpus()
    return GlobalGraph(N, DIM, known, truth, C, 8, 64, backend=backend)


def _step(graph: GlobalGraph, s: int):
    """A training step's use of the graph: a batch looks up its extra nodes, then the bank takes the
    batch's new embeddings (far from the old ones, so a bank or index left stale shows)."""
    batch = torch.randperm(N, generator=torch.Generator().manual_seed(s))[:32]
    emb = F.normalize(torch.randn(32, DIM, generator=torch.Generator().manual_seed(1000 + s)), dim=1)
    extra = graph.lookup(batch, emb)
    graph.update_online(batch, emb)
    return extra


@pytest.mark.parametrize("backend", ["torch-exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"])
def test_a_restored_graph_gives_the_same_extra_nodes(backend, tmp_path):
    x, _, _ = _corpus()
    original = _graph(backend)
    original.refresh(lambda rows: x[torch.as_tensor(rows)], step=0, epoch=1)
    for s in range(3):
        _step(original, s)
    torch.save(original.state_dict(), tmp_path / "graph.pt")
    restored = _graph(backend)
    restored.load_state_dict(torch.load(tmp_path / "graph.pt", weights_only=True))
    for s in range(3, 8):
        (e1, l1), (e2, l2) = _step(original, s), _step(restored, s)
        assert len(l1) > 0 and torch.equal(e1, e2) and torch.equal(l1, l2), f"step {s}"


def test_a_restored_graph_refreshes_only_when_the_schedule_says(tmp_path):
    x, _, _ = _corpus()
    fresh = _graph("torch-exact")
    assert fresh.refresh_due(epoch=2, every=2)                    # never refreshed: due whatever the epoch
    torch.save(fresh.state_dict(), tmp_path / "empty.pt")
    fresh.refresh(lambda rows: x[torch.as_tensor(rows)], step=0, epoch=1)
    torch.save(fresh.state_dict(), tmp_path / "refreshed.pt")
    for graph, name in ((fresh, None), (_graph("torch-exact"), "refreshed.pt")):
        if name:
            graph.load_state_dict(torch.load(tmp_path / name, weights_only=True))
        assert graph.refreshed_at_epoch == 1 and graph.bank.refreshed_at_step == 0
        assert not graph.refresh_due(epoch=1, every=2)            # this epoch's refresh has been done
        assert not graph.refresh_due(epoch=2, every=2)            # not a refresh epoch
        assert graph.refresh_due(epoch=3, every=2)
    never = _graph("torch-exact")
    never.load_state_dict(torch.load(tmp_path / "empty.pt", weights_only=True))
    assert never.refresh_due(epoch=2, every=2)


# ------------------------------------------------------------------ one choice of extra nodes for all ranks
def _two_rank_lookup_worker(rank: int, world: int, root: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, _, _ = _corpus()
        graph = _graph("torch-exact")
        graph.refresh(lambda rows: x[torch.as_tensor(rows)], 0)
        batch = torch.arange(0, 64)
        # ranks whose searches disagree (as on hardware with other SIMD paths): rank 1's queries differ
        queries = x[batch] if rank == 0 else F.normalize(x[batch] + 0.5 * torch.randn(64, DIM), dim=1)
        emb, lab = graph.lookup(batch, queries)
        torch.save({"emb": emb, "lab": lab}, f"{root}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_gets_rank_0s_extra_nodes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_lookup_worker, args=(2, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    x, _, _ = _corpus()
    alone = _graph("torch-exact")                 # what rank 0 picks on its own
    alone.refresh(lambda rows: x[torch.as_tensor(rows)], 0)
    emb, lab = alone.lookup(torch.arange(0, 64), x[:64])
    assert len(lab) > 0 and torch.equal(r0["lab"], lab) and torch.equal(r0["emb"], emb)
    assert torch.equal(r1["lab"], r0["lab"]) and torch.equal(r1["emb"], r0["emb"])


def test_a_refresh_changes_the_graph_and_its_diagnostics_describe_it():
    """refresh() returns nothing; diagnostics() describes the last refresh, and its history columns carry
    the pseudo-label figures only when some labels are unknown."""
    x, truth, known = _corpus()
    low = _graph("faiss-flat")
    assert low.diagnostics() is None and low.neighbours is None
    assert low.refresh(lambda rows: x[torch.as_tensor(rows)], step=0, epoch=1) is None
    d = low.diagnostics()
    assert low.neighbours is not None and d.backend == "faiss-flat" and d.recall_at_k == pytest.approx(1.0)
    unknown = known < 0
    assert d.pseudo_labelled is not None and 0 < d.pseudo_labelled <= unknown.sum()
    assert 0.5 < d.pseudo_label_accuracy <= 1.0          # clustered classes: most pseudo-labels right
    assert d.bank_bytes == N * DIM * 4 + N * 8 + N + N * 8 and d.index_bytes == N * DIM * 4
    assert list(d.history()) == ["refresh_s", "encode_s", "index_s", "search_s", "homophily", "recall_at_k",
                                 "pseudo_label_accuracy", "pseudo_labelled", "bank_bytes", "index_bytes",
                                 "bank_shared"]
    full = GlobalGraph(N, DIM, truth, truth, C, 8, 64, backend="faiss-flat")
    full.refresh(lambda rows: x[torch.as_tensor(rows)], step=0, epoch=1)
    assert full.diagnostics().pseudo_label_accuracy is None and "pseudo_labelled" not in full.diagnostics().history()
    assert "recall@8 1.000" in full.diagnostics().describe(N, 8)
