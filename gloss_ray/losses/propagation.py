"""Closed-form label propagation on a Gaussian-kernel batch graph (Zhu & Ghahramani, 2002).

The graph and the transition matrix follow the G-Loss authors' published code:

    x_i  <- x_i / ||x_i||                                   (L2-normalise)
    W_ij  = exp(-||x_i - x_j||^2 / (2 sigma^2)),  W_ii = 0  (Gaussian kernel, no self loops)
    W     <- top-k per row (optional), then A = W + W^T     (symmetrise)
    A_hat = D^-1/2 A D^-1/2                                 (symmetric normalisation)
    T     = A_hat / column sums, then / row sums            (transition matrix)
    F_U   = (I - T_UU)^-1 T_UL Y_L                          (harmonic solution for hidden nodes U)

Everything here is plain PyTorch and differentiable with respect to the embeddings.

Unreachable hidden nodes. A hidden node that is (effectively) unreachable from the labelled nodes
gets the **class prior of the visible nodes** (the fraction of visible nodes in each class, extra
labelled nodes included) as its row of ``F_U``, exactly, with no gradient. Reachability is decided
on the transition matrix ``T``: a hidden node is reachable when a path of transitions, each above
``tau = sqrt(eps)`` of the computation dtype (1.5e-8 in float64, 3.5e-4 in float32), leads from it to
a labelled node. So a node is unreachable when

* no path of non-zero weights links it to a labelled node (with a tiny sigma every kernel weight
  underflows to 0; top-k can cut a group off), or
* its only links towards the labelled nodes are transitions below ``tau`` (e.g. a tight group of
  hidden near-duplicates far from every labelled node). ``I - T_UU`` cannot be solved accurately for
  such a group: an escape probability ``p`` leaves about ``eps / p`` of error, and below ~``eps`` the
  solve returns rows of 1e-35 or 1e40 instead of probabilities.

Unreachable nodes then act like labelled nodes carrying the prior: the reachable nodes ``G`` are
solved with those rows as fixed boundary values, ``F_G = (I - T_GG)^-1 (T_GL Y_L + T_GB prior)``, so
every row of ``F_U`` sums to 1 and gradients are those of this well-conditioned system. As a last
guard, a solved row that is not finite or does not sum to 1 within ``tau`` (in exact arithmetic it
sums to exactly 1) also marks its node as unreachable and the rest is solved again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# The authors replace NaN/inf produced by 0 * inf in the normalisation with this constant.
AUTHORS_EPS = 1e-10


def l2_normalise(embeddings: Tensor) -> Tensor:
    """Row-wise L2 normalisation; a zero row stays zero instead of becoming NaN."""
    norm = embeddings.norm(dim=1, keepdim=True)
    return embeddings / torch.where(norm > 0, norm, torch.ones_like(norm))


def gaussian_affinity(x: Tensor, sigma: float | Tensor, k: int | None = None) -> Tensor:
    """Gaussian-kernel affinities ``W`` (zero diagonal) between the rows of ``x``.

    ``k`` keeps each row's ``k`` strongest edges (the diagonal never counts); ``None`` keeps all.
    The result is *not* symmetrised (see :func:`transition_matrix`).
    """
    n = x.shape[0]
    sq = torch.cdist(x, x, p=2) ** 2
    w = torch.exp(-sq / (2 * sigma**2))
    w = w - torch.diag(torch.diag(w))
    if k is not None and k < n - 1:
        if k < 1:
            raise ValueError(f"k must be >= 1 or None (dense), got {k}")
        scores = w.detach().clone()
        scores.fill_diagonal_(-1.0)
        idx = scores.topk(k, dim=1).indices
        mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)
        w = w * mask
    return w


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0, without NaN gradients from the masked branch."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def transition_matrix(w: Tensor, authors_eps: bool = False) -> Tensor:
    """Transition matrix ``T`` from (unsymmetrised) affinities ``w``.

    A node whose total edge weight is below ``sqrt(finfo.tiny)`` (1.5e-154 in float64) counts as
    isolated. By default an isolated node keeps no edges. ``authors_eps=True`` reproduces the
    authors' code instead, where ``0 * inf`` in ``D^-1/2 A D^-1/2`` gives NaN entries that are then
    replaced by 1e-10 (so an isolated node links weakly to everyone). On a graph without isolated
    nodes the two are identical. Either way the gradient stays finite.
    """
    a = w + w.t()
    deg = a.sum(dim=1)
    live = deg > torch.finfo(a.dtype).tiny ** 0.5
    inv_sqrt = torch.where(live, torch.where(live, deg, torch.ones_like(deg)).pow(-0.5), torch.zeros_like(deg))
    if authors_eps:
        d = torch.diag(inv_sqrt)
        a_hat = a.mm(d).t().mm(d)
        eps = torch.tensor(AUTHORS_EPS, dtype=a_hat.dtype, device=a_hat.device)
        a_hat = torch.where(live[:, None] & live[None, :], a_hat, eps)
        t = a_hat / a_hat.sum(dim=0, keepdim=True)
        return t / t.sum(dim=1, keepdim=True)
    a_hat = inv_sqrt[:, None] * a * inv_sqrt[None, :]
    t = _safe_div(a_hat, a_hat.sum(dim=0, keepdim=True))
    return _safe_div(t, t.sum(dim=1, keepdim=True))


def reachable_from_labelled(t_ul: Tensor, t_uu: Tensor, threshold: float = 0.0) -> Tensor:
    """Boolean mask of hidden nodes that have a path to some labelled node along transitions ``T_ij``
    greater than ``threshold``."""
    with torch.no_grad():
        reach = (t_ul > threshold).any(dim=1)
        step = (t_uu > threshold).to(torch.float32)
        while True:
            new = reach | (step @ reach.to(torch.float32) > 0)
            if torch.equal(new, reach):
                return reach
            reach = new


def _solve(t_uu: Tensor, rhs: Tensor) -> Tensor:
    """``(I - T_UU)^-1 rhs``; where ``I - T_UU`` is exactly singular in floating point, the solution with a
    1e-9 ridge (its rows of nodes the plain system cannot resolve are then far from summing to 1)."""
    eye = torch.eye(t_uu.shape[0], dtype=t_uu.dtype, device=t_uu.device)
    sol, info = torch.linalg.solve_ex(eye - t_uu, rhs)
    if int(info) != 0:
        sol = torch.linalg.solve_ex((1 + 1e-9) * eye - t_uu, rhs)[0]
    return sol


def reachability_threshold(dtype: torch.dtype) -> float:
    """``tau = sqrt(eps)`` of ``dtype``: the smallest transition that counts for reachability, and how far a
    solved row's sum may be from 1 (see the module docstring)."""
    return torch.finfo(dtype).eps ** 0.5


