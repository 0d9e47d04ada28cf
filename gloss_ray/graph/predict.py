"""Graph prediction: classify a document by label propagation over the training corpus (issue 25).

G-Loss trains embeddings so that label propagation over a Gaussian-kernel graph recovers hidden labels;
this module predicts that way at inference, from the final model's embeddings of the training documents
and their labels, alone or blended with the classifier head.

The graph. Embeddings are L2-normalised as the loss does (:func:`gloss_ray.losses.propagation.l2_normalise`).
Each query (a document to classify) is linked to its ``k`` nearest training documents by inner product,
found with the project's kNN index (:class:`gloss_ray.graph.index.KnnIndex`, backend from
:func:`~gloss_ray.graph.index.choose_backend`: exact ``faiss-flat`` up to 20k training documents on CPU,
calibrated ``faiss-ivf`` above, ``torch-exact`` without FAISS), with the loss's Gaussian kernel and the
loss's sigma (:func:`gloss_ray.losses.propagation.gaussian_affinity`)::

    w_qj = exp(-||x_q - x_j||^2 / (2 sigma^2)) = exp((s_qj - 1) / sigma^2)     (unit vectors: ||x-y||^2 = 2 - 2s)

Inductive mode (default): the training labels are all known and queries are not linked to each other,
so the harmonic solution ``F_U = (I - T_UU)^-1 T_UL Y_L`` of label propagation with the random-walk
transition matrix ``T = D^-1 W`` reduces to one step, in closed form::

    F_q = sum_j w_qj y_j / sum_j w_qj          (j over the k neighbours; y_j one-hot)

i.e. the kernel-weighted class vote of the neighbours, a row that sums to 1. It is computed as
``exp((s_qj - s_q1) / sigma^2)`` (scaled by the nearest neighbour's weight, which the row normalisation
cancels) so that a small sigma never underflows every weight to 0. This differs from the loss's transition
matrix (:func:`gloss_ray.losses.propagation.transition_matrix`), whose symmetric and column normalisations
weigh each edge also by the training document's degree in the graph: at inference there is no batch graph
among the training documents to take degrees from, and this keeps a query's scores independent of the
other queries.

Transductive mode (``transductive=True``, BertGCN's setting: the documents to classify are known at
training time): the queries join the graph as unlabelled nodes with the training documents; every node
is linked to its ``k`` nearest other nodes (training or query), ``A = W + W^T``, ``T = D^-1 A``, and the
harmonic solution for the queries is found by the Jacobi iteration ``F_U <- T_UL Y_L + T_UU F_U`` from
``F_U = 0`` (``iters`` rounds at most, stopping when no entry moves by more than 1e-6); rows are then
divided by their sums. A query that no labelled node reaches (e.g. every kernel weight underflowed) gets
the class prior of the training labels. Queries vote for one another, so a query's scores depend on the
whole set scored with it.

The blend. ``P = alpha * softmax(logits) + (1 - alpha) * F``; ``alpha = 1`` is the classifier alone,
``alpha = 0`` the graph alone. ``alpha`` and ``k`` are chosen on the validation split only
(:func:`select`): the grid :data:`ALPHAS` x :data:`KS`, the best validation macro-F1, ties to the larger
alpha (the classifier-heavier blend), then the smaller k. The graph alone gets its own k the same way
(``alpha = 0``). The test split is then scored once with the chosen values (:func:`score_splits`).

Saving. :meth:`GraphPredictor.save` writes ``graph_predict.safetensors`` (the training embeddings,
normalised, float16; their labels) and ``graph_predict.json`` (sigma, alpha, k, mode, ...) into a saved
model folder; sentence-transformers and transformers ignore both files. :func:`load_graph_predictor`
reads them back (``None`` when absent).

Example:
    >>> import torch
    >>> from gloss_ray.graph.predict import GraphPredictor
    >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.2], [0.0, 1.0], [0.2, 0.9]])
    >>> gp = GraphPredictor(train, torch.tensor([0, 0, 1, 1]), num_classes=2, sigma=0.5, k=2)
    >>> queries = torch.tensor([[0.8, 0.1], [0.1, 0.7]])
    >>> gp.graph_proba(queries).argmax(1).tolist()
    [0, 1]
    >>> logits = torch.tensor([[0.0, 3.0], [0.0, 3.0]])       # a classifier that says class 1 twice
    >>> gp.predict(logits, queries, alpha=0.25).tolist()      # the graph outvotes it on the first
    [0, 1]
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp
import torch

from ..losses.propagation import l2_normalise
from ..metrics import classification_metrics
from .index import KnnIndex, make_index

Array = Union[torch.Tensor, np.ndarray]

ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)   # classifier weight in the blend
KS: tuple[int, ...] = (5, 10, 20, 50)                     # training neighbours per query
WEIGHTS_FILE = "graph_predict.safetensors"
META_FILE = "graph_predict.json"
FORMAT = "gloss-ray-graph-predict/1"
SELECT_METRIC = "macro_f1"                                 # what alpha and k maximise on validation


def _tensor(x: Array, dtype=torch.float32) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to("cpu", dtype)


def softmax(logits: Array) -> torch.Tensor:
    """Row softmax of classifier logits, float64 (rows sum to 1)."""
    return torch.softmax(_tensor(logits, torch.float64), dim=1)


def blend(classifier_proba: Array, graph_proba: Array, alpha: float) -> torch.Tensor:
    """``alpha * classifier + (1 - alpha) * graph`` (both [n, C] probabilities)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * _tensor(classifier_proba, torch.float64) + (1 - alpha) * _tensor(graph_proba, torch.float64)


