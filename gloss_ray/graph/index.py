"""kNN search over the embedding bank: exact PyTorch search and FAISS indexes (flat, IVF, HNSW, GPU).

All vectors are assumed L2-normalised, so the score is the inner product (cosine similarity).
Results are returned as :class:`KnnResult` with ``ids == -1`` / ``scores == -inf`` marking padding
(fewer than ``k`` neighbours found or left after exclusions).

Backends (see :func:`choose_backend`):

``torch-exact``  chunked matmul + top-k in PyTorch on the tensors' device (any dtype)
``faiss-flat``   exact ``IndexFlatIP`` (small CPU corpora)
``faiss-ivf``    FAISS IVF (inner product), built with ``faiss.index_factory``: by default
                 ``IVF{nlist},PQ{d/4}x4fs,RFlat`` -- 4-bit PQ fast-scan codes in the inverted lists,
                 then the ``k_factor * k`` best candidates re-ranked exactly (``IndexRefineFlat``);
                 ``codec="sq8"`` / ``"flat"`` give ``IVF{nlist},SQ8`` / ``IVF{nlist},Flat``. The
                 coarse quantiser is FAISS's own (spherical) k-means; ``nprobe`` is calibrated
                 for recall (see :meth:`KnnIndex.build`)
``faiss-hnsw``   ``IndexHNSWFlat`` (inner product, M=32)
``faiss-gpu``    a FAISS GPU index (needs a FAISS GPU build)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from gloss_ray.errors import ConfigError

Array = Union[torch.Tensor, np.ndarray]

BACKENDS: tuple[str, ...] = ("torch-exact", "faiss-flat", "faiss-ivf", "faiss-hnsw", "faiss-gpu")
# auto on CPU: exact faiss-flat up to this corpus size, faiss-ivf above. Measured full-graph times on the
# 2-core reference CPU (docs/benchmarks.md section 3, issue 13): faiss-ivf overtakes exact search between
# 20k (a tie) and 50k docs and is 3-9x faster at 50k; of the exact backends faiss-flat was the faster in
# 6 of 9 paired runs (1.4-1.5x in the quietest), torch-exact in 3 (the choice without FAISS and on CUDA).
EXACT_MAX_N = 20_000
SEARCH_BATCH = 65_536  # queries per FAISS/torch search call, at most
# A FAISS search call holds about (queries x fetched x re-ranked candidates per result x 12 bytes) of
# candidate scores and ids: with the IVF-PQ index's k_factor at 256 (real embeddings can need it), 65k
# queries took ~9 GB per worker, so calls are cut to keep that under this budget.
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


class KnnIndex:
    """A kNN index over a fixed set of unit vectors; build with :meth:`KnnIndex.build`.

    ``ids`` (optional, at build) maps index rows to external ids (e.g. bank rows of the labelled
    docs only); results are reported in those ids. Results live on the index's device for
    ``torch-exact`` and on CPU for FAISS backends. ``calib_rows`` are the row positions the recall
    calibration searched (``None`` without calibration): measure recall on other rows
    (:func:`held_out_queries`).
    """

    backend: str
    build_seconds: float
    params: dict[str, Any]

    def __init__(self, backend: str, dim: int, ntotal: int, device: str, params: dict[str, Any]) -> None:
        self.backend, self.dim, self.ntotal, self.device, self.params = backend, dim, ntotal, device, params
        self.build_seconds = 0.0
        self.id_map: Optional[torch.Tensor] = None
        self.calib_rows: Optional[torch.Tensor] = None
        self._index: Any = None  # FAISS index
        self._bank: Optional[torch.Tensor] = None  # torch-exact
        self._ivf: Any = None  # faiss-ivf: the IVF part of ``_index`` (owned by it; holds ``nprobe``)
        self._gpu_res: Any = None  # faiss-gpu resources (kept alive with the index)
        self._rerank: Optional[torch.Tensor] = None  # faiss-ivf "pq-bank": the vectors candidates are re-ranked on

    @classmethod
    def build(cls, vectors: Array, backend: str = "auto", device: str = "cpu", *,
              ids: Optional[Array] = None, **params: Any) -> "KnnIndex":
        """Index ``vectors`` [n, d] (already L2-normalised).

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

        Recall calibration (``faiss-ivf`` without ``nprobe``, ``faiss-hnsw`` without ``ef_search``):
        the smallest value on a ladder whose recall@``calib_k`` (16) against exact search -- tie-aware
        (:func:`tie_aware_recall`: a neighbour as similar as the exact k-th one is a hit, so exact
        duplicates are not misses) -- measured on
        ``calib_queries`` (1000, at most half the corpus) random corpus docs (self excluded;
        :func:`calibration_rows`, kept in ``calib_rows``), reaches ``target_recall`` (0.96, a margin over
        0.95 for the sampling error). The estimate is kept in ``params["calib_recall"]``; it is measured
        on the tuning queries, so an independent recall figure needs other queries (:func:`held_out_queries`).
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
        default = min(int(round(2 * math.sqrt(self.ntotal))), self.ntotal // 39)
        return max(1, int(self.params.get("nlist") or default))

    def _ivf_nprobe(self, nlist: int) -> int:
        return max(1, min(nlist, int(self.params.get("nprobe") or max(8, math.ceil(nlist / 80)))))

    def _calibrate(self, x: torch.Tensor, name: str, ladder: list[int], apply: Any) -> int:
        """Smallest ``ladder`` value (passed to ``apply``) whose :func:`tie_aware_recall` on sampled queries
        reaches ``target_recall``."""
        target = self.params.get("target_recall", 0.96)
        k = min(int(self.params.get("calib_k", 16)), self.ntotal - 1)
        if k < 1:
            return ladder[-1]
        rows = calibration_rows(self.ntotal, int(self.params.get("calib_queries", 1000)),
                                int(self.params.get("seed", 0)))
        self.calib_rows = rows
        kth = kth_neighbour_scores(x, rows, k)
        rec = float("nan")
        for value in ladder:
            apply(value)
            rec = tie_aware_recall(x, rows, self.search(x[rows], k, exclude_ids=rows).ids, k, kth=kth)
            if rec >= target:
                break
        self.params.update({name: value, "calib_recall": rec})
        return value

    def _build_faiss_ivf(self, vectors: Array) -> None:
        faiss = _faiss()
        x = _to_numpy_f32(vectors)
        nlist = self._ivf_nlist()
        seed = int(self.params.get("seed", 0))
        train_n = min(self.ntotal, int(self.params.get("train_size") or 32 * nlist))
        if not 1 <= nlist <= train_n:
            raise ConfigError(f"nlist must be in [1, {train_n}] (training vectors), got {nlist}")
        # PQ codebooks need training data (16 centroids per sub-quantiser): tiny corpora use the flat codec
        pq = self.dim % 4 == 0 and train_n >= 1000
        codec = self.params.get("codec") or ("pqfs" if pq else "flat")
        if codec == "pq-bank" and not pq:
            codec = "flat"      # too few vectors to train PQ codebooks: exact codes (small anyway)
        if codec not in IVF_CODECS or (codec == "pqfs" and self.dim % 4):
            raise ConfigError(f"faiss-ivf codec must be one of {IVF_CODECS} ('pqfs' needs dim % 4 == 0), got {codec!r}")
        key = {"pqfs": f"IVF{nlist},PQ{self.dim // 4}x4fs,RFlat", "pq-bank": f"IVF{nlist},PQ{self.dim // 4}x4fs",
               "sq8": f"IVF{nlist},SQ8", "flat": f"IVF{nlist},Flat"}[codec]
        index = faiss.index_factory(self.dim, key, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter, ivf.cp.seed, ivf.cp.spherical = int(self.params.get("niter", 10)), seed, True
        ivf.cp.min_points_per_centroid, ivf.cp.max_points_per_centroid = 1, max(1, train_n // nlist + 1)
        rows = np.random.default_rng(seed).permutation(self.ntotal)[:train_n] if train_n < self.ntotal else None
        # A small training (k-means on <= 32*nlist rows, then the PQ codebooks) runs single-threaded: on the
        # shared 2-core reference CPU the whole 10k-doc build took 12.8-21.5 s with two-threaded training and
        # 0.8-1.1 s with one thread (docs/benchmarks.md section 3). Large ones (1M docs: 64k rows x 2000
        # lists) keep the configured threads.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1 if train_n * nlist < 5e7 else threads)
        try:
            index.train(x if rows is None else x[np.sort(rows)])
        finally:
            faiss.omp_set_num_threads(threads)
        index.add(x)
        self._index, self._ivf = index, ivf
        self.params.update({"nlist": nlist, "codec": codec, "factory": key})
        rerank = codec in ("pqfs", "pq-bank")
        fixed_k_factor = self.params.get("k_factor") is not None
        if rerank:
            self._set_k_factor(int(self.params.get("k_factor") or 4))
        if codec == "pq-bank":
            self._rerank = _to_tensor(vectors)        # the indexed tensor itself (float32, CPU): no copy
        ivf.nprobe = self._ivf_nprobe(nlist)
        target = self.params.get("target_recall", 0.96)
        if self.params.get("nprobe") is None and target is not None:
            ladder = sorted({min(nlist, max(1, round(max(1.0, nlist / 128) * 1.25**i))) for i in range(60)})
            while True:  # PQ: 4x more re-ranked candidates when even nprobe = nlist misses the target
                self._calibrate(torch.from_numpy(x), "nprobe", ladder, lambda v: setattr(ivf, "nprobe", v))
                if not rerank or self.params.get("calib_recall", target) >= target or self.params["k_factor"] >= 256 \
                        or fixed_k_factor:
                    break
                self._set_k_factor(self.params["k_factor"] * 4)
        self.params["nprobe"] = ivf.nprobe

    def _set_k_factor(self, k_factor: int) -> None:
        """Re-ranked candidates per result: FAISS's own (``IndexRefine.k_factor``) for pqfs, ours for pq-bank."""
        self.params["k_factor"] = int(k_factor)
        if self.params.get("codec") == "pqfs":
            self._index.k_factor = float(k_factor)

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
        if self.backend == "faiss-hnsw":
            self._index.hnsw.efSearch = max(int(self.params["ef_search"]), kk)
        if self._rerank is not None:
            _, i = self._index.search(x, min(self.ntotal, kk * self.params["k_factor"]))
            return rerank_exact(self._rerank, torch.from_numpy(x), torch.from_numpy(i), kk)
        s, i = self._index.search(x, kk)  # many queries at once: FAISS splits them over its OpenMP threads
        return KnnResult(torch.from_numpy(s), torch.from_numpy(i))

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
        per_query = max(1, fetch) * int(self.params.get("k_factor") or 1) * 12
        batch_size = max(1, min(batch_size, max(256, SEARCH_BUFFER_BYTES // per_query)))
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
