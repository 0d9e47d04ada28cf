"""kNN search over the embedding bank: exact PyTorch search and FAISS indexes (flat, IVF, HNSW, GPU).

All vectors are assumed L2-normalised, so the score is the inner product (cosine similarity).
Results are returned as :class:`KnnResult` with ``ids == -1`` / ``scores == -inf`` marking padding
(fewer than ``k`` neighbours found or left after exclusions).

Backends (see :func:`choose_backend`):

``torch-exact``  chunked matmul + top-k in PyTorch on the tensors' device (any dtype)
``faiss-flat``   exact ``IndexFlatIP`` (small CPU corpora)
``faiss-ivf``    ``IndexIVFFlat`` (inner product); the coarse centroids are trained with a
                 spherical k-means in PyTorch and documents/queries are assigned to lists with a
                 PyTorch matmul (``add_core`` / ``search_preassigned``): on CPU, PyTorch's GEMM is
                 several times faster than the one FAISS wheels use, and the result is the same
                 index. Large query batches (the full graph) are scanned list by list with one
                 matmul per list (same candidates as FAISS, ~2x faster on a 100k corpus here)
``faiss-hnsw``   ``IndexHNSWFlat`` (inner product, M=32)
``faiss-gpu``    a FAISS GPU index (needs a FAISS GPU build)
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from gloss_ray.errors import ConfigError

Array = Union[torch.Tensor, np.ndarray]

BACKENDS: tuple[str, ...] = ("torch-exact", "faiss-flat", "faiss-ivf", "faiss-hnsw", "faiss-gpu")
FLAT_MAX_N = 50_000  # auto: exact faiss-flat up to this corpus size on CPU, faiss-ivf above
SEARCH_BATCH = 65_536  # queries per FAISS/torch search call
LIST_MAJOR_MIN_QUERIES = 16  # faiss-ivf: list-by-list matmul search when >= this many queries per list
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
    """The ``faiss`` module, or ``None`` when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_gpu_available() -> bool:
    """True when a FAISS GPU build is installed and sees at least one GPU."""
    faiss = _faiss()
    return bool(faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)


def choose_backend(n: int, device: str, requested: str = "auto") -> str:
    """Pick the kNN backend for ``n`` vectors living on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    ``requested`` other than ``"auto"`` is validated and returned. Auto: on CUDA ``faiss-gpu`` when a
    FAISS GPU build exists, else ``torch-exact``; on CPU ``faiss-flat`` for ``n <= 50_000``, else
    ``faiss-ivf`` (``torch-exact`` when FAISS is not installed).
    """
    faiss = _faiss()
    if requested != "auto":
        if requested not in BACKENDS:
            raise ConfigError(f"unknown kNN backend {requested!r}; choose one of: auto, {', '.join(BACKENDS)}")
        if requested.startswith("faiss") and faiss is None:
            raise ConfigError(f"kNN backend {requested!r} needs FAISS: pip install faiss-cpu (or faiss-gpu-cu12)")
        if requested == "faiss-gpu" and not faiss_gpu_available():
            raise ConfigError("kNN backend 'faiss-gpu' needs a FAISS GPU build and a visible GPU "
                              "(pip install gloss-ray[gpu]); use 'torch-exact' on CUDA instead")
        return requested
    if str(device).startswith("cuda"):
        return "faiss-gpu" if faiss_gpu_available() else "torch-exact"
    if faiss is None:
        return "torch-exact"
    return "faiss-flat" if n <= FLAT_MAX_N else "faiss-ivf"


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


