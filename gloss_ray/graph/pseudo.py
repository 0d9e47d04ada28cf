"""Pseudo-labels for the whole corpus by label spreading over the global kNN graph (sparse, scales to 1M docs).

Graph, following Zhou et al. (2004) "Learning with local and global consistency" as used for
deep semi-supervised learning by Iscen et al. (2019):

    w_ij = max(s_ij, 0)^3                      (default: s_ij = cosine of doc i and its neighbour j)
    w_ij = exp((s_ij - 1) / sigma^2)           (sigma given: the Gaussian kernel on unit vectors,
                                                since ||x_i - x_j||^2 = 2 - 2 s_ij)
    A = W + W^T,  S = D^-1/2 A D^-1/2          (symmetrise, normalise; no self loops)
    F <- alpha S F + (1 - alpha) Y,  F_L <- Y_L (known labels clamped), ``iters`` times from F = Y

Prediction is ``argmax F``; confidence is the winning share of the row's mass (``max F / sum F``).
Docs that no labelled doc reaches within ``iters`` hops get label -1 and confidence 0.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import scipy.sparse as sp
import torch

Array = Union[np.ndarray, torch.Tensor]


class LabelSpreading:
    """The normalised kNN graph ``S`` above, built once from ``ids``/``scores`` ([n, k], -1 padding), so that
    labels can be spread over it repeatedly (:meth:`spread`) -- e.g. once per training step from the
    known labels minus those of the step's batch -- at the cost of ``iters`` sparse products each.

    ``S`` is a SciPy CSR matrix on CPU and a sparse CSR tensor on a GPU ``device``. One spread costs
    ``iters`` products of ``S`` (about ``2 k n`` non-zeros) with an ``n x C`` matrix (timings:
    docs/benchmarks.md, section 3).
    """

    def __init__(self, ids: Array, scores: Array, sigma: Optional[float] = None,
                 device: Union[str, torch.device] = "cpu") -> None:
        ids, scores = _numpy(ids, np.int64), _numpy(scores, np.float32)
        if ids.shape != scores.shape or ids.ndim != 2:
            raise ValueError(f"ids {ids.shape} and scores {scores.shape} must both be [n, k]")
        n = ids.shape[0]
        rows = np.repeat(np.arange(n, dtype=np.int64), ids.shape[1])
        cols, s = ids.ravel(), scores.ravel()
        ok = (cols >= 0) & (cols != rows) & np.isfinite(s)
        rows, cols, s = rows[ok], cols[ok], s[ok]
        w = np.exp((s - 1.0) / np.float32(sigma) ** 2) if sigma is not None else np.maximum(s, 0.0) ** 3
        a = sp.csr_array((w.astype(np.float32), (rows, cols)), shape=(n, n))
        a = (a + a.T).tocsr()
        deg = np.asarray(a.sum(axis=1)).ravel()
        dinv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0).astype(np.float32)
        norm = (sp.diags_array(dinv) @ a @ sp.diags_array(dinv)).tocsr()
        self.n, self.device = n, torch.device(device)
        self._csr: Optional[sp.csr_array] = None
        self.matrix: Optional[torch.Tensor] = None
        if self.device.type == "cpu":
            self._csr = norm  # SciPy's sparse product is several times faster on CPU than torch's
        else:
            import warnings

            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self.matrix = torch.sparse_csr_tensor(torch.from_numpy(norm.indptr.astype(np.int64)),
                                                      torch.from_numpy(norm.indices.astype(np.int64)),
                                                      torch.from_numpy(norm.data.astype(np.float32)), (n, n),
                                                      device=self.device)

    def _product(self, f: torch.Tensor) -> torch.Tensor:
        if self._csr is not None:
            return torch.from_numpy(np.asarray(self._csr @ f.numpy(), dtype=np.float32))
        return self.matrix @ f

    def spread(self, labels: Array, num_classes: int, alpha: float = 0.99,
               iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
        """Spread ``labels`` ([n], -1 = unknown): ``(pred [n] int64, confidence [n] float32)`` on ``device``;
        known docs keep their label with confidence 1, docs no known label reaches get -1 and 0."""
        labels = torch.as_tensor(labels).long().to(self.device)
        if labels.shape != (self.n,):
            raise ValueError(f"labels must have shape ({self.n},), got {tuple(labels.shape)}")
        if self.n and (int(labels.max()) >= num_classes or int(labels.min()) < -1):
            raise ValueError(f"labels must be in [-1, {num_classes})")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        known = labels >= 0
        y = torch.zeros(self.n, num_classes, dtype=torch.float32, device=self.device)
        y[known, labels[known]] = 1.0
        f = y.clone()
        for _ in range(iters):
            f = alpha * self._product(f) + (1.0 - alpha) * y
            f[known] = y[known]
        mass = f.sum(dim=1)
        has = mass > 0
        pred = torch.where(has, f.argmax(dim=1), -1)
        conf = torch.where(has, f.max(dim=1).values / torch.where(has, mass, torch.ones_like(mass)), 0.0)
        pred[known], conf[known] = labels[known], 1.0
        return pred, conf.float()


def _numpy(a: Array, dtype) -> np.ndarray:
    return (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)).astype(dtype, copy=False)