def kernel_vote(ids: Array, scores: Array, labels: Array, num_classes: int, sigma: float) -> torch.Tensor:
    """The inductive closed form: ``F_q = sum_j w_qj y_j / sum_j w_qj`` over each query's neighbours.

    ``ids`` [nq, k] training rows (-1 = padding), ``scores`` [nq, k] their inner products with the query
    (unit vectors; descending, as :class:`~gloss_ray.graph.index.KnnResult` gives them), ``labels`` the
    training labels. Weights ``exp((s - s_max) / sigma^2)`` -- the Gaussian kernel up to a per-row factor
    that the normalisation cancels. A query without neighbours gets the class prior of ``labels``.
    Returns [nq, C] float64 rows summing to 1.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    ids, s = _tensor(ids, torch.long), _tensor(scores, torch.float64)
    labels = _tensor(labels, torch.long)
    valid = (ids >= 0) & torch.isfinite(s)
    top = torch.where(valid, s, torch.full_like(s, -math.inf)).max(dim=1, keepdim=True).values
    w = torch.where(valid, torch.exp((s - torch.where(torch.isfinite(top), top, 0.0)) / sigma ** 2), 0.0)
    f = torch.zeros(ids.shape[0], num_classes, dtype=torch.float64).scatter_add_(1, labels[ids.clamp_min(0)], w)
    mass = f.sum(dim=1, keepdim=True)
    prior = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    prior = prior / prior.sum().clamp_min(1)
    return torch.where(mass > 0, f / torch.where(mass > 0, mass, 1.0), prior.expand_as(f))


def harmonic_transductive(ids: Array, scores: Array, labels: Array, num_labelled: int, num_classes: int,
                          sigma: float, iters: int = 200, tol: float = 1e-6) -> torch.Tensor:
    """The transductive harmonic solution over a kNN graph of all nodes (see the module docstring).

    Nodes ``0 .. num_labelled-1`` are the training documents (``labels`` [num_labelled]), the rest the
    queries; ``ids``/``scores`` [n, k] are every node's neighbours among all nodes (itself excluded).
    Returns the queries' [n - num_labelled, C] float64 rows summing to 1."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    ids = _tensor(ids, torch.long).numpy()
    s = _tensor(scores, torch.float64).numpy()
    n, nl = ids.shape[0], int(num_labelled)
    rows = np.repeat(np.arange(n), ids.shape[1])
    cols, vals = ids.ravel(), s.ravel()
    ok = (cols >= 0) & np.isfinite(vals) & (cols != rows)
    w = np.exp((vals[ok] - 1.0) / sigma ** 2)                      # the Gaussian kernel on unit vectors
    a = sp.csr_array((w, (rows[ok], cols[ok])), shape=(n, n))
    a = (a + a.T).tocsr()
    deg = np.asarray(a.sum(axis=1)).ravel()
    t = (sp.diags_array(np.where(deg > 0, 1.0 / np.where(deg > 0, deg, 1.0), 0.0)) @ a).tocsr()
    y = np.eye(num_classes)[_tensor(labels, torch.long).numpy()]
    t_ul, t_uu = t[nl:, :nl], t[nl:, nl:]
    base = t_ul @ y
    f = np.zeros_like(base)
    for _ in range(iters):
        new = base + t_uu @ f
        done = np.abs(new - f).max(initial=0.0) <= tol
        f = new
        if done:
            break
    mass = f.sum(axis=1, keepdims=True)
    prior = y.sum(axis=0) / max(1, nl)
    reached = mass > 1e-12
    out = np.where(reached, f / np.where(reached, mass, 1.0), prior[None, :])
    return torch.from_numpy(out)


