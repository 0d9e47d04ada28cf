"""G-Loss: the graph-guided loss of "G-Loss: Graph-Guided Fine-Tuning of Language Models"
(arXiv 2604.25853, LoG 2025), and the combined training objective ``(1-lam)*CE + lam*G-Loss``."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .propagation import check_mask, label_propagation
from .sigma import SigmaStrategy

Tensor = torch.Tensor

VARIANTS = ("nll", "paper")
MASKS = ("random", "stratified")


def visible_count(n: int, gamma: float) -> int:
    """Number of visible nodes for a batch of n: ``ceil(n*gamma)`` as in the authors' code
    (``randperm(n) < n*gamma``), kept within ``[1, n-1]`` so both sides are non-empty."""
    return min(max(math.ceil(n * gamma - 1e-9), 1), n - 1)


def random_mask(n: int, gamma: float, generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask with ``visible_count(n, gamma)`` True entries at random positions."""
    if n < 2:
        raise ValueError(f"G-Loss needs at least 2 nodes in a batch, got {n}")
    perm = torch.randperm(n, generator=generator)
    return perm < visible_count(n, gamma)


def stratified_mask(labels: Tensor, gamma: float, generator: torch.Generator | None = None) -> Tensor:
    """Per-class mask: every class with >= 2 members keeps at least one visible and one hidden member;
    a class with a single member in the batch is visible (a hidden singleton has no labelled peer)."""
    labels = labels.detach().cpu()
    n = labels.shape[0]
    if n < 2:
        raise ValueError(f"G-Loss needs at least 2 nodes in a batch, got {n}")
    visible = torch.zeros(n, dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        m = idx.numel()
        if m == 1:
            visible[idx] = True
            continue
        idx = idx[torch.randperm(m, generator=generator)]
        visible[idx[: min(max(round(m * gamma), 1), m - 1)]] = True
    if bool(visible.all()):  # only singletons: hide one at random so something is scored
        visible[torch.randint(n, (1,), generator=generator)] = False
    return visible


class GLoss(nn.Module):
    """Graph-guided loss: label propagation over the batch's Gaussian-kernel graph, scored on the
    nodes whose labels were hidden.

    For a batch of document embeddings (n x d) and their labels, a fraction ``gamma`` of the nodes
    keeps its label visible; the rest are hidden. Labels are propagated in closed form over the
    batch graph (see :func:`gloss_ray.losses.label_propagation`) and the propagated scores of the
    hidden nodes are compared with their true labels. Minimising it pulls same-class documents
    together and pushes classes apart in the geometry the kernel sees.

    Inputs (``forward``):
        embeddings: n x d tensor (e.g. CLS vectors); gradients flow back into it.
        labels: n integer class ids.
        visible: optional boolean mask (True = label known); drawn with ``mask`` if omitted.
        sigma, k: optional per-call overrides (e.g. from a schedule).
        extra_embeddings, extra_labels: optional labelled nodes outside the batch (the global
            graph's neighbours); they are always visible and their embeddings are detached.
        extra_edge_weight: multiplies the weights of edges between batch and extra nodes.

    Hyper-parameters:
        num_classes: number of classes C.
        sigma: kernel width -- a number, a strategy name (``root``, ``dicm``, ``batch``) or a
            :class:`SigmaStrategy`. ``root``/``dicm`` are computed by :meth:`calibrate` (on the
            corpus); if never calibrated, from the first batch seen.
        gamma: fraction of visible labels, default 0.7 (the authors' default).
        k: keep each node's k strongest edges; ``None`` = dense graph.
        variant: ``"nll"`` (default) -- class-weighted mean negative log-likelihood of the
            row-normalised propagated probabilities (clamped at ``prob_floor``), independent of batch
            size; ``"paper"`` -- the authors' published code: class-weighted cross-entropy applied to
            the propagated scores as if they were logits, divided by |U|.
        mask: ``"random"`` (the authors') or ``"stratified"`` by class.
        class_weights: optional C weights (e.g. balanced weights of the training set).
        dtype: dtype of the graph computation (float64 by default; the graph is n x n, cheap).

    Example:
        >>> import torch
        >>> from gloss_ray.losses import GLoss
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> emb = torch.randn(16, 8, requires_grad=True)
        >>> labels = torch.arange(16) % 4
        >>> loss = GLoss(num_classes=4, sigma=0.5, gamma=0.7)(emb, labels)
        >>> loss.backward()
        >>> bool(torch.isfinite(emb.grad).all())
        True
    """

    def __init__(
        self,
        num_classes: int,
        sigma: float | str | SigmaStrategy = "root",
        gamma: float = 0.7,
        k: int | None = None,
        variant: str = "nll",
        mask: str = "random",
        class_weights: Tensor | None = None,
        prob_floor: float = 1e-8,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma (visible fraction) must be in (0, 1), got {gamma}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.strategy = SigmaStrategy.parse(sigma)
        self.sigma_value: float | None = self.strategy.initial() if self.strategy.kind == "fixed" else None
        self.gamma = gamma
        self.k = k
        self.variant = variant
        self.mask = mask
        self.prob_floor = prob_floor
        self.dtype = dtype
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=dtype)
            if class_weights.shape != (num_classes,):
                raise ValueError(f"class_weights must have {num_classes} entries, got {tuple(class_weights.shape)}")
        self.register_buffer("class_weights", class_weights, persistent=False)

    def calibrate(self, embeddings: Tensor, labels: Tensor | None = None) -> float | None:
        """Set sigma from corpus embeddings for the ``root``/``dicm`` strategies; returns it."""
        if self.strategy.kind in ("root", "dicm"):
            self.sigma_value = self.strategy.initial(embeddings.to(self.dtype), labels)
        return self.sigma_value

    def use_sigma(self, value: float) -> None:
        """Use this sigma from now on (e.g. a resumed run's, or rank 0's calibrated value)."""
        self.sigma_value = float(value)

    def current_sigma(self, embeddings: Tensor, labels: Tensor) -> float:
        if self.strategy.per_batch:
            return self.strategy.for_batch(embeddings.to(self.dtype), labels)
        if self.sigma_value is None:
            self.calibrate(embeddings, labels)
        return self.sigma_value

    def sample_mask(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.mask == "stratified":
            return stratified_mask(labels, self.gamma, generator)
        return random_mask(labels.shape[0], self.gamma, generator)

    def scores(self, f_u: Tensor, y_u: Tensor) -> Tensor:
        """The loss from propagated scores ``f_u`` (|U| x C) and true labels ``y_u``."""
        w = self.class_weights
        if self.variant == "paper":
            return F.cross_entropy(f_u, y_u, weight=w) / y_u.shape[0]
        p = f_u / f_u.sum(dim=1, keepdim=True).clamp_min(self.prob_floor)
        nll = -torch.log(p.gather(1, y_u[:, None]).squeeze(1).clamp_min(self.prob_floor))
        if w is None:
            return nll.mean()
        wy = w[y_u]
        return (wy * nll).sum() / wy.sum()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        visible: Tensor | None = None,
        *,
        sigma: float | None = None,
        k: int | None | str = "default",
        generator: torch.Generator | None = None,
        extra_embeddings: Tensor | None = None,
        extra_labels: Tensor | None = None,
        extra_edge_weight: float = 1.0,
    ) -> Tensor:
        n = embeddings.shape[0]
        labels = labels.to(embeddings.device).long()
        if visible is None:
            visible = self.sample_mask(labels, generator)
        visible = check_mask(visible, n).to(embeddings.device)
        x = embeddings.to(self.dtype)
        s = float(sigma) if sigma is not None else self.current_sigma(x, labels)
        k = self.k if k == "default" else k
        edge_scale = None
        if extra_embeddings is not None and extra_embeddings.shape[0] > 0:
            m = extra_embeddings.shape[0]
            x = torch.cat([x, extra_embeddings.detach().to(x.device, self.dtype)])
            labels = torch.cat([labels, extra_labels.to(labels.device).long()])
            visible = torch.cat([visible, torch.ones(m, dtype=torch.bool, device=visible.device)])
            if extra_edge_weight != 1.0:
                is_extra = torch.arange(n + m, device=x.device) >= n
                cross = is_extra[:, None] ^ is_extra[None, :]
                edge_scale = torch.where(cross, extra_edge_weight, 1.0).to(self.dtype)
        if k is not None and k >= x.shape[0] - 1:
            k = None
        f_u = label_propagation(
            x, labels, visible, s, self.num_classes, k,
            authors_eps=self.variant == "paper", edge_scale=edge_scale,
        )
        return self.scores(f_u, labels[~visible])


class Objective(NamedTuple):
    """The combined loss and its parts (detached parts are convenient for logging)."""

    total: Tensor
    ce: Tensor
    aux: Tensor


def combined_objective(ce: Tensor, aux: Tensor, lam: float) -> Objective:
    """``(1 - lam) * ce + lam * aux`` with the parts returned separately.

    Example:
        >>> import torch
        >>> combined_objective(torch.tensor(2.0), torch.tensor(4.0), lam=0.25).total.item()
        2.5
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    return Objective((1.0 - lam) * ce + lam * aux, ce, aux)
