"""Closed-form label propagation on a Gaussian-kernel batch graph (Zhu & Ghahramani, 2002).

The graph and the transition matrix follow the G-Loss authors' published code:

    x_i  <- x_i / ||x_i||                                   (L2-normalise)
    W_ij  = exp(-||x_i - x_j||^2 / (2 sigma^2)),  W_ii = 0  (Gaussian kernel, no self loops)
    W     <- top-k per row (optional), then A = W + W^T     (symmetrise)
    A_hat = D^-1/2 A D^-1/2                                 (symmetric normalisation)
    T     = A_hat / column sums, then / row sums            (transition matrix)
    F_U   = (I - T_UU)^-1 T_UL Y_L                          (harmonic solution for hidden nodes U)

Everything here is plain PyTorch and differentiable with respect to the embeddings.

Weakly linked and unreachable hidden nodes. How well a hidden node is linked to the labelled nodes is
measured on the transition matrix ``T`` by its **bottleneck** ``b``: over all paths from it to a labelled
node, the largest value of the path's weakest transition (0 when no path of non-zero transitions exists:
with a tiny sigma every kernel weight underflows to 0; top-k can cut a group off). Two thresholds of the
computation dtype bound the rule:

* ``b >= tau = sqrt(eps)`` (1.5e-8 in float64, 3.5e-4 in float32): the node is solved as it is.
* ``b <= lo = eps^(3/4)`` (1.8e-12 in float64, 6.4e-6 in float32): the node gets the **class prior of the
  visible nodes** (the fraction of visible nodes in each class, extra labelled nodes included) as its row
  of ``F_U``, exactly, with no gradient. ``I - T_UU`` cannot be solved accurately for such a node's group
  (e.g. a tight group of hidden near-duplicates far from every labelled node): an escape probability ``p``
  leaves about ``eps / p`` of error, and below ~``eps`` the solve returns rows of 1e-35 or 1e40.
* In between, the random walk leaks to the prior: at each step at that node it stops with probability
  ``kappa(b)`` and takes the prior, and moves along ``T`` otherwise. ``kappa`` rises continuously from 0 at
  ``tau`` to 1 at ``lo``; it is chosen so that a node whose escape probability is ``b`` keeps the share
  ``w = 1 - smoothstep(log(tau/b) / log(tau/lo))`` of its harmonic solution (``kappa/(1-kappa) = b(1-w)/w``),
  so the rows pass smoothly from the harmonic solution to the prior over ``log(tau/lo)``, and the leak keeps
  the system's escape probability at about ``b/w >= b``. ``kappa`` is a constant for the gradient.

With ``K = diag(kappa)`` over the nodes ``G`` with ``b > lo`` and ``B`` the nodes fixed at the prior,
``F_G = (I - (I-K) T_GG)^-1 ((I-K)(T_GL Y_L + T_GB prior) + K prior)``; for ``kappa = 0`` this is the
harmonic solution with the rows of ``B`` as fixed boundary values. Every row of this ``F_G`` sums to 1 in
exact arithmetic; the solved rows are divided by their sums, which removes the rounding error of a near-
singular solve (it scales a weakly linked group's rows, not their direction). As ``kappa`` and the
system are continuous in ``T``, so are ``F_U`` and the loss -- in sigma too, for a dense graph and as long
as no node's degree falls below the isolation limit of :func:`transition_matrix` (top-k changes ``T`` by
steps when the k-th neighbour changes; isolating a node drops its column, which the column normalisation
keeps at O(1) up to then). As a last guard, a solved row that is not finite
or whose sum is off 1 by more than ``eps^(1/4)`` also marks its node as fixed at the prior, and the rest
is solved again.
"""
from __future__ import annotations

import math

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


def bottleneck_to_labelled(t_ul: Tensor, t_uu: Tensor) -> Tensor:
    """For each hidden node, the widest-path bottleneck to the labelled nodes: the largest ``b`` such that
    a path of transitions ``T_ij >= b`` leads from it to some labelled node (0 if no path of non-zero
    transitions does). ``t_ul``: |U| x |L| transitions to the labelled nodes, ``t_uu``: |U| x |U|. No
    gradient."""
    with torch.no_grad():
        if t_ul.shape[1] == 0:
            return torch.zeros(t_uu.shape[0], dtype=t_uu.dtype, device=t_uu.device)
        b = t_ul.max(dim=1).values
        while True:  # b only takes values of entries of T and never decreases: at most |U| + 1 rounds
            new = torch.maximum(b, torch.minimum(t_uu, b[None, :]).max(dim=1).values) if b.numel() else b
            if torch.equal(new, b):
                return b
            b = new


