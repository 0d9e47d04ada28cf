"""The global document graph as the training loop uses it ("global G-Loss").

Every ``refresh_every`` epochs the whole training corpus is re-encoded without gradients (each worker
its shard, gathered so that every worker holds the same bank), a kNN index is rebuilt over the bank,
the full kNN graph is searched once (each worker the documents of its shard, gathered) for diagnostics (and, in the low-label setting, as the graph that
spreads the known labels to the rest of the corpus as pseudo-labels). At each step the documents of
the global batch look up their nearest corpus documents, which join the batch's label propagation as
extra labelled nodes with their stored (detached) embeddings. Between refreshes the bank follows each
batch's fresh embeddings (online update).

Pseudo-labels without the batch's own labels. An extra node must not carry information from the label
of a batch document: G-Loss hides some batch labels and scores how well propagation recovers them,
and a pseudo-label spread from a hidden document's own label would hand that label back (its nearest
unlabelled neighbours -- or an unlabelled duplicate of it -- mostly get their pseudo-label from it).
So at each step the pseudo-labels are spread again over the refresh's kNN graph from the known labels
of the documents *outside* the global batch (:meth:`GlobalGraph.labels_for_batch`, one sparse spread
per step); batch documents themselves never join as extra nodes. Known labels of other documents are
their own and are used as they are.

Diagnostics per refresh: encode / index / search seconds, recall@k of the index against exact search
on a sample of documents that the index's recall calibration did not use, label homophily of the kNN
graph (measured with the true labels, which in the low-label setting training never sees) and the
accuracy and count of the pseudo-labels spread from all known labels.

One choice for all ranks. Rank 0 alone picks each step's extra nodes (ids, embeddings, labels) and
broadcasts them: every rank builds its own index, and on mixed hardware (other SIMD paths in FAISS or
BLAS) two ranks could pick different extra nodes and so compute different global losses.

Exact resume. :meth:`GlobalGraph.state_dict` holds everything the loss reads between refreshes -- the
bank's rows as they are now, the kNN index as built at the last refresh (FAISS indexes serialised; a
``torch-exact`` index is rebuilt over the bank, whose tensor it searches) and the refresh's kNN graph
that spreads pseudo-labels -- and :meth:`GlobalGraph.refresh_due` tells the loop whether a restored
graph needs a refresh at the start of an epoch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import distributed as D
from ..log import say
from .bank import EmbeddingBank, GlobalNeighbours
from .index import (KnnIndex, KnnResult, choose_backend, empty_state, held_out_queries, label_homophily,
                    restore_index, tie_aware_recall)
from .pseudo import LabelSpreading
from .shared import node_zeros, recheck


# the graph's state holds its index's (KnnIndex.state_dict) under these keys: index_backend, index_faiss, ...
INDEX_PREFIX = "index_"


@dataclass(frozen=True)
class RefreshDiagnostics:
    """What one refresh found: its seconds (in all, encoding this worker's shard, building the index,
    searching the full graph), the index's recall@k on held-out documents against exact search, the kNN
    graph's label homophily (true labels), the pseudo-labels spread from all known labels (accuracy on the
    unknown documents, how many pass ``pseudo_confidence``; None when every label is known) and the bytes
    this worker's bank and index hold (``bank_shared``: the bank's vectors are one copy per node)."""
    backend: str
    index_params: dict
    refresh_s: float
    encode_s: float
    index_s: float
    search_s: float
    homophily: float
    recall_at_k: float
    pseudo_label_accuracy: float | None
    pseudo_labelled: int | None
    bank_bytes: int
    index_bytes: int
    bank_shared: bool

    HISTORY = ("refresh_s", "encode_s", "index_s", "search_s", "homophily", "recall_at_k", "pseudo_label_accuracy",
               "pseudo_labelled", "bank_bytes", "index_bytes", "bank_shared")

    def history(self) -> dict:
        """The epoch's ``history.csv`` columns (the pseudo-label ones only when labels are unknown)."""
        row = {k: getattr(self, k) for k in self.HISTORY}
        row["bank_shared"] = int(self.bank_shared)
        return {k: v for k, v in row.items() if v is not None}

    def describe(self, docs: int, k: int) -> str:
        """One log line: timings (and encoding rate over ``docs`` documents), quality and memory."""
        return (f"global graph ({self.backend}): refresh {self.refresh_s:.1f}s (encode {self.encode_s:.1f}s, "
                f"{docs / max(self.encode_s, 1e-9):.0f} docs/s, index {self.index_s:.2f}s, search "
                f"{self.search_s:.2f}s), recall@{k} {self.recall_at_k:.3f}, homophily {self.homophily:.3f}"
                + (f", pseudo-label acc {self.pseudo_label_accuracy:.3f}" if self.pseudo_label_accuracy is not None
                   else "")
                + f"; index {self.index_params}, bank {self.bank_bytes / 2**20:.0f} MiB"
                + (" (one per node)" if self.bank_shared else "") + f", index ~{self.index_bytes / 2**20:.0f} MiB")


