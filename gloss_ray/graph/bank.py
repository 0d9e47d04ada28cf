"""Embedding bank (one unit vector + label per training document) and global-neighbour lookup.

The bank is refreshed every so often by encoding the corpus (:meth:`EmbeddingBank.load`);
between refreshes it can follow each batch's fresh embeddings (:meth:`EmbeddingBank.update_online`).
A :class:`~gloss_ray.graph.index.KnnIndex` built over the bank lets :class:`GlobalNeighbours` add,
for each training batch, its nearest labelled corpus documents as extra (detached) graph nodes.
In data-parallel training each worker re-encodes its shard, and every worker loads all the gathered
``(indices, vectors)`` parts (:meth:`EmbeddingBank.load`).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F

from gloss_ray.graph.index import KnnIndex, make_index

Tensor = torch.Tensor


class EmbeddingBank:
    """``num_docs`` x ``dim`` L2-normalised vectors (``dtype``, on ``device``) and labels (-1 = unknown).

    ``filled[i]`` tells whether row i was ever written; ``version`` counts refreshes and
    ``refreshed_at_step`` is the training step of the last one (``None`` before any).

    ``vectors`` may be given (a zero ``[num_docs, dim]`` tensor of ``dtype`` on ``device``), e.g. one
    that the workers of a node share (:func:`gloss_ray.graph.shared.node_zeros`); then only the
    ``writer`` writes rows into it (every rank writes the same rows, so one write per node suffices)
    and the others only record them as filled.
    """

    def __init__(self, num_docs: int, dim: int, dtype: torch.dtype = torch.float16,
                 device: Union[str, torch.device] = "cpu", labels: Optional[Tensor] = None,
                 vectors: Optional[Tensor] = None, writer: bool = True) -> None:
        if num_docs < 0 or dim <= 0:
            raise ValueError(f"need num_docs >= 0 and dim > 0, got {num_docs}, {dim}")
        self.num_docs, self.dim, self.dtype, self.device = num_docs, dim, dtype, torch.device(device)
        if vectors is None:
            vectors = torch.zeros(num_docs, dim, dtype=dtype, device=self.device)
        elif vectors.shape != (num_docs, dim) or vectors.dtype != dtype or vectors.device != self.device:
            raise ValueError(f"vectors must be a [{num_docs}, {dim}] {dtype} tensor on {self.device}")
        self.vectors, self.writer = vectors, writer
        self.labels = torch.full((num_docs,), -1, dtype=torch.long, device=self.device)
        self.filled = torch.zeros(num_docs, dtype=torch.bool, device=self.device)
        self.version = 0
        self.refreshed_at_step: Optional[int] = None
        if labels is not None:
            self.set_labels(torch.arange(num_docs), labels)

    def _idx(self, indices: Tensor) -> Tensor:
        idx = torch.as_tensor(indices).long().reshape(-1).to(self.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_docs):
            raise IndexError(f"bank row index out of range [0, {self.num_docs})")
        return idx

    def set_labels(self, indices: Tensor, labels: Tensor) -> None:
        """Set the class id (-1 = unknown) of the given rows."""
        self.labels[self._idx(indices)] = torch.as_tensor(labels).long().reshape(-1).to(self.device)

    def set_rows(self, indices: Tensor, vectors: Tensor) -> None:
        """Overwrite rows ``indices`` with L2-normalised ``vectors`` (detached)."""
        idx = self._idx(indices)
        if vectors.shape != (idx.numel(), self.dim):
            raise ValueError(f"vectors must have shape ({idx.numel()}, {self.dim}), got {tuple(vectors.shape)}")
        if self.writer:
            self.vectors[idx] = F.normalize(vectors.detach().float(), dim=1).to(self.device, self.dtype)
        self.filled[idx] = True

    def update_online(self, indices: Tensor, vectors: Tensor) -> None:
        """Replace the rows of a batch's documents with its fresh (L2-normalised, detached) embeddings."""
        self.set_rows(indices, vectors)

    def load(self, parts: Iterable[tuple[Tensor, Tensor]], step: Optional[int] = None) -> None:
        """A refresh: write every ``(indices, vectors)`` part (e.g. each worker's re-encoded shard,
        gathered), bump ``version`` and record the training ``step``."""
        for idx, vectors in parts:
            self.set_rows(torch.as_tensor(idx), torch.as_tensor(vectors))
        self.version += 1
        self.refreshed_at_step = step

    def replace_storage(self, vectors: Tensor, writer: bool = True) -> None:
        """Hold the rows in ``vectors`` from now on (a zero ``[num_docs, dim]`` tensor, e.g. a private copy
        replacing a node-shared one): every row is marked unfilled until written again."""
        if vectors.shape != (self.num_docs, self.dim) or vectors.dtype != self.dtype or vectors.device != self.device:
            raise ValueError(f"vectors must be a [{self.num_docs}, {self.dim}] {self.dtype} tensor on {self.device}")
        self.vectors, self.writer = vectors, writer
        self.filled.zero_()

    def state_dict(self) -> dict:
        """What the bank holds: ``vectors`` (the live tensor, not a copy, as ``nn.Module.state_dict``
        does), ``filled``, ``version`` and ``refreshed_at_step`` (-1 before any refresh)."""
        return {"vectors": self.vectors, "filled": self.filled, "version": int(self.version),
                "refreshed_at_step": -1 if self.refreshed_at_step is None else int(self.refreshed_at_step)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output bit for bit (vectors as stored, not re-normalised; on a
        node-shared bank only the writer writes them)."""
        vectors = torch.as_tensor(state["vectors"])
        if vectors.shape != (self.num_docs, self.dim):
            raise ValueError(f"bank state has shape {tuple(vectors.shape)}, this bank ({self.num_docs}, {self.dim})")
        if self.writer:
            self.vectors.copy_(vectors.to(self.device, self.dtype))
        self.filled.copy_(torch.as_tensor(state["filled"]).to(self.device))
        self.version = int(state["version"])
        step = int(state["refreshed_at_step"])
        self.refreshed_at_step = None if step < 0 else step

    def as_tensor(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The [num_docs, dim] vectors (the bank's own tensor when ``dtype`` is None or equal)."""
        return self.vectors if dtype in (None, self.dtype) else self.vectors.to(dtype)

    def build_index(self, backend: str = "auto", *, labelled_only: bool = True, **params: Any) -> KnnIndex:
        """A :class:`KnnIndex` over the filled rows (only those with a known label when ``labelled_only``),
        reporting bank row ids. Over the whole bank it indexes the bank's own tensor (float32 on CPU), no copy."""
        keep = self.filled & (self.labels >= 0) if labelled_only else self.filled
        if bool(keep.all()):
            return make_index(self.index_vectors(), backend, str(self.device), **params)
        rows = keep.nonzero().squeeze(1)
        vecs = self.vectors[rows] if self.device.type == "cuda" else self.vectors[rows].float()
        return make_index(vecs, backend, str(self.device), ids=rows, **params)

    def index_vectors(self) -> Tensor:
        """The vectors as the kNN index takes them: the bank's dtype on GPU, float32 on CPU."""
        return self.as_tensor() if self.device.type == "cuda" else self.as_tensor(torch.float32)


class GlobalNeighbours:
    """Per-step lookup of each batch document's nearest corpus documents in the bank."""

    def __init__(self, bank: EmbeddingBank, index: KnnIndex) -> None:
        self.bank, self.index = bank, index

    def lookup(self, batch_indices: Tensor, batch_embeddings: Tensor, k: int,
               max_nodes: Optional[int] = None, labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(neighbour_ids [m], neighbour_embeddings [m, dim], neighbour_labels [m])``, m <= max_nodes.

        ``labels`` ([num_docs], -1 = unknown; default: the bank's) are the labels the neighbours carry,
        e.g. pseudo-labels computed without the batch's own labels. For each batch doc (query = its
        current embedding, detached and normalised) its ``k`` nearest bank docs are taken, skipping docs
        in the batch, docs with unknown label (-1) and bank rows never filled; the union is deduplicated
        (best score kept) and the ``max_nodes`` highest-scoring ones returned (``None`` = no cap), best
        first. Embeddings come from the bank, detached, in ``batch_embeddings``' dtype and device.
        ``2k + 2`` neighbours are fetched per query, and queries left with fewer than ``k`` usable ones
        are searched again with 4x as many (so an index over labelled rows only,
        :meth:`EmbeddingBank.build_index`, is cheapest).
        """
        dev, bank = batch_embeddings.device, self.bank
        labels = bank.labels if labels is None else torch.as_tensor(labels).long().to(bank.device)
        if labels.shape != (bank.num_docs,):
            raise ValueError(f"labels must have shape ({bank.num_docs},), got {tuple(labels.shape)}")
        bi = torch.as_tensor(batch_indices).long().reshape(-1).to(bank.device)
        if k <= 0 or max_nodes == 0 or bi.numel() == 0 or self.index.ntotal == 0:
            return (torch.empty(0, dtype=torch.long, device=dev),
                    torch.empty(0, bank.dim, dtype=batch_embeddings.dtype, device=dev),
                    torch.empty(0, dtype=torch.long, device=dev))
        q = F.normalize(batch_embeddings.detach().float(), dim=1)
        ntotal = self.index.ntotal
        pending, fetch = torch.arange(q.shape[0]), min(ntotal, 2 * k + 2)
        kept_ids, kept_scores = [], []
        while pending.numel():
            res = self.index.search(q[pending.to(q.device)], fetch)
            ids, scores = res.ids.to(bank.device), res.scores.to(bank.device)
            safe = ids.clamp_min(0)
            valid = (ids >= 0) & ~torch.isin(ids, bi) & (labels[safe] >= 0) & bank.filled[safe]
            # a row is final once it has k valid ids, or the index has nothing more to give
            done = ((valid.sum(1) >= k) | (fetch >= ntotal) | (ids[:, -1] < 0)).cpu()
            keep = valid & (valid.cumsum(1) <= k) & done.to(valid.device).unsqueeze(1)
            kept_ids.append(ids[keep])
            kept_scores.append(scores[keep])
            pending, fetch = pending[~done], min(ntotal, 4 * fetch)
        ids, scores = torch.cat(kept_ids), torch.cat(kept_scores)
        order = torch.sort(scores, descending=True, stable=True).indices
        ids = ids[order]
        uniq, inv = torch.unique(ids, return_inverse=True)
        pos = torch.arange(ids.numel(), device=ids.device)
        first = torch.full((uniq.numel(),), ids.numel(), device=ids.device).scatter_reduce_(0, inv, pos, "amin")
        ids = ids[first.sort().values]
        if max_nodes is not None:
            ids = ids[:max_nodes]
        return (ids.to(dev), bank.vectors[ids].to(dev, batch_embeddings.dtype), labels[ids].to(dev))