def _solve(t_uu: Tensor, rhs: Tensor) -> Tensor:
    """``(I - T_UU)^-1 rhs``; where ``I - T_UU`` is exactly singular in floating point, the solution with a
    1e-9 ridge (its rows of nodes the plain system cannot resolve are then far from summing to 1)."""
    eye = torch.eye(t_uu.shape[0], dtype=t_uu.dtype, device=t_uu.device)
    sol, info = torch.linalg.solve_ex(eye - t_uu, rhs)
    if int(info) != 0:
        sol = torch.linalg.solve_ex((1 + 1e-9) * eye - t_uu, rhs)[0]
    return sol


def reachability_threshold(dtype: torch.dtype) -> float:
    """``tau = sqrt(eps)`` of ``dtype``: a hidden node whose bottleneck to the labelled nodes is at least
    this is solved as it is (see the module docstring)."""
    return torch.finfo(dtype).eps ** 0.5


def prior_threshold(dtype: torch.dtype) -> float:
    """``lo = eps^(3/4)`` of ``dtype``: a hidden node whose bottleneck to the labelled nodes is at most
    this gets exactly the class prior (see the module docstring)."""
    return torch.finfo(dtype).eps ** 0.75


def prior_leak(b: Tensor) -> Tensor:
    """Per hidden node, the probability ``kappa`` that the walk stops at it and takes the class prior, from
    its bottleneck ``b`` (see the module docstring): 0 for ``b >= tau``, 1 for ``b <= lo``, and in between
    ``kappa / (1 - kappa) = b (1 - w) / w`` with ``w = 1 - smoothstep(log(tau / b) / log(tau / lo))``.
    Continuous and non-increasing in ``b``; no gradient."""
    with torch.no_grad():
        tau, lo = reachability_threshold(b.dtype), prior_threshold(b.dtype)
        u = ((math.log(tau) - b.log()) / math.log(tau / lo)).clamp(0.0, 1.0)  # b = 0: log = -inf, u = 1
        w = 1 - u * u * (3 - 2 * u)
        r = b * (1 - w) / torch.where(w > 0, w, torch.ones_like(w))
        return torch.where(w > 0, r / (1 + r), torch.ones_like(w))


def propagate(t: Tensor, y_l: Tensor, visible: Tensor) -> Tensor:
    """Harmonic solution ``F_U = (I - T_UU)^-1 T_UL Y_L`` for the hidden rows of ``t``, with the rows of
    weakly linked hidden nodes drawn towards the class prior.

    ``t`` is an n x n row-stochastic transition matrix (rows of isolated nodes may be 0), ``y_l`` the
    |L| x C one-hot (or probability) labels of the visible nodes in their original order (rows sum to 1),
    ``visible`` a boolean mask over the n nodes. Returns the |U| x C scores of the hidden nodes in their
    original order, rows summing to 1. A hidden node whose bottleneck to the labelled nodes
    (:func:`bottleneck_to_labelled`) is below :func:`reachability_threshold` leaks to the class prior of the
    visible nodes with probability :func:`prior_leak` at each step of the walk; at or below
    :func:`prior_threshold` (or when its solved row is not finite or far from summing to 1) it gets the
    prior exactly, and the other hidden nodes are solved with its row fixed there (see the module
    docstring).
    """
    hid = ~visible
    t_ul = t[hid][:, visible]
    t_uu = t[hid][:, hid]
    y_l = y_l.to(t.dtype)
    prior = y_l.sum(dim=0) / y_l.sum()
    n_u = t_uu.shape[0]
    kappa = prior_leak(bottleneck_to_labelled(t_ul, t_uu))
    active = kappa < 1
    guard = torch.finfo(t.dtype).eps ** 0.25
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
        t_rr = t_uu[r][:, r]
        leak = kappa[r]
        if bool(leak.any()):
            rhs = (1 - leak)[:, None] * rhs + leak[:, None] * prior
            t_rr = (1 - leak)[:, None] * t_rr
        sol = _solve(t_rr, rhs)
        mass = sol.detach().sum(dim=1)
        bad = ~torch.isfinite(mass) | ((mass - 1).abs() > guard)
        if not bool(bad.any()):
            break
        active[r[bad]] = False
    sol = sol / sol.sum(dim=1, keepdim=True)
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
        links too weak for the dtype) gets the visible nodes' class prior; a weakly linked one a blend of
        its harmonic solution and the prior that is continuous in the graph (see the module docstring).

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
