"""Choosing the Gaussian kernel width sigma.

Strategies (``SigmaStrategy.kind``):

* ``fixed`` -- a given value.
* ``root``  -- ``sqrt(median pairwise distance / 3)``, the kernel's inflection point heuristic,
  computed once from the initial embeddings of (a sample of) the training corpus.
* ``dicm``  -- "direct inter-class minimum": the smallest distance between two points of different
  classes, divided by 3. Fallbacks as in the authors' code: if that minimum is 0, the next smallest
  non-zero inter-class distance; if there is none (a single class, or all inter-class distances 0),
  the median pairwise distance / 3.
* ``batch`` -- ``root`` (or ``dicm`` with ``batch_heuristic="dicm"``) recomputed on every batch
  from the current embeddings, detached from the graph.

Distances are Euclidean between L2-normalised embeddings, over distinct pairs ``i < j``.
``torch.median`` returns the lower of the two middle values for an even count.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .propagation import l2_normalise

Tensor = torch.Tensor

KINDS = ("fixed", "root", "dicm", "batch")
# what a user writes for sigma besides a number (a fixed value): ``batch-dicm`` is ``batch`` with the dicm heuristic
NAMES = ("root", "dicm", "batch", "batch-dicm")


def _pair_distances(x: Tensor) -> Tensor:
    n = x.shape[0]
    if n < 2:
        raise ValueError("sigma heuristics need at least two embeddings")
    x = l2_normalise(x.detach())
    d = torch.cdist(x, x, p=2)
    iu = torch.triu_indices(n, n, offset=1, device=x.device)
    return d, iu


def sigma_root(embeddings: Tensor) -> float:
    """``sqrt(median pairwise distance / 3)`` over distinct pairs of L2-normalised rows."""
    d, iu = _pair_distances(embeddings)
    return float(torch.sqrt(torch.median(d[iu[0], iu[1]]) / 3))


def sigma_dicm(embeddings: Tensor, labels: Tensor) -> float:
    """Minimum inter-class distance / 3, with the authors' fallbacks (see module docstring)."""
    d, iu = _pair_distances(embeddings)
    labels = labels.to(d.device)
    pairs = d[iu[0], iu[1]]
    inter = labels[iu[0]] != labels[iu[1]]
    inter_d = pairs[inter]
    if inter_d.numel() > 0:
        d0 = inter_d.min()
        if d0 > 0:
            return float(d0 / 3)
        nonzero = inter_d[inter_d > 0]
        if nonzero.numel() > 0:
            return float(nonzero.min() / 3)
    return float(torch.median(pairs) / 3)


@dataclass
class SigmaStrategy:
    """How sigma is set. ``value`` is used by ``fixed`` and as the fallback when a heuristic gives
    a value below ``min_sigma`` (e.g. collapsed embeddings)."""

    kind: str = "root"
    value: float | None = None
    batch_heuristic: str = "root"
    min_sigma: float = 1e-3

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"sigma strategy must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "fixed" and (self.value is None or self.value <= 0):
            raise ValueError(f"sigma strategy 'fixed' needs a value > 0, got {self.value!r}")
        if self.batch_heuristic not in ("root", "dicm"):
            raise ValueError(f"batch_heuristic must be 'root' or 'dicm', got {self.batch_heuristic!r}")

    @classmethod
    def parse(cls, spec: "str | float | dict | SigmaStrategy") -> "SigmaStrategy":
        """Accepts a number (fixed), a name (``root``, ``dicm``, ``batch``, ``batch-dicm``) or a dict."""
        if isinstance(spec, SigmaStrategy):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        if isinstance(spec, (int, float)):
            return cls(kind="fixed", value=float(spec))
        text = str(spec).strip().lower()
        try:
            return cls(kind="fixed", value=float(text))
        except ValueError:
            pass
        if text == "batch-dicm":
            return cls(kind="batch", batch_heuristic="dicm")
        return cls(kind=text)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def per_batch(self) -> bool:
        return self.kind == "batch"

    def _guard(self, s: float) -> float:
        if not (s >= self.min_sigma):  # also catches NaN
            if self.value is None:
                return self.min_sigma
            return float(self.value)
        return s

    def initial(self, embeddings: Tensor | None = None, labels: Tensor | None = None) -> float | None:
        """sigma from the corpus embeddings before training (``None`` for ``batch``)."""
        if self.kind == "fixed":
            return float(self.value)
        if self.kind == "batch":
            return None
        if embeddings is None:
            raise ValueError(f"sigma strategy {self.kind!r} needs the initial embeddings")
        if self.kind == "root":
            return self._guard(sigma_root(embeddings))
        if labels is None:
            raise ValueError("sigma strategy 'dicm' needs labels")
        return self._guard(sigma_dicm(embeddings, labels))

    def for_batch(self, embeddings: Tensor, labels: Tensor) -> float:
        """sigma recomputed on one batch (``batch`` strategy)."""
        if self.batch_heuristic == "dicm":
            return self._guard(sigma_dicm(embeddings, labels))
        return self._guard(sigma_root(embeddings))
