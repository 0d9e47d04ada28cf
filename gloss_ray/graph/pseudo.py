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

from typing import Optional

import numpy as np
import scipy.sparse as sp


def propagate_labels_knn(ids: np.ndarray, scores: np.ndarray, labels: np.ndarray, num_classes: int,
                         alpha: float = 0.99, iters: int = 20,
                         sigma: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """Spread ``labels`` ([n], -1 = unknown) over the kNN graph ``ids``/``scores`` ([n, k], -1 padding).

    Returns ``(pred [n] int64, confidence [n] float32)``; known docs keep their label with confidence 1.
    """
    ids, scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    if ids.shape != scores.shape or ids.ndim != 2 or ids.shape[0] != n:
        raise ValueError(f"ids {ids.shape} and scores {scores.shape} must both be [n={n}, k]")
    if labels.max(initial=-1) >= num_classes or labels.min(initial=0) < -1:
        raise ValueError(f"labels must be in [-1, {num_classes})")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rows = np.repeat(np.arange(n, dtype=np.int64), ids.shape[1])
    cols, s = ids.ravel(), scores.ravel()
    ok = (cols >= 0) & (cols != rows) & np.isfinite(s)
    rows, cols, s = rows[ok], cols[ok], s[ok]
    w = np.exp((s - 1.0) / np.float32(sigma) ** 2) if sigma is not None else np.maximum(s, 0.0) ** 3
    w = w.astype(np.float32)
    a = sp.csr_array((w, (rows, cols)), shape=(n, n))
    a = (a + a.T).tocsr()
    deg = np.asarray(a.sum(axis=1)).ravel()
    dinv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0).astype(np.float32)
    norm = (sp.diags_array(dinv) @ a @ sp.diags_array(dinv)).tocsr()
    known = labels >= 0
    y = np.zeros((n, num_classes), dtype=np.float32)
    y[known, labels[known]] = 1.0
    f = y.copy()
    for _ in range(iters):
        f = alpha * (norm @ f) + (1.0 - alpha) * y
        f[known] = y[known]
    mass = f.sum(axis=1)
    pred = np.where(mass > 0, f.argmax(axis=1), -1).astype(np.int64)
    conf = np.where(mass > 0, f.max(axis=1) / np.where(mass > 0, mass, 1.0), 0.0).astype(np.float32)
    pred[known], conf[known] = labels[known], 1.0
    return pred, conf
