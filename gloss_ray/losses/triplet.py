"""Batch-all triplet loss (Hermans et al., 2017; the form used by the G-Loss paper's baseline)."""
from __future__ import annotations

import torch
from torch import nn

from .propagation import l2_normalise


def pairwise_euclidean(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances with a finite gradient at 0 (the diagonal and duplicate rows)."""
    sq = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    return torch.sqrt(sq.clamp_min(1e-16)) * (sq > 0)


class BatchAllTripletLoss(nn.Module):
    """Mean hinge over all valid triplets in a batch that still violate the margin.

    For every anchor a, positive p (same class, p != a) and negative q (other class)::

        l(a, p, q) = max(0, d(a, p) - d(a, q) + margin)

    The loss is the sum of l over valid triplets divided by the number of triplets with l > 0
    (0 when none violate the margin).

    Inputs: ``embeddings`` (n x d), ``labels`` (n integer ids).
    Hyper-parameters: ``margin`` (default 5.0, as in the paper's baseline on raw CLS vectors),
    ``normalize`` (L2-normalise first; default False).

    Example:
        >>> import torch
        >>> emb = torch.randn(8, 4, requires_grad=True)
        >>> BatchAllTripletLoss(margin=1.0)(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).backward()
    """

    def __init__(self, margin: float = 5.0, normalize: bool = False):
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        self.margin = margin
        self.normalize = normalize

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = l2_normalise(embeddings) if self.normalize else embeddings
        d = pairwise_euclidean(x)
        labels = labels.to(x.device)
        n = x.shape[0]
        same = labels[:, None] == labels[None, :]
        not_self = ~torch.eye(n, dtype=torch.bool, device=x.device)
        valid = (same & not_self)[:, :, None] & (~same)[:, None, :]
        loss = (d[:, :, None] - d[:, None, :] + self.margin).clamp_min(0) * valid
        active = (loss > 1e-16).sum()
        return loss.sum() / active.clamp_min(1)