@dataclass
class Selection:
    """What :func:`select` chose on validation, and the whole validation grid it chose from."""
    alpha: float
    k: int
    graph_k: int
    grid: list = field(default_factory=list)    # {"alpha", "k", "accuracy", "macro_f1"} per grid point


def select(labels: Array, classifier_proba: Array, graph_proba_by_k: Mapping[int, Array], num_classes: int,
           alphas: Sequence[float] = ALPHAS, metric: str = SELECT_METRIC) -> Selection:
    """Choose ``alpha`` and ``k`` on ONE split (validation): the best ``metric`` of the blend over the grid,
    ties to the larger alpha, then the smaller k; and the graph-alone k (alpha = 0), ties to the smaller k.
    Sees only the split it is given -- the caller passes validation and nothing else."""
    labels = np.asarray(labels)
    grid = []
    for k in sorted(graph_proba_by_k):
        for a in sorted(alphas):
            pred = blend(classifier_proba, graph_proba_by_k[k], a).argmax(1).numpy()
            grid.append({"alpha": float(a), "k": int(k), **classification_metrics(labels, pred, num_classes)})
    best = max(grid, key=lambda g: (g[metric], g["alpha"], -g["k"]))
    graph_only = max((g for g in grid if g["alpha"] == 0.0), key=lambda g: (g[metric], -g["k"]),
                     default={"k": best["k"]})
    return Selection(best["alpha"], best["k"], int(graph_only["k"]), grid)