def spherical_kmeans(x: torch.Tensor, num_clusters: int, *, niter: int = 10, seed: int = 0,
                     chunk: int = 65_536) -> torch.Tensor:
    """Cosine k-means on unit rows of ``x`` (float32): returns unit centroids [num_clusters, d].

    Seeded with random distinct rows; an emptied cluster keeps its previous centroid.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    cent = x[torch.randperm(x.shape[0], generator=g)[:num_clusters].to(x.device)].clone()
    for _ in range(niter):
        assign = coarse_assign(x, cent, 1, chunk=chunk)[1][:, 0]
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_clusters)
        cent = torch.where((counts > 0).unsqueeze(1), torch.nn.functional.normalize(sums, dim=1), cent)
    return cent


def coarse_assign(x: torch.Tensor, centroids: torch.Tensor, nprobe: int, *,
                  chunk: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``nprobe`` centroids (scores, ids) for each row of ``x``, chunked."""
    vals, idx = [], []
    for s in range(0, x.shape[0], chunk):
        v, i = (x[s:s + chunk] @ centroids.T).topk(nprobe, dim=1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


class KnnIndex:
    """A kNN index over a fixed set of unit vectors; build with :meth:`KnnIndex.build`.

    ``ids`` (optional, at build) maps index rows to external ids (e.g. bank rows of the labelled
    docs only); results are reported in those ids. Results live on the index's device for
    ``torch-exact`` and on CPU for FAISS backends.
    """

    backend: str
    build_seconds: float
    params: dict[str, Any]

    def __init__(self, backend: str, dim: int, ntotal: int, device: str, params: dict[str, Any]) -> None:
        self.backend, self.dim, self.ntotal, self.device, self.params = backend, dim, ntotal, device, params
        self.build_seconds = 0.0
        self.id_map: Optional[torch.Tensor] = None
        self._index: Any = None  # FAISS index
        self._bank: Optional[torch.Tensor] = None  # torch-exact
        self._centroids: Optional[torch.Tensor] = None  # faiss-ivf
        self._quantizer: Any = None  # faiss-ivf coarse quantizer (the IVF index does not own it)
        self._gpu_res: Any = None  # faiss-gpu resources (kept alive with the index)

    @classmethod
    def build(cls, vectors: Array, backend: str = "auto", device: str = "cpu", *,
              ids: Optional[Array] = None, **params: Any) -> "KnnIndex":
        """Index ``vectors`` [n, d] (already L2-normalised).

        Params by backend: ``torch-exact``: ``dtype``, ``chunk``; ``faiss-ivf``: ``nlist``
        (default ``4*sqrt(n)``, at most ``n/39``), ``nprobe``, ``niter`` (10), ``train_size`` (``32*nlist``),
        ``seed``; ``faiss-hnsw``: ``M`` (32), ``ef_construction`` (``max(80, 2M)``), ``ef_search``; ``faiss-gpu``:
        ``gpu_index`` ("flat" or "ivf"), ``fp16`` (False), ``nlist``/``nprobe``. Any FAISS backend:
        ``num_threads`` sets ``faiss.omp_set_num_threads`` (left at FAISS's default otherwise).

        Recall calibration (``faiss-ivf`` without ``nprobe``, ``faiss-hnsw`` without ``ef_search``):
        the smallest value on a ladder whose recall@``calib_k`` (16) against exact search, measured on
        ``calib_queries`` (1000) random corpus docs (self excluded), reaches ``target_recall`` (0.96,
        a margin over 0.95 for the sampling error). The estimate is kept in ``params["calib_recall"]``.
        ``target_recall=None`` skips calibration: ``nprobe = max(8, ceil(nlist/80))``, ``ef_search = 96``.
        """
        n, d = int(vectors.shape[0]), int(vectors.shape[1])
        if n == 0:
            raise ValueError("cannot build a kNN index over 0 vectors")
        name = choose_backend(n, device, backend)
        start = time.perf_counter()
        self = cls(name, d, n, str(device), dict(params))
        if ids is not None:
            self.id_map = _to_tensor(ids).long().cpu()
            if self.id_map.shape != (n,):
                raise ValueError(f"ids must have shape ({n},), got {tuple(self.id_map.shape)}")
        if name.startswith("faiss") and params.get("num_threads"):
            _faiss().omp_set_num_threads(int(params["num_threads"]))
        id_map, self.id_map = self.id_map, None  # calibration searches in row positions
        getattr(self, "_build_" + name.replace("-", "_"))(vectors)
        self.id_map = id_map.to(self._bank.device) if id_map is not None and self._bank is not None else id_map
        self.build_seconds = time.perf_counter() - start
        return self

    # ---------------------------------------------------------------- builders
    def _build_torch_exact(self, vectors: Array) -> None:
        self._bank = _to_tensor(vectors).to(self.device)
        dtype = self.params.get("dtype")
        if isinstance(dtype, str):  # e.g. "bfloat16" from a config file
            dtype = self.params["dtype"] = getattr(torch, dtype)
        if dtype is not None:
            self._bank = self._bank.to(dtype)

    def _build_faiss_flat(self, vectors: Array) -> None:
        self._index = _faiss().IndexFlatIP(self.dim)
        self._index.add(_to_numpy_f32(vectors))

    def _ivf_nlist(self) -> int:
        default = min(int(round(4 * math.sqrt(self.ntotal))), self.ntotal // 39)
        return max(1, int(self.params.get("nlist") or default))

    def _ivf_nprobe(self, nlist: int) -> int:
        return max(1, min(nlist, int(self.params.get("nprobe") or max(8, math.ceil(nlist / 80)))))

    def _calibrate(self, x: torch.Tensor, name: str, ladder: list[int], apply: Any) -> int:
        """Smallest ``ladder`` value (passed to ``apply``) reaching ``target_recall`` on sampled queries."""
        target = self.params.get("target_recall", 0.96)
        k = min(int(self.params.get("calib_k", 16)), self.ntotal - 1)
        if k < 1:
            return ladder[-1]
        nq = min(int(self.params.get("calib_queries", 1000)), self.ntotal)
        g = torch.Generator().manual_seed(int(self.params.get("seed", 0)) + 1)
        rows = torch.randperm(self.ntotal, generator=g)[:nq]
        exact = _drop_excluded(exact_knn_torch(x, x[rows], k + 1), rows.unsqueeze(1), k)
        rec = float("nan")
        for value in ladder:
            apply(value)
            rec = recall_at_k(self.search(x[rows], k, exclude_ids=rows).ids, exact.ids)
            if rec >= target:
                break
        self.params.update({name: value, "calib_recall": rec})
        return value

    def _build_faiss_ivf(self, vectors: Array) -> None:
        faiss = _faiss()
        x = _to_numpy_f32(vectors)
        xt = torch.from_numpy(x)
        nlist = self._ivf_nlist()
        g = torch.Generator().manual_seed(int(self.params.get("seed", 0)))
        train_n = min(self.ntotal, int(self.params.get("train_size") or 32 * nlist))
        if not 1 <= nlist <= train_n:
            raise ConfigError(f"nlist must be in [1, {train_n}] (training vectors), got {nlist}")
        sample = xt[torch.randperm(self.ntotal, generator=g)[:train_n]]
        self._centroids = spherical_kmeans(sample, nlist, niter=int(self.params.get("niter", 10)),
                                           seed=int(self.params.get("seed", 0)))
        quantizer = faiss.IndexFlatIP(self.dim)
        quantizer.add(np.ascontiguousarray(self._centroids.numpy()))
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        assign = np.ascontiguousarray(coarse_assign(xt, self._centroids, 1)[1][:, 0].numpy().astype(np.int64))
        index.add_core(self.ntotal, faiss.swig_ptr(x), None, faiss.swig_ptr(assign))
        self._quantizer = quantizer
        self._index = index
        self.params["nlist"] = nlist
        index.nprobe = self._ivf_nprobe(nlist)
        if self.params.get("nprobe") is None and self.params.get("target_recall", 0.96) is not None:
            ladder = sorted({min(nlist, max(1, round(max(1.0, nlist / 128) * 1.25**i))) for i in range(60)})
            self._calibrate(xt, "nprobe", ladder, lambda v: setattr(index, "nprobe", v))
        self.params["nprobe"] = index.nprobe

    def _build_faiss_hnsw(self, vectors: Array) -> None:
        faiss = _faiss()
        m = int(self.params.get("M", 32))
        index = faiss.IndexHNSWFlat(self.dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(self.params.get("ef_construction", max(80, 2 * m)))
        x = _to_numpy_f32(vectors)
        index.add(x)
        self._index = index
        self.params["M"] = m
        if self.params.get("ef_search") is None:
            self.params["ef_search"] = 96
            if self.params.get("target_recall", 0.96) is not None:
                ladder = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
                self._calibrate(torch.from_numpy(x), "ef_search", ladder,
                                lambda v: self.params.__setitem__("ef_search", v))

    def _build_faiss_gpu(self, vectors: Array) -> None:
        """FAISS GPU index (``GpuIndexFlatIP`` or ``GpuIndexIVFFlat`` via ``index_cpu_to_gpu``).

        Untested in this repository's CI: the reference machine has no GPU and no FAISS GPU build.
        FAISS GPU search supports ``k <= 2048``.
        """
        faiss = _faiss()
        x = _to_numpy_f32(vectors)
        dev = (torch.device(self.device).index or 0) if str(self.device).startswith("cuda") else 0
        self._gpu_res = faiss.StandardGpuResources()
        kind = self.params.get("gpu_index", "flat")
        if kind == "flat":
            cpu_index = faiss.IndexFlatIP(self.dim)
        elif kind == "ivf":
            nlist = self._ivf_nlist()
            cpu_index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            raise ConfigError(f"gpu_index must be 'flat' or 'ivf', got {kind!r}")
        opts = faiss.GpuClonerOptions()
        opts.useFloat16 = bool(self.params.get("fp16", False))
        index = faiss.index_cpu_to_gpu(self._gpu_res, dev, cpu_index, opts)
        if kind == "ivf":
            index.train(x)
            index.nprobe = self._ivf_nprobe(nlist)
        index.add(x)
        self._index = index

    # ---------------------------------------------------------------- search
    def _search_block(self, q: Array, k: int) -> KnnResult:
        kk = min(k, self.ntotal)
        if self.backend == "torch-exact":
            assert self._bank is not None
            return exact_knn_torch(self._bank, _to_tensor(q), kk, chunk=int(self.params.get("chunk", 4096)),
                                   dtype=self.params.get("dtype"))
        x = _to_numpy_f32(q)
        if self.backend == "faiss-ivf":
            assert self._centroids is not None
            dq, iq = coarse_assign(torch.from_numpy(x), self._centroids, self._index.nprobe)
            if x.shape[0] * self._index.nprobe >= LIST_MAJOR_MIN_QUERIES * self._index.nlist:
                return self._ivf_search_list_major(torch.from_numpy(x), iq, kk)
            s, i = self._index.search_preassigned(x, kk, iq.numpy(), dq.numpy())
        else:
            if self.backend == "faiss-hnsw":
                self._index.hnsw.efSearch = max(int(self.params["ef_search"]), kk)
            s, i = self._index.search(x, kk)
        return KnnResult(torch.from_numpy(s), torch.from_numpy(i))

    def _ivf_search_list_major(self, q: torch.Tensor, probes: torch.Tensor, k: int) -> KnnResult:
        """IVF search for many queries at once, list by list: same candidates as FAISS's own scan.

        FAISS scans, for each query, each probed list: memory-bound, every list is re-read once per
        query. Here all queries probing a list are gathered and scored with one matmul against the
        list's vectors (read in place from the inverted lists), keeping each (query, probe) pair's
        top-k; a final top-k merges the ``nprobe`` partial lists of each query. Lists are split over
        ``torch.get_num_threads()`` Python threads, each running PyTorch single-threaded: the
        process-wide PyTorch thread count is set to 1 for the duration of the scan.
        """
        faiss, invlists = _faiss(), self._index.invlists
        nq, nprobe = probes.shape
        cand_s = torch.full((nq, nprobe, k), float("-inf"))
        cand_i = torch.full((nq, nprobe, k), -1, dtype=torch.long)
        flat = probes.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        ends = torch.cumsum(torch.bincount(flat, minlength=self._index.nlist), 0).tolist()
        starts = [0] + ends[:-1]
        qid, slot = order // nprobe, order % nprobe

        def scan(lists: range) -> None:
            for lst in lists:
                size = invlists.list_size(lst)
                if ends[lst] == starts[lst] or size == 0:
                    continue
                codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * self.dim * 4)
                vecs = torch.from_numpy(codes.view(np.float32).reshape(size, self.dim))
                ids = torch.from_numpy(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
                qs, sl = qid[starts[lst]:ends[lst]], slot[starts[lst]:ends[lst]]
                kk = min(k, size)
                v, i = (q[qs] @ vecs.T).topk(kk, dim=1)
                cand_s[qs, sl, :kk] = v  # each (query, probe) pair belongs to one list: no write races
                cand_i[qs, sl, :kk] = ids[i]

        # Many small matmuls: one PyTorch thread each, lists split over a pool of Python threads.
        workers = max(1, torch.get_num_threads())
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            nlist = self._index.nlist
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(scan, [range(w, nlist, workers) for w in range(workers)]))
        finally:
            torch.set_num_threads(saved)
        v, j = cand_s.view(nq, -1).topk(k, dim=1)
        return KnnResult(v, cand_i.view(nq, -1).gather(1, j))

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
        parts = []
        for s in range(0, nq, batch_size):
            part = self._search_block(queries[s:s + batch_size], fetch) if fetch > 0 else None
            if part is None:
                dev = self._bank.device if self._bank is not None else torch.device("cpu")
                m = min(batch_size, nq - s)
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

    def __repr__(self) -> str:
        return f"KnnIndex(backend={self.backend!r}, n={self.ntotal}, dim={self.dim}, params={self.params})"


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
