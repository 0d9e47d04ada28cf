"""Pairwise contrastive loss (Hadsell, Chopra & LeCun, 2006) over all pairs of a batch."""
from __future__ import annotations

import torch
from torch import nn

from .propagation import l2_normalise
from .triplet import pairwise_euclidean


class ContrastiveLoss(nn.Module):
    """Mean over all pairs i < j of::

        same class:  0.5 * d_ij^2
        otherwise:   0.5 * max(0, margin - d_ij)^2

    with d the Euclidean distance between L2-normalised embeddings (so d is in [0, 2]).

    Inputs: ``embeddings`` (n x d), ``labels`` (n integer ids).
    Hyper-parameters: ``margin`` (default 1.0).

    Example:
        >>> import torch
        >>> emb = torch.randn(6, 4, requires_grad=True)
        >>> ContrastiveLoss(margin=1.0)(emb, torch.tensor([0, 0, 1, 1, 2, 2])).backward()
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = l2_normalise(embeddings)
        n = x.shape[0]
        if n < 2:
            return embeddings.sum() * 0.0
        d = pairwise_euclidean(x)
        labels = labels.to(x.device)
        iu = torch.triu_indices(n, n, offset=1, device=x.device)
        dij = d[iu[0], iu[1]]
        same = labels[iu[0]] == labels[iu[1]]
        per_pair = torch.where(same, dij.pow(2), (self.margin - dij).clamp_min(0).pow(2))
        return 0.5 * per_pair.mean()