class GraphPredictor:
    """Predict by propagation over the training corpus, alone or blended with the classifier.

    Inputs: ``embeddings`` [n, d] of the training documents (L2-normalised here; any float dtype),
    ``labels`` [n] their class ids, ``num_classes``, ``sigma`` (the loss's kernel width). Hyper-parameters:
    ``k`` (training neighbours per query), ``alpha`` (classifier weight of the blend), ``transductive``
    (queries join the graph, see the module docstring), ``backend`` (kNN backend, ``"auto"``).
    The index is built on first use.
    """

    def __init__(self, embeddings: Array, labels: Array, num_classes: int, sigma: float, *, k: int = 10,
                 alpha: float = 0.5, transductive: bool = False, backend: str = "auto",
                 graph_k: Optional[int] = None) -> None:
        self.embeddings = l2_normalise(_tensor(embeddings)).contiguous()
        self.labels = _tensor(labels, torch.long)
        if self.embeddings.ndim != 2 or self.labels.shape != (self.embeddings.shape[0],):
            raise ValueError(f"embeddings [n, d] and labels [n] needed, got {tuple(self.embeddings.shape)} "
                             f"and {tuple(self.labels.shape)}")
        if len(self.labels) == 0:
            raise ValueError("graph prediction needs at least one training document")
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes})")
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be a number > 0, got {sigma}")
        self.num_classes, self.sigma, self.k, self.alpha = int(num_classes), float(sigma), int(k), float(alpha)
        self.graph_k = int(graph_k if graph_k is not None else k)
        self.transductive, self.backend = bool(transductive), backend
        self._index: Optional[KnnIndex] = None

    # ------------------------------------------------------------------------------ propagation
    def index(self) -> KnnIndex:
        if self._index is None:
            self._index = make_index(self.embeddings, self.backend, "cpu")
        return self._index

    def graph_proba_by_k(self, queries: Array, ks: Sequence[int]) -> dict[int, torch.Tensor]:
        """Graph scores [nq, C] of the queries for each k of ``ks`` (one search at the largest k)."""
        q = l2_normalise(_tensor(queries)).contiguous()
        if self.transductive:
            return self._transductive_by_k(q, ks)
        kmax = min(max(ks), len(self.labels))
        res = self.index().search(q, kmax)
        return {int(k): kernel_vote(res.ids[:, :k], res.scores[:, :k], self.labels, self.num_classes, self.sigma)
                for k in ks}

    def _transductive_by_k(self, q: torch.Tensor, ks: Sequence[int]) -> dict[int, torch.Tensor]:
        nodes = torch.cat([self.embeddings, q]).contiguous()
        n = nodes.shape[0]
        kmax = min(max(ks), n - 1)
        index = make_index(nodes, self.backend, "cpu")
        res = index.search(nodes, kmax, exclude_ids=torch.arange(n))
        return {int(k): harmonic_transductive(res.ids[:, :k], res.scores[:, :k], self.labels, len(self.labels),
                                              self.num_classes, self.sigma) for k in ks}

    def graph_proba(self, queries: Array, k: Optional[int] = None) -> torch.Tensor:
        """Graph scores [nq, C] (rows sum to 1) with ``k`` neighbours (default: the blend's ``k``)."""
        k = self.k if k is None else int(k)
        return self.graph_proba_by_k(queries, [k])[k]

    def blend_proba(self, logits: Array, queries: Array, alpha: Optional[float] = None,
                    k: Optional[int] = None) -> torch.Tensor:
        """``alpha * softmax(logits) + (1 - alpha) * graph`` for the queries (defaults: the chosen ones)."""
        alpha = self.alpha if alpha is None else float(alpha)
        return blend(softmax(logits), self.graph_proba(queries, k), alpha)

    def predict(self, logits: Array, queries: Array, alpha: Optional[float] = None,
                k: Optional[int] = None) -> torch.Tensor:
        """Class ids of the blend (:meth:`blend_proba`)."""
        return self.blend_proba(logits, queries, alpha, k).argmax(1)

    # ------------------------------------------------------------------------------ saving
    def meta(self) -> dict:
        return {"format": FORMAT, "num_classes": self.num_classes, "sigma": self.sigma, "alpha": self.alpha,
                "k": self.k, "graph_k": self.graph_k, "transductive": self.transductive,
                "train_docs": len(self.labels), "dim": int(self.embeddings.shape[1]),
                "kernel": "exp(-||x_i - x_j||^2 / (2 sigma^2)) on L2-normalised embeddings",
                "blend": "alpha * softmax(classifier logits) + (1 - alpha) * graph",
                "selected_on": "validation", "select_metric": SELECT_METRIC}

    def save(self, model_dir: Union[str, Path]) -> list[Path]:
        """Write :data:`WEIGHTS_FILE` (embeddings float16, labels int64) and :data:`META_FILE` into
        ``model_dir``; returns their paths."""
        from safetensors.torch import save_file

        out = Path(model_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings.to(torch.float16).contiguous(),
                   "labels": self.labels.contiguous()}, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
        (out / META_FILE).write_text(json.dumps(self.meta(), indent=2))
        return [out / WEIGHTS_FILE, out / META_FILE]


