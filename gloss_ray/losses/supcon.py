"""Supervised contrastive loss (Khosla et al., 2020), single view."""
from __future__ import annotations

import torch
from torch import nn

from .propagation import l2_normalise


class SupConLoss(nn.Module):
    """Supervised contrastive loss over one view of a batch.

    For each anchor i with at least one other member of its class in the batch::

        l_i = -(tau / tau_base) * mean_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) )

    where z are the L2-normalised embeddings and P(i) the other members of i's class. The loss is
    the mean over anchors that have a positive; anchors without one are left out (a batch with no
    positive pair at all gives 0, still attached to the graph).

    Inputs: ``embeddings`` (n x d), ``labels`` (n integer ids).
    Hyper-parameters: ``temperature`` tau (default 0.07), ``base_temperature`` (default = tau).

    Example:
        >>> import torch
        >>> emb = torch.randn(8, 4, requires_grad=True)
        >>> SupConLoss(temperature=0.1)(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).backward()
    """

    def __init__(self, temperature: float = 0.07, base_temperature: float | None = None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.base_temperature = base_temperature if base_temperature is not None else temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = l2_normalise(embeddings)
        n = z.shape[0]
        labels = labels.to(z.device)
        logits = z @ z.t() / self.temperature
        self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pos = (labels[:, None] == labels[None, :]) & ~self_mask
        n_pos = pos.sum(dim=1)
        has = n_pos > 0
        if not bool(has.any()):
            return embeddings.sum() * 0.0
        mean_log_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)[has] / n_pos[has]
        return -(self.temperature / self.base_temperature) * mean_log_pos.mean()
