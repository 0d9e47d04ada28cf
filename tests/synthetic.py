"""Clustered synthetic unit vectors for the tests and benchmarks of the global document graph
(``from synthetic import clustered_unit_vectors``, with this folder on ``sys.path``: pytest puts it there;
``benchmarks/global_graph.py`` does).

Each of ``num_clusters`` classes has a random unit centre and a random ``rank``-dimensional
subspace; a document is ``centre + spread * (subspace coordinates) + noise`` normalised, so
neighbours are meaningful (mostly same-class, with a within-class geometry) like text embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clustered_unit_vectors(n: int, dim: int = 384, num_clusters: int = 50, *, rank: int = 16, spread: float = 0.6,
                           noise: float = 0.15, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vectors float32 [n, dim] unit rows, labels int64 [n])``, deterministic for a given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_clusters, dim, generator=g), dim=1)
    bases = torch.randn(num_clusters, rank, dim, generator=g) / dim**0.5
    labels = torch.randint(0, num_clusters, (n,), generator=g)
    coords = torch.randn(n, rank, generator=g) * spread
    x = centres[labels] + torch.randn(n, dim, generator=g) * (noise / dim**0.5)
    for c in range(num_clusters):
        m = labels == c
        x[m] += coords[m] @ bases[c]
    return F.normalize(x, dim=1), labels
