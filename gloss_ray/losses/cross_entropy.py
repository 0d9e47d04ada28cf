"""Class-weighted cross-entropy on classifier logits (the paper's CE baseline)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightedCrossEntropy(nn.Module):
    """``sum_i w[y_i] * -log softmax(logits_i)[y_i] / sum_i w[y_i]`` (plain mean when no weights).

    Inputs: ``logits`` (n x C), ``labels`` (n integer ids).
    Hyper-parameters: ``class_weights`` (C weights, e.g. :func:`balanced_class_weights`), ``label_smoothing``.
    :meth:`terms` gives numerator and denominator apart, for a weighted mean over several workers.

    Example:
        >>> import torch
        >>> WeightedCrossEntropy(torch.tensor([1.0, 3.0]))(torch.zeros(2, 2), torch.tensor([0, 1])).item()
        0.6931471824645996
    """

    def __init__(self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("class_weights", None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32), persistent=False)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, weight = self.terms(logits, labels)
        return total / weight

    def terms(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum_i w[y_i] * loss_i, sum_i w[y_i])``: the loss is their ratio. Split so that
        data-parallel workers can sum both over the global batch before dividing (the mean of the
        workers' weighted means is not the weighted mean of the global batch)."""
        labels = labels.to(logits.device)
        w = None if self.class_weights is None else self.class_weights.to(logits.device, logits.dtype)
        total = F.cross_entropy(logits, labels, weight=w, label_smoothing=self.label_smoothing, reduction="sum")
        weight = w[labels].sum() if w is not None else torch.tensor(float(len(labels)), device=logits.device, dtype=logits.dtype)
        return total, weight


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """sklearn's "balanced" weights ``n / (C_present * count_c)``; classes with no example get 0."""
    return balanced_weights(torch.bincount(torch.as_tensor(labels).long(), minlength=num_classes))


def balanced_weights(counts) -> torch.Tensor:
    """:func:`balanced_class_weights` from the examples per class (``counts[c]``)."""
    counts = torch.as_tensor(counts).double()
    present = (counts > 0).sum()
    w = torch.where(counts > 0, counts.sum() / (present * counts.clamp_min(1)), torch.zeros_like(counts))
    return w.float()
