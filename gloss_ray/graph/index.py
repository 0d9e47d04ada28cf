"""kNN search over the embedding bank: one class per backend, and a factory that picks one by name.

All vectors are assumed L2-normalised, so the score is the inner product (cosine similarity).
Results are returned as :class:`KnnResult` with ``ids == -1`` / ``scores == -inf`` marking padding
(fewer than ``k`` neighbours found or left after exclusions).

Backends (:func:`choose_backend` picks one by name, :func:`make_index` builds it):

``torch-exact``  :class:`TorchExactIndex`: chunked matmul + top-k in PyTorch on the tensors' device (any dtype)
``faiss-flat``   :class:`FaissFlatIndex`: exact ``IndexFlatIP`` (small CPU corpora)
``faiss-ivf``    :class:`FaissIvfIndex`: FAISS IVF (inner product), built with ``faiss.index_factory``: by
                 default ``IVF{nlist},PQ{d/4}x4fs,RFlat`` -- 4-bit PQ fast-scan codes in the inverted lists,
                 then the ``k_factor * k`` best candidates re-ranked exactly (``IndexRefineFlat``);
                 ``codec="sq8"`` / ``"flat"`` give ``IVF{nlist},SQ8`` / ``IVF{nlist},Flat``. The
                 coarse quantiser is FAISS's own (spherical) k-means; ``nprobe`` is calibrated
                 for recall (:func:`calibrate`)
``faiss-hnsw``   :class:`FaissHnswIndex`: ``IndexHNSWFlat`` (inner product, M=32)
``faiss-gpu``    :class:`FaissGpuIndex`: a FAISS GPU index (needs a FAISS GPU build)

Every backend has the face of :class:`KnnIndex`: ``build`` (a classmethod), ``search``, ``nbytes``,
``params`` (the settings in effect, read-only), ``state_dict`` and ``from_state``
(:func:`restore_index` picks the class from a state).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import numpy as np
import torch

from gloss_ray.errors import ConfigError

Array = Union[torch.Tensor, np.ndarray]

BACKENDS: tuple[str, ...] = ("torch-exact", "faiss-flat", "faiss-ivf", "faiss-hnsw", "faiss-gpu")
# auto on CPU: exact faiss-flat up to this corpus size, faiss-ivf above (measured: docs/benchmarks.md
# section 3, "Auto choice on CPU")
EXACT_MAX_N = 20_000
SEARCH_BATCH = 65_536  # queries per FAISS/torch search call, at most
# A FAISS search call holds about (queries x fetched x re-ranked candidates per result x 12 bytes) of
# candidate scores and ids; calls are cut to keep that under this budget (docs/benchmarks.md section 3).
SEARCH_BUFFER_BYTES = 256 << 20
# pqfs: PQ fast-scan codes re-ranked by FAISS against its own flat copy of the vectors (RFlat);
# pq-bank: the same codes re-ranked against the indexed tensor itself (no copy: for a node-shared bank)
IVF_CODECS: tuple[str, ...] = ("pqfs", "pq-bank", "sq8", "flat")
_MAX_SIM_ELEMENTS = 1 << 27  # cap on one similarity block (query chunk x bank) in exact_knn_torch
@dataclass
class KnnResult:
    """Top-k neighbours: ``scores`` float32 [n, k] inner products (descending), ``ids`` int64 [n, k].

    Padding slots hold ``id == -1`` and ``score == -inf``.
    """

    scores: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _faiss() -> Any:
    """The ``faiss`` module, or ``None`` when it is not installed.

    A FAISS build that is installed but cannot load (e.g. ``faiss-gpu`` raising ``RuntimeError`` when
    its CUDA wheels are missing) raises :class:`ConfigError` with the install hint.
    """
    try:
        import faiss
    except ImportError:
        return None
    except RuntimeError as err:
        raise ConfigError(f"FAISS is installed but failed to load ({err}); reinstall it: "
                          f"{_FAISS_HINT}") from err
    return faiss


_FAISS_HINT = 'pip install "gloss-ray[cpu]" (or "gloss-ray[gpu]")'


def faiss_gpu_available() -> bool:
    """True when a FAISS GPU build is installed and sees at least one GPU."""
    faiss = _faiss()
    return bool(faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)


def choose_backend(n: int, device: str, requested: str = "auto") -> str:
    """Pick the kNN backend for ``n`` vectors living on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    ``requested`` other than ``"auto"`` is validated and returned. Auto: on CUDA ``faiss-gpu`` when a
    FAISS GPU build exists, else ``torch-exact``; on CPU the fastest backend measured for a full kNN
    graph at that size (:data:`EXACT_MAX_N`): exact ``faiss-flat`` for ``n <= 20_000``, else
    ``faiss-ivf`` (``torch-exact`` when FAISS is not installed).
    """
    faiss = _faiss()
    if requested != "auto":
        if requested not in BACKENDS:
            raise ConfigError(f"unknown kNN backend {requested!r}; choose one of: auto, {', '.join(BACKENDS)}")
        if requested.startswith("faiss") and faiss is None:
            raise ConfigError(f"kNN backend {requested!r} needs FAISS: {_FAISS_HINT}")
        if requested == "faiss-gpu" and not faiss_gpu_available():
            raise ConfigError("kNN backend 'faiss-gpu' needs a FAISS GPU build and a visible GPU "
                              "(pip install gloss-ray[gpu]); use 'torch-exact' on CUDA instead")
        return requested
    if str(device).startswith("cuda"):
        return "faiss-gpu" if faiss_gpu_available() else "torch-exact"
    if faiss is None:
        return "torch-exact"
    return "faiss-flat" if n <= EXACT_MAX_N else "faiss-ivf"


def _pad_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> KnnResult:
    """Float32 scores, -1/-inf padding for invalid slots, and width exactly ``k``."""
    scores = scores.float()
    bad = (ids < 0) | ~torch.isfinite(scores)
    scores = scores.masked_fill(bad, float("-inf"))
    ids = ids.masked_fill(bad, -1)
    if ids.shape[1] < k:
        extra = k - ids.shape[1]
        scores = torch.cat([scores, scores.new_full((scores.shape[0], extra), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], extra), -1)], 1)
    return KnnResult(scores[:, :k].contiguous(), ids[:, :k].contiguous())


def exact_knn_torch(bank: torch.Tensor, queries: torch.Tensor, k: int, *, exclude_self: bool = False,
                    chunk: int = 4096, dtype: Optional[torch.dtype] = None) -> KnnResult:
    """Exact inner-product top-``k`` of each query row against ``bank``, in PyTorch.

    Runs on the tensors' device. Queries are processed ``chunk`` at a time (fewer when the bank is
    large, so a block never exceeds ~2^27 similarities); the n x n matrix is never built. ``dtype``
    (e.g. ``torch.float16`` on GPU, ``torch.bfloat16`` on CPUs with AMX) sets the matmul precision;
    scores come back as float32. ``exclude_self`` requires ``queries`` to be the bank (row i of
    ``queries`` is bank row i) and drops that id from row i's neighbours.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n, nq = bank.shape[0], queries.shape[0]
    if exclude_self and nq != n:
        raise ValueError(f"exclude_self needs queries to be the bank itself ({nq} queries, {n} bank rows)")
    dtype = dtype or bank.dtype
    b = bank.to(dtype)
    kk = min(k, n)
    step = max(1, min(chunk, _MAX_SIM_ELEMENTS // max(n, 1)))
    out_s, out_i = [], []
    with torch.no_grad():
        for s in range(0, nq, step):
            q = queries[s:s + step].to(device=b.device, dtype=dtype)
            sim = q @ b.T
            if exclude_self:
                rows = torch.arange(q.shape[0], device=sim.device)
                sim[rows, rows + s] = float("-inf")
            v, i = sim.topk(kk, dim=1) if kk > 0 else (sim[:, :0], sim[:, :0].long())
            out_s.append(v.float())
            out_i.append(i)
    if not out_s:
        return KnnResult(torch.empty(0, k, device=bank.device), torch.empty(0, k, dtype=torch.long, device=bank.device))
    return _pad_topk(torch.cat(out_s), torch.cat(out_i), k)


def rerank_exact(vectors: torch.Tensor, queries: torch.Tensor, candidates: torch.Tensor, k: int) -> KnnResult:
    """The ``k`` best of each query's ``candidates`` (ids into ``vectors``, -1 = none) by exact inner
    product, best first. On a CPU float32 ``vectors`` FAISS computes the products in place
    (``fvec_inner_products_by_idx``, threaded, no gathered copy); otherwise rows are gathered in torch.
    Queries go in blocks of at most ~``SEARCH_BUFFER_BYTES`` of working memory."""
    nq, m = candidates.shape
    cpu = vectors.device.type == "cpu" and vectors.dtype == torch.float32 and vectors.is_contiguous()
    step = max(1, SEARCH_BUFFER_BYTES // max(1, m * (4 if cpu else vectors.shape[1] * 4)))
    scores, ids = [], []
    for s in range(0, nq, step):
        cand, q = candidates[s:s + step], queries[s:s + step].float()
        if cpu:
            faiss = _faiss()
            safe = cand.clamp_min(0).contiguous()
            q = q.contiguous()
            sim = torch.empty(cand.shape, dtype=torch.float32)
            faiss.fvec_inner_products_by_idx(faiss.swig_ptr(sim.numpy()), faiss.swig_ptr(q.numpy()),
                                             faiss.swig_ptr(vectors.numpy()), faiss.swig_ptr(safe.numpy()),
                                             vectors.shape[1], cand.shape[0], m)
        else:
            sim = torch.einsum("bmd,bd->bm", vectors[cand.clamp_min(0).to(vectors.device)].float(), q.to(vectors.device))
        sim = sim.cpu().masked_fill(cand < 0, float("-inf"))
        top = sim.topk(min(k, m), dim=1)
        scores.append(top.values)
        ids.append(torch.gather(cand, 1, top.indices))
    return _pad_topk(torch.cat(scores), torch.cat(ids), k)


def _drop_excluded(res: KnnResult, exclude: torch.Tensor, k: int) -> KnnResult:
    """Remove ``exclude[i]`` ids (shape [n, m], -1 = none) from row i, keep order, cut to ``k``."""
    exclude = exclude.to(res.ids.device)
    hit = (res.ids.unsqueeze(2) == exclude.unsqueeze(1)).any(2) & (res.ids >= 0)
    order = torch.sort(hit.to(torch.int8), dim=1, stable=True).indices
    ids = torch.gather(res.ids.masked_fill(hit, -1), 1, order)
    scores = torch.gather(res.scores.masked_fill(hit, float("-inf")), 1, order)
    return _pad_topk(scores, ids, k)


def _to_numpy_f32(x: Array) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _to_tensor(x: Array) -> torch.Tensor:
    return x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def calibration_rows(ntotal: int, queries: int = 1000, seed: int = 0) -> torch.Tensor:
    """The rows (positions, sorted) a ``faiss-ivf``/``faiss-hnsw`` index of ``ntotal`` vectors built with
    ``calib_queries=queries`` and ``seed=seed`` tunes its recall on: ``min(queries, ntotal // 2)`` random
    rows, so that at least half the corpus is left to measure recall on queries it was not tuned on
    (:func:`held_out_queries`)."""
    g = torch.Generator().manual_seed(int(seed) + 1)
    return torch.randperm(ntotal, generator=g)[: min(int(queries), ntotal // 2)].sort().values


def held_out_queries(ntotal: int, count: Optional[int], exclude: Optional[Array] = None,
                     seed: int = 0) -> torch.Tensor:
    """Up to ``count`` random rows of ``range(ntotal)`` (sorted; ``None`` = all) that are not in ``exclude``
    -- e.g. recall queries disjoint from an index's calibration queries (:attr:`KnnIndex.calib_rows`)."""
    rows = torch.arange(ntotal)
    if exclude is not None and len(exclude):
        rows = rows[~torch.isin(rows, _to_tensor(exclude).long().cpu())]
    if count is not None and count < rows.numel():
        g = torch.Generator().manual_seed(int(seed))
        rows = rows[torch.randperm(rows.numel(), generator=g)[:count]].sort().values
    return rows


def calibrate(index: "KnnIndex", x: torch.Tensor, ladder: Sequence[int], apply: Callable[[int], None],
              options: dict[str, Any]) -> Optional[float]:
    """Tune one search setting of ``index`` (any backend) for recall: the smallest ``ladder`` value, passed to
    ``apply``, whose recall@``calib_k`` (16) against exact search over ``x`` (the indexed vectors, in row
    order) reaches ``target_recall`` (0.96, a margin over 0.95 for the sampling error).

    Recall is tie-aware (:func:`tie_aware_recall`: a neighbour as similar as the exact k-th one is a hit, so
    exact duplicates are not misses) and measured on ``calib_queries`` (1000, at most half the corpus)
    random corpus rows, self excluded (:func:`calibration_rows` with ``seed``). The rows and the recall
    reached are kept in ``index.calib_rows`` / ``index.calib_recall``; the recall is measured on the tuning
    queries, so an independent figure needs other queries (:func:`held_out_queries`). Returns that recall,
    or ``None`` (nothing applied) when the corpus has fewer than two vectors.
    """
    target = options.get("target_recall", 0.96)
    k = min(int(options.get("calib_k", 16)), index.ntotal - 1)
    if k < 1:
        return None
    rows = calibration_rows(index.ntotal, int(options.get("calib_queries", 1000)), int(options.get("seed", 0)))
    kth = kth_neighbour_scores(x, rows, k)
    rec = float("nan")
    for value in ladder:
        apply(value)
        rec = tie_aware_recall(x, rows, index.search(x[rows], k, exclude_ids=rows).ids, k, kth=kth)
        if rec >= target:
            break
    index.calib_rows, index.calib_recall = rows, rec
    return rec


def empty_state() -> dict[str, Any]:
    """The state of no index (``backend`` -1); the fields of :meth:`KnnIndex.state_dict`."""
    return {"backend": -1, "faiss": torch.empty(0, dtype=torch.uint8), "codec": -1,
            "id_map": torch.empty(0, dtype=torch.long), "params": {}}


class KnnIndex:
    """A kNN index over a fixed set of unit vectors: what every backend shares.

    Build one with :func:`make_index` (backend by name) or ``<Backend>.build(vectors, device, ids=..., **params)``.
    ``id_map`` (``ids`` at build) maps index rows to external ids (e.g. bank rows of the labelled docs only);
    results are reported in those ids, on :attr:`result_device`. ``calib_rows`` are the row positions the
    recall calibration searched and ``calib_recall`` its estimate (``None`` without calibration): measure
    recall on other rows (:func:`held_out_queries`). ``options`` are the build's parameters as given (never
    changed); :attr:`params` adds what the build chose. A backend implements ``_create`` (build),
    ``_search`` (row positions, ``k <= ntotal``), ``nbytes`` and ``_restore``.
    """

    backend: ClassVar[str]

    def __init__(self, dim: int, ntotal: int, options: dict[str, Any]) -> None:
        self.dim, self.ntotal, self.options = dim, ntotal, dict(options)
        self.id_map: Optional[torch.Tensor] = None
        self.calib_rows: Optional[torch.Tensor] = None
        self.calib_recall: Optional[float] = None
        self.build_seconds = 0.0

    @classmethod
    def build(cls, vectors: Array, device: str = "cpu", *, ids: Optional[Array] = None, **params: Any) -> "KnnIndex":
        """Index ``vectors`` [n, d] (already L2-normalised) with this backend (parameters: :func:`make_index`);
        ``ids`` [n]: the external id of each row."""
        n = int(vectors.shape[0])
        if n == 0:
            raise ValueError("cannot build a kNN index over 0 vectors")
        id_map = None if ids is None else _to_tensor(ids).long().cpu()
        if id_map is not None and id_map.shape != (n,):
            raise ValueError(f"ids must have shape ({n},), got {tuple(id_map.shape)}")
        start = time.perf_counter()
        index = cls._create(vectors, str(device), params)   # calibration searches row positions: no id map yet
        if id_map is not None:
            index.id_map = id_map.to(index.result_device)
        index.build_seconds = time.perf_counter() - start
        return index

    @classmethod
    def _create(cls, vectors: Array, device: str, params: dict[str, Any]) -> "KnnIndex":
        raise NotImplementedError

    @property
    def params(self) -> dict[str, Any]:
        """The build's ``options`` and, after them, the settings it chose (e.g. calibrated ``nprobe``)."""
        return {**self.options, **self._settings()}

    def _settings(self) -> dict[str, Any]:
        return {}

    @property
    def result_device(self) -> torch.device:
        return torch.device("cpu")

    # ---------------------------------------------------------------- search
    def _search(self, q: Array, k: int) -> KnnResult:
        raise NotImplementedError

    def _candidates_per_result(self) -> int:
        return 1

    def search(self, queries: Array, k: int, exclude_ids: Optional[Array] = None,
               batch_size: int = SEARCH_BATCH) -> KnnResult:
        """Top-``k`` neighbours of each query row (unit vectors), searched ``batch_size`` at a time.

        ``exclude_ids``: per-query ids to drop, shape [nq] (e.g. each query's own id) or [nq, m]
        (-1 = nothing), in the index's external ids. ``k + m`` neighbours are fetched and filtered.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        nq = int(queries.shape[0])
        ex = None
        if exclude_ids is not None:
            ex = _to_tensor(exclude_ids).long()
            ex = ex.unsqueeze(1) if ex.dim() == 1 else ex
            if ex.shape[0] != nq:
                raise ValueError(f"exclude_ids has {ex.shape[0]} rows for {nq} queries")
        fetch = k + (ex.shape[1] if ex is not None else 0)
        per_query = max(1, fetch) * self._candidates_per_result() * 12
        batch_size = max(1, min(batch_size, max(256, SEARCH_BUFFER_BYTES // per_query)))
        parts = []
        for s in range(0, nq, batch_size):
            if fetch > 0:
                part = self._search(queries[s:s + batch_size], min(fetch, self.ntotal))
            else:
                dev, m = self.result_device, min(batch_size, nq - s)
                part = KnnResult(torch.empty(m, 0, device=dev), torch.empty(m, 0, dtype=torch.long, device=dev))
            part = _pad_topk(part.scores, part.ids, fetch)
            if self.id_map is not None:
                part.ids = torch.where(part.ids >= 0, self.id_map.to(part.ids.device)[part.ids.clamp_min(0)], part.ids)
            if ex is not None:
                part = _drop_excluded(part, ex[s:s + batch_size], k)
            parts.append(part)
        if not parts:
            return KnnResult(torch.empty(0, k), torch.empty(0, k, dtype=torch.long))
        return KnnResult(torch.cat([p.scores for p in parts]), torch.cat([p.ids for p in parts]))

    # ---------------------------------------------------------------- memory and state
    def nbytes(self, bank_vectors: Optional[torch.Tensor] = None) -> int:
        """Bytes the index holds beyond ``bank_vectors`` (a tensor it shares with the bank is not counted);
        FAISS indexes are ESTIMATED from ``ntotal`` x code size (no copy), -1 when no estimate exists."""
        raise NotImplementedError

    def _serialised(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def state_dict(self) -> dict[str, Any]:
        """The index as numbers (``torch.load(weights_only=True)`` reads it): ``backend`` (position in
        :data:`BACKENDS`), ``faiss`` (the serialised FAISS index, uint8; empty for ``torch-exact``, rebuilt
        over the vectors at restore), ``codec`` (position in :data:`IVF_CODECS`, -1 = none), ``id_map``
        (empty = none) and ``params`` (its numeric :attr:`params`, e.g. calibrated ``nprobe``)."""
        params = self.params
        return dict(empty_state(), backend=BACKENDS.index(self.backend), faiss=self._serialised(),
                    codec=IVF_CODECS.index(params["codec"]) if params.get("codec") in IVF_CODECS else -1,
                    id_map=self.id_map.cpu() if self.id_map is not None else torch.empty(0, dtype=torch.long),
                    params={k: v for k, v in params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    @classmethod
    def from_state(cls, state: dict[str, Any], vectors: torch.Tensor, device: str) -> "KnnIndex":
        """The index :meth:`state_dict` describes, over ``vectors`` (the indexed vectors as they are now:
        ``torch-exact`` searches them, IVF ``pq-bank`` re-ranks on them)."""
        params = dict(state["params"])
        if int(state["codec"]) >= 0:
            params["codec"] = IVF_CODECS[int(state["codec"])]
        index = cls._restore(state["faiss"], vectors, str(device), params)
        index.calib_recall = params.get("calib_recall")
        if state["id_map"].numel():
            index.id_map = state["id_map"].long().to(index.result_device)
        return index

    @classmethod
    def _restore(cls, serialised: torch.Tensor, vectors: torch.Tensor, device: str,
                 params: dict[str, Any]) -> "KnnIndex":
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, n={self.ntotal}, dim={self.dim}, params={self.params})"


def _own_bytes(t: Optional[torch.Tensor], bank_vectors: Optional[torch.Tensor]) -> int:
    """Bytes of ``t`` unless it is ``bank_vectors``' own storage (or absent)."""
    if t is None or (bank_vectors is not None and t.data_ptr() == bank_vectors.data_ptr()):
        return 0
    return int(t.numel() * t.element_size())


class TorchExactIndex(KnnIndex):
    """Exact search in PyTorch on the vectors' device (:func:`exact_knn_torch`). Params: ``dtype`` (the
    matmul precision, e.g. ``torch.bfloat16`` or its name; default: the vectors'), ``chunk`` (4096)."""

    backend = "torch-exact"

    def __init__(self, vectors: torch.Tensor, options: dict[str, Any]) -> None:
        super().__init__(int(vectors.shape[1]), int(vectors.shape[0]), options)
        self.vectors = vectors

    @classmethod
    def _create(cls, vectors: Array, device: str, params: dict[str, Any]) -> "TorchExactIndex":
        x, dtype = _to_tensor(vectors).to(device), params.get("dtype")
        if isinstance(dtype, str):  # e.g. "bfloat16" from a config file
            dtype = getattr(torch, dtype)
        return cls(x if dtype is None else x.to(dtype), params)

    @classmethod
    def _restore(cls, serialised: torch.Tensor, vectors: torch.Tensor, device: str,
                 params: dict[str, Any]) -> "TorchExactIndex":
        return cls._create(vectors, device, params)   # nothing saved: it searches the vectors themselves

    def _settings(self) -> dict[str, Any]:
        return {} if self.options.get("dtype") is None else {"dtype": self.vectors.dtype}

    @property
    def result_device(self) -> torch.device:
        return self.vectors.device

    def _search(self, q: Array, k: int) -> KnnResult:
        return exact_knn_torch(self.vectors, _to_tensor(q), k, chunk=int(self.options.get("chunk", 4096)))

    def nbytes(self, bank_vectors: Optional[torch.Tensor] = None) -> int:
        return _own_bytes(self.vectors, bank_vectors)


def _faiss_nbytes(ix: Any) -> int:
    """Estimated bytes of a FAISS index: flat storage ``ntotal*code_size``; IVF ``ntotal*(code_size + 8)``
    (codes + ids) plus the coarse centroids; ``IndexRefineFlat`` adds its flat copy of the vectors; HNSW
    adds ``ntotal*2M*4`` level-0 links. Ignores block padding and codebooks (within 1% of
    ``faiss.serialize_index`` on 20k x 384: docs/benchmarks.md section 3)."""
    faiss = _faiss()
    ix = faiss.downcast_index(ix)
    if isinstance(ix, faiss.IndexRefine):
        return _faiss_nbytes(ix.base_index) + _faiss_nbytes(ix.refine_index)
    if isinstance(ix, faiss.IndexIVF):
        return int(ix.ntotal * (ix.code_size + 8)) + _faiss_nbytes(ix.quantizer)
    if isinstance(ix, faiss.IndexHNSW):
        return _faiss_nbytes(ix.storage) + int(ix.ntotal * ix.hnsw.nb_neighbors(0) * 4)
    return int(ix.ntotal * getattr(ix, "code_size", 4 * ix.d))


class FaissIndex(KnnIndex):
    """A FAISS index searched on CPU. Any FAISS backend: ``num_threads`` sets ``faiss.omp_set_num_threads``
    (left at FAISS's default otherwise)."""

    def __init__(self, faiss_index: Any, options: dict[str, Any]) -> None:
        super().__init__(int(faiss_index.d), int(faiss_index.ntotal), options)
        self._index = faiss_index

    @classmethod
    def build(cls, vectors: Array, device: str = "cpu", *, ids: Optional[Array] = None, **params: Any) -> "KnnIndex":
        if params.get("num_threads"):
            _faiss().omp_set_num_threads(int(params["num_threads"]))
        return super().build(vectors, device, ids=ids, **params)

    @classmethod
    def _restore(cls, serialised: torch.Tensor, vectors: torch.Tensor, device: str,
                 params: dict[str, Any]) -> "KnnIndex":
        return cls(_faiss().deserialize_index(serialised.numpy()), params)

    def _search(self, q: Array, k: int) -> KnnResult:
        s, i = self._index.search(_to_numpy_f32(q), k)  # many queries at once: FAISS splits them over its threads
        return KnnResult(torch.from_numpy(s), torch.from_numpy(i))

    def nbytes(self, bank_vectors: Optional[torch.Tensor] = None) -> int:
        try:
            return _faiss_nbytes(self._index)
        except Exception:  # a GPU index or an unknown type: no estimate
            return -1

    def _serialised(self) -> torch.Tensor:
        return torch.from_numpy(_faiss().serialize_index(self._index))


class FaissFlatIndex(FaissIndex):
    """Exact search, FAISS ``IndexFlatIP``."""

    backend = "faiss-flat"

    @classmethod
    def _create(cls, vectors: Array, device: str, params: dict[str, Any]) -> "FaissFlatIndex":
        x = _to_numpy_f32(vectors)
        index = _faiss().IndexFlatIP(x.shape[1])
        index.add(x)
        return cls(index, params)


def _ivf_nlist(n: int, params: dict[str, Any]) -> int:
    default = min(int(round(2 * math.sqrt(n))), n // 39)
    return max(1, int(params.get("nlist") or default))


def _ivf_nprobe(nlist: int, params: dict[str, Any]) -> int:
    return max(1, min(nlist, int(params.get("nprobe") or max(8, math.ceil(nlist / 80)))))


def _ivf_codec(requested: Optional[str], dim: int, train_n: int) -> str:
    """The IVF codec: ``requested``, else PQ fast-scan when its codebooks can be trained (16 centroids per
    sub-quantiser need >= 1000 training vectors, and ``dim % 4 == 0``), else exact (flat) codes."""
    pq = dim % 4 == 0 and train_n >= 1000
    codec = requested or ("pqfs" if pq else "flat")
    if codec == "pq-bank" and not pq:
        codec = "flat"      # too few vectors to train PQ codebooks: exact codes (small anyway)
    if codec not in IVF_CODECS or (codec == "pqfs" and dim % 4):
        raise ConfigError(f"faiss-ivf codec must be one of {IVF_CODECS} ('pqfs' needs dim % 4 == 0), got {codec!r}")
    return codec


def _ivf_factory(codec: str, nlist: int, dim: int) -> str:
    return {"pqfs": f"IVF{nlist},PQ{dim // 4}x4fs,RFlat", "pq-bank": f"IVF{nlist},PQ{dim // 4}x4fs",
            "sq8": f"IVF{nlist},SQ8", "flat": f"IVF{nlist},Flat"}[codec]


def _trained_ivf(x: np.ndarray, params: dict[str, Any]) -> tuple[Any, str]:
    """An empty FAISS IVF index over ``x``'s dimension, trained on (a sample of) ``x``, and its codec. The coarse
    quantiser is FAISS's spherical k-means (``niter`` 10) on ``train_size`` (``32*nlist``) rows drawn with ``seed``."""
    faiss = _faiss()
    (n, dim), nlist, seed = x.shape, _ivf_nlist(len(x), params), int(params.get("seed", 0))
    train_n = min(n, int(params.get("train_size") or 32 * nlist))
    if not 1 <= nlist <= train_n:
        raise ConfigError(f"nlist must be in [1, {train_n}] (training vectors), got {nlist}")
    codec = _ivf_codec(params.get("codec"), dim, train_n)
    index = faiss.index_factory(dim, _ivf_factory(codec, nlist, dim), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter, ivf.cp.seed, ivf.cp.spherical = int(params.get("niter", 10)), seed, True
    ivf.cp.min_points_per_centroid, ivf.cp.max_points_per_centroid = 1, max(1, train_n // nlist + 1)
    rows = np.random.default_rng(seed).permutation(n)[:train_n] if train_n < n else None
    # A small training (k-means on <= 32*nlist rows, then the PQ codebooks) runs single-threaded, large
    # ones (1M docs: 64k rows x 2000 lists) keep the configured threads (docs/benchmarks.md section 3).
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1 if train_n * nlist < 5e7 else threads)
    try:
        index.train(x if rows is None else x[np.sort(rows)])
    finally:
        faiss.omp_set_num_threads(threads)
    return index, codec


class FaissIvfIndex(FaissIndex):
    """FAISS IVF with one of :data:`IVF_CODECS`; PQ codes are re-ranked exactly (``k_factor`` candidates per
    result): by FAISS against its own copy (``pqfs``) or here against the indexed tensor (``pq-bank``)."""

    backend = "faiss-ivf"
    _NPROBE_STEPS = 60
    _MAX_K_FACTOR = 256

    def __init__(self, faiss_index: Any, options: dict[str, Any], codec: str, k_factor: Optional[int] = None,
                 rerank: Optional[torch.Tensor] = None) -> None:
        super().__init__(faiss_index, options)
        self.codec, self.k_factor = codec, None
        self._rerank = rerank            # pq-bank: the vectors candidates are re-ranked on
        if k_factor is not None:
            self._set_k_factor(k_factor)

    def _set_k_factor(self, k_factor: int) -> None:
        """Re-ranked candidates per result: FAISS's own (``IndexRefine.k_factor``) for pqfs, ours for pq-bank."""
        self.k_factor = int(k_factor)
        if self.codec == "pqfs":
            self._index.k_factor = float(k_factor)

    @property
    def _ivf(self) -> Any:
        return _faiss().extract_index_ivf(self._index)   # the IVF part of the index (owned by it)

    @property
    def nprobe(self) -> int:
        return int(self._ivf.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._ivf.nprobe = int(value)

    @property
    def nlist(self) -> int:
        return int(self._ivf.nlist)

    def _settings(self) -> dict[str, Any]:
        nlist = self.nlist
        out: dict[str, Any] = {"nlist": nlist, "codec": self.codec,
                               "factory": _ivf_factory(self.codec, nlist, self.dim)}
        if self.k_factor is not None:
            out["k_factor"] = self.k_factor
        out["nprobe"] = self.nprobe
        if self.calib_recall is not None:
            out["calib_recall"] = self.calib_recall
        return out

    @classmethod
    def _create(cls, vectors: Array, device: str, params: dict[str, Any]) -> "FaissIvfIndex":
        """Params: ``nlist``, ``nprobe``, ``codec``, ``k_factor`` (4), ``niter``, ``train_size``, ``seed`` and
        the calibration's (:func:`make_index`)."""
        x = _to_numpy_f32(vectors)
        index, codec = _trained_ivf(x, params)
        index.add(x)
        rerank = codec in ("pqfs", "pq-bank")
        ivf = cls(index, params, codec, int(params.get("k_factor") or 4) if rerank else None,
                  _to_tensor(vectors) if codec == "pq-bank" else None)   # the indexed tensor itself: no copy
        ivf.nprobe = _ivf_nprobe(ivf.nlist, params)
        if params.get("nprobe") is None and params.get("target_recall", 0.96) is not None:
            ivf._calibrate(torch.from_numpy(x), params)
        return ivf

    def _calibrate(self, x: torch.Tensor, params: dict[str, Any]) -> None:
        """``nprobe`` by :func:`calibrate`; with PQ codes 4x more re-ranked candidates at a time (up to 256,
        unless ``k_factor`` was given) while even ``nprobe = nlist`` misses the target."""
        target, nlist = params.get("target_recall", 0.96), self.nlist
        ladder = sorted({min(nlist, max(1, round(max(1.0, nlist / 128) * 1.25**i))) for i in range(self._NPROBE_STEPS)})
        while True:
            recall = calibrate(self, x, ladder, lambda v: setattr(self, "nprobe", v), params)
            if self.k_factor is None or recall is None or recall >= target or params.get("k_factor") is not None \
                    or self.k_factor >= self._MAX_K_FACTOR:
                return
            self._set_k_factor(self.k_factor * 4)

    @classmethod
    def _restore(cls, serialised: torch.Tensor, vectors: torch.Tensor, device: str,
                 params: dict[str, Any]) -> "FaissIvfIndex":
        codec = params["codec"]
        return cls(_faiss().deserialize_index(serialised.numpy()), params, codec, params.get("k_factor"),
                   vectors if codec == "pq-bank" else None)

    def _candidates_per_result(self) -> int:
        return self.k_factor or 1

    def _search(self, q: Array, k: int) -> KnnResult:
        if self._rerank is None:
            return super()._search(q, k)
        x = _to_numpy_f32(q)
        _, i = self._index.search(x, min(self.ntotal, k * self.k_factor))
        return rerank_exact(self._rerank, torch.from_numpy(x), torch.from_numpy(i), k)

    def nbytes(self, bank_vectors: Optional[torch.Tensor] = None) -> int:
        faiss_bytes = super().nbytes(bank_vectors)
        return faiss_bytes if faiss_bytes < 0 else faiss_bytes + _own_bytes(self._rerank, bank_vectors)


class FaissHnswIndex(FaissIndex):
    """FAISS ``IndexHNSWFlat``. Params: ``M`` (32), ``ef_construction`` (``max(80, 2M)``), ``ef_search``
    (calibrated when not given; 96 with ``target_recall=None``)."""

    backend = "faiss-hnsw"
    _EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)

    def __init__(self, faiss_index: Any, options: dict[str, Any], ef_search: Any) -> None:
        super().__init__(faiss_index, options)
        self.ef_search = ef_search

    def _settings(self) -> dict[str, Any]:
        out = {"M": int(self._index.hnsw.nb_neighbors(1)), "ef_search": self.ef_search}
        return out if self.calib_recall is None else {**out, "calib_recall": self.calib_recall}

    @classmethod
    def _create(cls, vectors: Array, device: str, params: dict[str, Any]) -> "FaissHnswIndex":
        faiss, x, m = _faiss(), _to_numpy_f32(vectors), int(params.get("M", 32))
        index = faiss.IndexHNSWFlat(x.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params.get("ef_construction", max(80, 2 * m)))
        index.add(x)
        hnsw = cls(index, params, params.get("ef_search"))
        if hnsw.ef_search is None:
            hnsw.ef_search = 96
            if params.get("target_recall", 0.96) is not None:
                calibrate(hnsw, torch.from_numpy(x), cls._EF_LADDER, lambda v: setattr(hnsw, "ef_search", v), params)
        return hnsw

    @classmethod
    def _restore(cls, serialised: torch.Tensor, vectors: torch.Tensor, device: str,
                 params: dict[str, Any]) -> "FaissHnswIndex":
        return cls(_faiss().deserialize_index(serialised.numpy()), params, params["ef_search"])

    def _search(self, q: Array, k: int) -> KnnResult:
        self._index.hnsw.efSearch = max(int(self.ef_search), k)
        return super()._search(q, k)


def _gpu_id(device: str) -> int:
    return (torch.device(device).index or 0) if str(device).startswith("cuda") else 0


class FaissGpuIndex(FaissIndex):
    """A FAISS GPU index (``GpuIndexFlatIP`` or ``GpuIndexIVFFlat`` via ``index_cpu_to_gpu``). Params:
    ``gpu_index`` ("flat" or "ivf"), ``fp16`` (False), ``nlist``/``nprobe``.

    Untested in this repository's CI: the reference machine has no GPU and no FAISS GPU build.
    FAISS GPU search supports ``k <= 2048``.
    """

    backend = "faiss-gpu"

    def __init__(self, faiss_index: Any, options: dict[str, Any], resources: Any) -> None:
        super().__init__(faiss_index, options)
        self._gpu_res = resources          # kept alive with the index

    @classmethod
    def _create(cls, vectors: Array, device: str, params: dict[str, Any]) -> "FaissGpuIndex":
        faiss, x = _faiss(), _to_numpy_f32(vectors)
        dim, res = x.shape[1], faiss.StandardGpuResources()
        kind = params.get("gpu_index", "flat")
        if kind == "flat":
            cpu_index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = _ivf_nlist(len(x), params)
            cpu_index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            raise ConfigError(f"gpu_index must be 'flat' or 'ivf', got {kind!r}")
        opts = faiss.GpuClonerOptions()
        opts.useFloat16 = bool(params.get("fp16", False))
        index = faiss.index_cpu_to_gpu(res, _gpu_id(device), cpu_index, opts)
        if kind == "ivf":
            index.train(x)
            index.nprobe = _ivf_nprobe(nlist, params)
        index.add(x)
        return cls(index, params, res)

    @classmethod
    def _restore(cls, serialised: torch.Tensor, vectors: torch.Tensor, device: str,
                 params: dict[str, Any]) -> "FaissGpuIndex":
        faiss = _faiss()
        res = faiss.StandardGpuResources()
        return cls(faiss.index_cpu_to_gpu(res, _gpu_id(device), faiss.deserialize_index(serialised.numpy())),
                   params, res)

    def _serialised(self) -> torch.Tensor:
        return torch.from_numpy(_faiss().serialize_index(_faiss().index_gpu_to_cpu(self._index)))


BACKEND_CLASSES: dict[str, type[KnnIndex]] = {c.backend: c for c in (
    TorchExactIndex, FaissFlatIndex, FaissIvfIndex, FaissHnswIndex, FaissGpuIndex)}


def make_index(vectors: Array, backend: str = "auto", device: str = "cpu", *, ids: Optional[Array] = None,
               **params: Any) -> KnnIndex:
    """Index ``vectors`` [n, d] (already L2-normalised) with the backend ``backend`` names (``"auto"``:
    :func:`choose_backend` for ``n`` vectors on ``device``); ``ids`` [n] maps rows to external ids.

    Params by backend: ``torch-exact``: ``dtype``, ``chunk``; ``faiss-ivf``: ``nlist`` (default
    ``2*sqrt(n)``, at most ``n/39``), ``nprobe``, ``codec`` ("pqfs", "pq-bank", "sq8" or "flat"; default "pqfs"
    when ``d % 4 == 0`` and there are >= 1000 training vectors, else "flat"; "pq-bank" keeps only
    the PQ codes and re-ranks against ``vectors`` themselves, no copy), ``k_factor``
    (re-ranked candidates per result with "pqfs" / "pq-bank"; 4, raised 4x at a time by the calibration while
    even ``nprobe = nlist`` misses the target), ``niter`` (10, k-means iterations), ``train_size``
    (``32*nlist``), ``seed``; ``faiss-hnsw``: ``M`` (32), ``ef_construction`` (``max(80, 2M)``),
    ``ef_search``; ``faiss-gpu``: ``gpu_index`` ("flat" or "ivf"), ``fp16`` (False),
    ``nlist``/``nprobe``. Any FAISS backend: ``num_threads`` sets ``faiss.omp_set_num_threads``
    (left at FAISS's default otherwise).

    Recall calibration (:func:`calibrate`; ``faiss-ivf`` without ``nprobe``, ``faiss-hnsw`` without
    ``ef_search``): params ``target_recall`` (0.96), ``calib_k`` (16), ``calib_queries`` (1000), ``seed``.
    ``target_recall=None`` skips it: ``nprobe = max(8, ceil(nlist/80))``, ``ef_search = 96``.
    """
    name = choose_backend(int(vectors.shape[0]), device, backend)
    return BACKEND_CLASSES[name].build(vectors, str(device), ids=ids, **params)


def restore_index(state: dict[str, Any], vectors: torch.Tensor, device: str) -> Optional[KnnIndex]:
    """The index a :meth:`KnnIndex.state_dict` (or :func:`empty_state`: ``None``) describes, over ``vectors``."""
    pos = int(state["backend"])
    return None if pos < 0 else BACKEND_CLASSES[BACKENDS[pos]].from_state(state, vectors, device)


def _np(x: Array) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def recall_at_k(approx_ids: Array, exact_ids: Array) -> float:
    """Mean over rows of |approx ∩ exact| / |exact| (``-1`` padding ignored; rows with no exact ids skipped)."""
    a, e = _np(approx_ids).astype(np.int64), _np(exact_ids).astype(np.int64)
    if a.shape[0] != e.shape[0]:
        raise ValueError(f"row counts differ: {a.shape[0]} vs {e.shape[0]}")
    ev = e >= 0
    found = ((e[:, :, None] == a[:, None, :]) & (a[:, None, :] >= 0)).any(2) & ev
    denom = ev.sum(1)
    ok = denom > 0
    return float((found.sum(1)[ok] / denom[ok]).mean()) if ok.any() else float("nan")


def kth_neighbour_scores(vecs: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """Exact score (inner product) of the ``k``-th nearest other row of ``vecs`` for each corpus row in ``q``
    (the row itself excluded), float32 on CPU; the threshold of :func:`tie_aware_recall`."""
    q = torch.as_tensor(q).long().cpu()
    exact = exact_knn_torch(vecs, vecs[q.to(vecs.device)], k + 1)
    scores, own = exact.scores.cpu(), (exact.ids.cpu() == q[:, None]).any(1)
    return torch.where(own, scores[:, k], scores[:, k - 1])  # the k-th after self, or the k-th (self tied out)


def tie_aware_recall(vecs: torch.Tensor, q: Array, approx_ids: Array, k: int,
                     kth: Optional[torch.Tensor] = None) -> float:
    """recall@k of ``approx_ids`` (neighbours of corpus rows ``q``, self excluded) against exact search,
    counting a returned neighbour as correct when it is at least as similar as the exact k-th one
    (within 1e-5), so ties among equal scores -- duplicate documents -- do not count as misses.
    ``kth``: :func:`kth_neighbour_scores` of ``q`` when already computed (e.g. across a calibration ladder)."""
    q = torch.as_tensor(q).long().cpu()
    approx_ids = _to_tensor(approx_ids).long().cpu()
    if kth is None:
        kth = kth_neighbour_scores(vecs, q, k)
    qv = vecs[q.to(vecs.device)]
    a = approx_ids.clamp_min(0).to(vecs.device)
    sims = (vecs[a] * qv[:, None, :]).sum(-1).float().cpu()
    hit = (approx_ids >= 0) & (approx_ids != q[:, None]) & (sims >= kth[:, None] - 1e-5)
    return float(hit.sum(1).clamp(max=k).float().mean() / k)


def label_homophily(ids: Array, labels: Array, self_ids: Optional[Array] = None) -> float:
    """Share of kNN edges ``i -> ids[i, j]`` joining two docs of the same class.

    Query i's own doc is ``self_ids[i]`` (default: i, i.e. the queries are the corpus). Padding
    (``-1`` ids) and edges touching a doc with unknown label (``-1``) are ignored; NaN if no edge is left.
    """
    nb, lab = _np(ids).astype(np.int64), _np(labels).astype(np.int64)
    src = np.arange(nb.shape[0]) if self_ids is None else _np(self_ids).astype(np.int64)
    ls = np.broadcast_to(lab[src][:, None], nb.shape)
    ln = np.where(nb >= 0, lab[np.clip(nb, 0, None)], -1)
    valid = (nb >= 0) & (ls >= 0) & (ln >= 0)
    return float((ls == ln)[valid].mean()) if valid.any() else float("nan")