class GlobalGraph:
    def __init__(self, num_docs: int, dim: int, known_labels: np.ndarray, true_labels: np.ndarray, num_classes: int,
                 k: int, max_nodes: int, backend: str = "auto", device: torch.device | str = "cpu",
                 pseudo_confidence: float = 0.0, diag_queries: int = 1000, seed: int = 0, log=say):
        self.device = torch.device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.known = torch.as_tensor(known_labels, dtype=torch.long)
        self.true_labels = np.asarray(true_labels)
        # on CPU, one bank per node when a node runs several workers (gloss_ray.graph.shared)
        self.log = log
        store = node_zeros((num_docs, dim), dtype, "bank", log=log) if self.device.type == "cpu" else None
        self._store = store
        self.shared = bool(store and store.shared)
        self.bank = EmbeddingBank(num_docs, dim, dtype, self.device, labels=self.known.clone().to(self.device),
                                  vectors=store.tensor if store else None, writer=store.writer if store else True)
        self.num_classes, self.k, self.max_nodes = num_classes, k, max_nodes
        self.backend, self.pseudo_confidence, self.diag_queries, self.seed = backend, pseudo_confidence, diag_queries, seed
        self.neighbours: GlobalNeighbours | None = None
        self.spreading: LabelSpreading | None = None
        self._knn: tuple[torch.Tensor, torch.Tensor] | None = None   # the refresh's kNN graph, when spreading
        self.refreshed_at_epoch: int | None = None
        self._diagnostics: RefreshDiagnostics | None = None
        self.lookup_s = 0.0
        self.lookups = 0

    def refresh(self, encode, step: int, epoch: int | None = None) -> None:
        """Rebuild the graph from the current encoder: ``encode(indices) -> embeddings`` (no grad) for this
        worker's shard refills the bank, a new kNN index is built over it, the full kNN graph searched and,
        in the low-label setting, the pseudo-label spreading set over it. ``step`` and ``epoch`` (1-based)
        are recorded as the refresh's position (:meth:`refresh_due`); :meth:`diagnostics` describes it."""
        t0 = time.perf_counter()
        shard, encode_s = self._encode_into_bank(encode, step)
        t1 = time.perf_counter()
        index = self._build_index()
        t2 = time.perf_counter()
        k = min(self.k, self.bank.num_docs - 1)
        graph = self._search_sharded(index, self.bank.index_vectors(), k, shard)
        t3 = time.perf_counter()
        self._set_spreading(graph)
        self.neighbours = GlobalNeighbours(self.bank, index)
        self.refreshed_at_epoch = epoch
        self._diagnostics = self._measure(index, graph, k, step, (t3 - t0, encode_s, t2 - t1, t3 - t2))

    def diagnostics(self) -> RefreshDiagnostics | None:
        """What the last refresh of this process found (None before one): timings, recall, homophily,
        pseudo-labels and memory (module docstring)."""
        return self._diagnostics

    def _encode_into_bank(self, encode, step: int) -> tuple[list[int], float]:
        """Re-encode this worker's shard and gather every shard into the bank; returns the shard and the
        seconds its encoding took."""
        rank, world = D.rank_and_world()
        self._check_store()
        shard = D.shard_indices(self.bank.num_docs, world, rank)
        t = time.perf_counter()
        emb = encode(shard).float()
        encode_s = time.perf_counter() - t
        parts = D.gather_rows(np.asarray(shard, dtype=np.int64), emb.cpu().to(self.bank.dtype).numpy())
        self.bank.load(((torch.from_numpy(i), torch.from_numpy(v)) for i, v in parts), step)
        D.barrier()                              # a node-shared bank: its writer has written every row
        return shard, encode_s

    def _build_index(self) -> KnnIndex:
        """A kNN index over the whole bank; with a node-shared bank the IVF index keeps only its codes and
        re-ranks against the bank (codec ``pq-bank``)."""
        backend = choose_backend(self.bank.num_docs, str(self.device), self.backend)
        return self.bank.build_index(backend, labelled_only=False,
                                     **({"codec": "pq-bank"} if self.shared and backend == "faiss-ivf" else {}))

    def _set_spreading(self, graph: KnnResult) -> None:
        """With unknown labels, the refresh's kNN graph is the one pseudo-labels spread over."""
        if bool((self.known < 0).any()):
            self._knn = (graph.ids.cpu(), graph.scores.cpu().float())
            self.spreading = LabelSpreading(*self._knn, device=self.device)

    def _measure(self, index: KnnIndex, graph: KnnResult, k: int, step: int,
                 seconds: tuple[float, float, float, float]) -> RefreshDiagnostics:
        """The refresh's diagnostics: recall@k on held-out documents against exact search, homophily with
        the true labels, pseudo-labels spread from all known labels, and memory."""
        ids = graph.ids.cpu().numpy()
        q = held_out_queries(self.bank.num_docs, self.diag_queries, index.calib_rows, seed=self.seed + step)
        pseudo_accuracy = pseudo_labelled = None
        if self.spreading is not None:
            pred, conf = (t.cpu().numpy() for t in self.spreading.spread(self.known, self.num_classes))
            unknown = self.known.numpy() < 0
            pseudo_accuracy = float((pred[unknown] == self.true_labels[unknown]).mean())
            pseudo_labelled = int((unknown & (pred >= 0) & (conf >= self.pseudo_confidence)).sum())
        return RefreshDiagnostics(
            backend=index.backend, index_params=dict(index.params), refresh_s=seconds[0], encode_s=seconds[1],
            index_s=seconds[2], search_s=seconds[3], homophily=label_homophily(ids, self.true_labels),
            recall_at_k=tie_aware_recall(self.bank.index_vectors().float(), q, torch.as_tensor(ids)[q], k),
            pseudo_label_accuracy=pseudo_accuracy, pseudo_labelled=pseudo_labelled, bank_bytes=self.bank_bytes(),
            index_bytes=index.nbytes(self.bank.vectors), bank_shared=self.shared)

    def _check_store(self) -> None:
        """A node-shared bank whose reserved memory is gone on some node becomes a private one on every
        rank (a collective; before the refresh rewrites every row)."""
        if self._store is None:
            return
        store = recheck(self._store, "bank", self.log)
        if store is not self._store:
            self._store, self.shared = store, False
            self.bank.replace_storage(store.tensor, store.writer)

    def refresh_due(self, epoch: int, every: int) -> bool:
        """Whether the loop must refresh at the start of ``epoch`` (1-based) when refreshing every ``every``
        epochs: never refreshed (nor restored from a refreshed state), or a refresh epoch
        (``(epoch - 1) % every == 0``) that has not had its refresh yet (one recorded with ``epoch``)."""
        if every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {every}")
        return self.neighbours is None or ((epoch - 1) % every == 0 and self.refreshed_at_epoch != epoch)

    def state_dict(self) -> dict:
        """Everything the global loss reads between refreshes, as tensors, ints, floats and a dict of
        numbers (``torch.load(weights_only=True)`` reads it): the bank (its live tensors, not copies),
        the refresh's position, its kNN graph (when pseudo-labels are spread) and its index."""
        bank = self.bank.state_dict()
        state = {"num_docs": self.bank.num_docs, "dim": self.bank.dim,
                 "bank_vectors": bank["vectors"], "bank_filled": bank["filled"], "bank_version": bank["version"],
                 "refreshed_at_step": bank["refreshed_at_step"],
                 "refreshed_at_epoch": -1 if self.refreshed_at_epoch is None else int(self.refreshed_at_epoch),
                 "knn_ids": self._knn[0] if self._knn else torch.empty(0, 0, dtype=torch.long),
                 "knn_scores": self._knn[1] if self._knn else torch.empty(0, 0)}
        index = self.neighbours.index.state_dict() if self.neighbours else empty_state()
        state.update({f"{INDEX_PREFIX}{k}": v for k, v in index.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output into a graph built with the same arguments: lookups then
        give what the saved graph's would have. A collective (every rank calls it: a node-shared bank's
        writer writes the rows, the others wait for it)."""
        if (int(state["num_docs"]), int(state["dim"])) != (self.bank.num_docs, self.bank.dim):
            raise ValueError(f"global graph state is for {int(state['num_docs'])} docs x {int(state['dim'])}, "
                             f"this graph has {self.bank.num_docs} x {self.bank.dim}")
        self.bank.load_state_dict({"vectors": state["bank_vectors"], "filled": state["bank_filled"],
                                   "version": state["bank_version"], "refreshed_at_step": state["refreshed_at_step"]})
        D.barrier()
        epoch = int(state["refreshed_at_epoch"])
        self.refreshed_at_epoch = None if epoch < 0 else epoch
        ids, scores = state["knn_ids"], state["knn_scores"]
        self._knn = (ids, scores) if ids.numel() else None
        self.spreading = LabelSpreading(ids, scores, device=self.device) if self._knn else None
        index = restore_index({k[len(INDEX_PREFIX):]: v for k, v in state.items() if k.startswith(INDEX_PREFIX)},
                              self.bank.index_vectors(), str(self.bank.device))
        self.neighbours = GlobalNeighbours(self.bank, index) if index is not None else None

    @staticmethod
    def _search_sharded(index: KnnIndex, vecs: torch.Tensor, k: int, shard: list[int]) -> KnnResult:
        """The full kNN graph (each document's ``k`` nearest others): every rank searches the
        documents of its own (contiguous) shard, and the parts are gathered in rank order."""
        rows = torch.as_tensor(shard, dtype=torch.long)
        part = index.search(vecs[rows.to(vecs.device)], k, exclude_ids=rows)
        parts = D.gather_objects((part.scores.cpu(), part.ids.cpu()))
        return KnnResult(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def bank_bytes(self) -> int:
        """Bytes this worker's bank holds: vectors, labels, fill flags and the known labels (issue 13)."""
        b = self.bank
        return int(sum(t.numel() * t.element_size() for t in (b.vectors, b.labels, b.filled, self.known)))

    def labels_for_batch(self, batch_indices: torch.Tensor) -> torch.Tensor | None:
        """The labels extra nodes may carry for this batch ([num_docs], -1 = none): known labels as they are,
        and for the unknown documents pseudo-labels spread from the known labels of the documents outside
        the batch (kept when their confidence is at least ``pseudo_confidence``). ``None`` when every label
        is known (the bank's labels)."""
        if self.spreading is None:
            return None
        known = self.known.to(self.device)
        seen = known.clone()
        seen[torch.as_tensor(batch_indices).long().reshape(-1).to(self.device)] = -1
        pred, conf = self.spreading.spread(seen, self.num_classes)
        use = (pred >= 0) & (conf >= self.pseudo_confidence)
        return torch.where(known >= 0, known, torch.where(use, pred, -1))

    def lookup(self, batch_indices: torch.Tensor, batch_embeddings: torch.Tensor):
        """Extra labelled nodes for a (global) batch: ``(embeddings, labels)``, detached; the labels come
        from :meth:`labels_for_batch` (no batch document's label reaches them). Rank 0 chooses them and
        every rank gets its choice (a collective)."""
        t = time.perf_counter()
        found = None
        if D.rank_and_world()[0] == 0:
            labels = self.labels_for_batch(batch_indices)
            _, emb, lab = self.neighbours.lookup(batch_indices, batch_embeddings, self.k, self.max_nodes,
                                                 labels=labels)
            found = [emb, lab]
        emb, lab = D.broadcast_rows(found, [(batch_embeddings.dtype, (self.bank.dim,)), (torch.long, ())],
                                    batch_embeddings.device)
        self.lookup_s += time.perf_counter() - t
        self.lookups += 1
        return emb, lab

    def update_online(self, batch_indices: torch.Tensor, batch_embeddings: torch.Tensor) -> None:
        self.bank.update_online(batch_indices.to(self.bank.device), batch_embeddings.detach().to(self.bank.device))

    def take_lookup_seconds(self) -> float:
        """Mean lookup seconds per step since the last call."""
        mean = self.lookup_s / max(1, self.lookups)
        self.lookup_s, self.lookups = 0.0, 0
        return mean