def propagate(t: Tensor, y_l: Tensor, visible: Tensor) -> Tensor:
    """Harmonic solution ``F_U = (I - T_UU)^-1 T_UL Y_L`` for the hidden rows of ``t``.

    ``t`` is an n x n row-stochastic transition matrix (rows of isolated nodes may be 0), ``y_l`` the
    |L| x C one-hot (or probability) labels of the visible nodes in their original order (rows sum to 1),
    ``visible`` a boolean mask over the n nodes. Returns the |U| x C scores of the hidden nodes in their
    original order. Hidden nodes that are unreachable from the labelled nodes -- no path of transitions
    above :func:`reachability_threshold`, or a solved row that does not sum to 1 within it -- get the
    class prior of the visible nodes, and the other hidden nodes are solved with those rows fixed at
    the prior (see the module docstring).
    """
    hid = ~visible
    t_ul = t[hid][:, visible]
    t_uu = t[hid][:, hid]
    y_l = y_l.to(t.dtype)
    prior = y_l.sum(dim=0) / y_l.sum()
    n_u = t_uu.shape[0]
    tol = reachability_threshold(t.dtype)
    active = reachable_from_labelled(t_ul, t_uu, tol)
    base = t_ul @ y_l
    while True:
        r = active.nonzero().squeeze(1)
        if r.numel() == 0:
            # "+ 0 * t.sum()" keeps the result attached to the graph (zero gradient) when nothing is reachable.
            return prior.expand(n_u, -1) + 0.0 * t.sum()
        rhs = base[r]
        fixed = (~active).nonzero().squeeze(1)
        if fixed.numel():
            rhs = rhs + t_uu[r][:, fixed].sum(dim=1, keepdim=True) * prior
        sol = _solve(t_uu[r][:, r], rhs)
        mass = sol.detach().sum(dim=1)
        bad = ~torch.isfinite(mass) | ((mass - 1).abs() > tol)
        if not bool(bad.any()):
            break
        active[r[bad]] = False
    if r.numel() == n_u:
        return sol
    return (prior.expand(n_u, -1) + 0.0 * t.sum()).index_put((r,), sol)