def load_graph_predictor(model_dir: Union[str, Path], backend: str = "auto") -> Optional[GraphPredictor]:
    """The :class:`GraphPredictor` saved in a model folder, or ``None`` when the folder has no graph files
    (a model trained without ``graph_predict``: the caller predicts with the classifier and says so)."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    if not ((d / WEIGHTS_FILE).is_file() and (d / META_FILE).is_file()):
        return None
    meta = json.loads((d / META_FILE).read_text())
    tensors = load_file(str(d / WEIGHTS_FILE))
    return GraphPredictor(tensors["embeddings"].float(), tensors["labels"], meta["num_classes"], meta["sigma"],
                          k=meta["k"], alpha=meta["alpha"], transductive=meta.get("transductive", False),
                          backend=backend, graph_k=meta.get("graph_k"))


# ---------------------------------------------------------------------------------- scoring splits
@dataclass
class SplitOutputs:
    """A split as the model sees it: classifier ``logits`` [n, C], ``embeddings`` [n, d], true ``labels``."""
    logits: Array
    embeddings: Array
    labels: Array


def score_splits(predictor: GraphPredictor, splits: Mapping[str, SplitOutputs], *, alphas: Sequence[float] = ALPHAS,
                 ks: Sequence[int] = KS, select_on: str = "validation") -> dict:
    """Score every split three ways -- classifier, graph, blend -- with ``alpha``/``k`` chosen on
    ``select_on`` only (set on ``predictor``). Returns flat metrics: ``{split}_{classifier|graph|blend}_
    {accuracy|macro_f1}``, ``graph_k``, ``graph_blend_alpha``, ``graph_blend_k``, ``graph_val_grid``
    (the selection grid, on ``select_on``) and ``graph_predict_s`` (seconds).

    In transductive mode every split's documents join the graph together (all are unlabelled nodes)."""
    if select_on not in splits:
        raise ValueError(f"graph prediction chooses alpha and k on {select_on!r}, which is not among {list(splits)}")
    t0 = time.perf_counter()
    C = predictor.num_classes
    names = list(splits)
    ks = sorted({min(int(k), len(predictor.labels)) for k in ks if int(k) >= 1})   # k <= training docs
    queries = torch.cat([l2_normalise(_tensor(splits[s].embeddings)) for s in names])
    bounds = np.cumsum([0] + [len(np.asarray(splits[s].labels)) for s in names])
    by_k_all = predictor.graph_proba_by_k(queries, ks)
    by_k = {s: {k: p[bounds[i]:bounds[i + 1]] for k, p in by_k_all.items()} for i, s in enumerate(names)}
    clf = {s: softmax(splits[s].logits) for s in names}
    sel = select(splits[select_on].labels, clf[select_on], by_k[select_on], C, alphas)
    predictor.alpha, predictor.k, predictor.graph_k = sel.alpha, sel.k, sel.graph_k
    out: dict = {"graph_k": sel.graph_k, "graph_blend_alpha": sel.alpha, "graph_blend_k": sel.k,
                 "graph_sigma": predictor.sigma, "graph_transductive": predictor.transductive,
                 "graph_train_docs": len(predictor.labels)}
    for s in names:
        labels = np.asarray(splits[s].labels)
        preds = {"classifier": clf[s].argmax(1), "graph": by_k[s][sel.graph_k].argmax(1),
                 "blend": blend(clf[s], by_k[s][sel.k], sel.alpha).argmax(1)}
        prefix = "val" if s == "validation" else s
        for how, p in preds.items():
            for m, v in classification_metrics(labels, p.numpy(), C).items():
                out[f"{prefix}_{how}_{m}"] = v
    out["graph_val_grid"] = sel.grid
    out["graph_predict_s"] = time.perf_counter() - t0
    return out