def check_mask(visible: Tensor, n: int) -> Tensor:
    visible = torch.as_tensor(visible, dtype=torch.bool)
    if visible.ndim != 1 or visible.shape[0] != n:
        raise ValueError(f"visible must be a boolean mask of length {n}, got shape {tuple(visible.shape)}")
    if not bool(visible.any()):
        raise ValueError("no node is visible: label propagation needs at least one labelled node")
    if bool(visible.all()):
        raise ValueError("no node is hidden: label propagation needs at least one node to score")
    return visible


def label_propagation(
    embeddings: Tensor,
    labels: Tensor,
    visible: Tensor,
    sigma: float | Tensor,
    num_classes: int,
    k: int | None = None,
    *,
    authors_eps: bool = False,
    edge_scale: Tensor | None = None,
) -> Tensor:
    """Propagated label scores of the hidden rows of a batch.

    Args:
        embeddings: n x d document embeddings (any float dtype; computed in that dtype).
        labels: n integer class ids in ``[0, num_classes)`` (only the visible ones are read).
        visible: boolean mask over the n rows; True = label known.
        sigma: Gaussian kernel width (> 0).
        num_classes: number of classes C.
        k: keep each node's k strongest edges before symmetrising; ``None`` = dense graph.
        authors_eps: treat isolated nodes as the authors' code does (see :func:`transition_matrix`).
        edge_scale: optional n x n multiplier applied to the kernel weights (e.g. to down-weight
            edges to nodes from outside the batch).

    Returns:
        |U| x C tensor: for each hidden row (in original order) its propagated class scores, a row
        that sums to 1. A node unreachable from the labelled set (no path of non-zero weights, or
        links too weak for the dtype; see the module docstring) gets the visible nodes' class prior.

    Example:
        >>> import torch
        >>> from gloss_ray.losses import label_propagation
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], dtype=torch.float64)
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> vis = torch.tensor([True, False, True, False])
        >>> label_propagation(x, y, vis, sigma=0.3, num_classes=2).argmax(dim=1).tolist()
        [0, 1]
    """
    n = embeddings.shape[0]
    visible = check_mask(visible, n).to(embeddings.device)
    if float(sigma) <= 0:
        raise ValueError(f"sigma must be > 0, got {float(sigma)}")
    x = l2_normalise(embeddings)
    # Order nodes as [labelled; hidden] like the authors' code, so that reductions run in the same order.
    order = torch.cat([visible.nonzero().squeeze(1), (~visible).nonzero().squeeze(1)])
    x = x[order]
    n_l = int(visible.sum())
    vis_sorted = torch.zeros(n, dtype=torch.bool, device=x.device)
    vis_sorted[:n_l] = True
    w = gaussian_affinity(x, sigma, k)
    if edge_scale is not None:
        w = w * edge_scale[order][:, order]
    t = transition_matrix(w, authors_eps=authors_eps)
    y_l = F.one_hot(labels.to(x.device)[visible].long(), num_classes).to(x.dtype)
    return propagate(t, y_l, vis_sorted)
