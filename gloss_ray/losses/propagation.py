"""Closed-form label propagation on a Gaussian-kernel batch graph (Zhu & Ghahramani, 2002).

The graph and the transition matrix follow the G-Loss authors' published code:

    x_i  <- x_i / ||x_i||                                   (L2-normalise)
    W_ij  = exp(-||x_i - x_j||^2 / (2 sigma^2)),  W_ii = 0  (Gaussian kernel, no self loops)
    W     <- top-k per row (optional), then A = W + W^T     (symmetrise)
    A_hat = D^-1/2 A D^-1/2                                 (symmetric normalisation)
    T     = A_hat / column sums, then / row sums            (transition matrix)
    F_U   = (I - T_UU)^-1 T_UL Y_L                          (harmonic solution for hidden nodes U)

Everything here is plain PyTorch and differentiable with respect to the embeddings.

Degenerate graphs. With a tiny sigma every kernel weight underflows to 0, and top-k can cut a
hidden node off from every labelled node. A hidden node with no path to a labelled node has no
harmonic solution (``I - T_UU`` is singular on its component); such rows receive the **class
prior of the visible nodes** (the fraction of visible nodes in each class) and carry no gradient.
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


def reachable_from_labelled(t_ul: Tensor, t_uu: Tensor) -> Tensor:
    """Boolean mask of hidden nodes that have a path (in ``T``) to some labelled node."""
    with torch.no_grad():
        reach = (t_ul > 0).any(dim=1)
        step = (t_uu > 0).to(torch.float32)
        while True:
            new = reach | (step @ reach.to(torch.float32) > 0)
            if torch.equal(new, reach):
                return reach
            reach = new


def _solve(t_uu: Tensor, rhs: Tensor, prior: Tensor) -> Tensor:
    """``(I - T_UU)^-1 rhs``. A hidden group whose links to the labelled nodes are so weak that
    ``I - T_UU`` is singular in floating point (e.g. near-duplicate hidden documents far from every
    labelled one) is solved with a 1e-9 ridge instead of raising; rows that still come out
    non-finite get the class prior."""
    eye = torch.eye(t_uu.shape[0], dtype=t_uu.dtype, device=t_uu.device)
    sol, info = torch.linalg.solve_ex(eye - t_uu, rhs)
    if int(info) != 0:
        sol = torch.linalg.solve_ex((1 + 1e-9) * eye - t_uu, rhs)[0]
        bad = ~torch.isfinite(sol).all(dim=1, keepdim=True)
        sol = torch.where(bad, prior.expand_as(sol), sol)
    return sol


def propagate(t: Tensor, y_l: Tensor, visible: Tensor) -> Tensor:
    """Harmonic solution ``F_U = (I - T_UU)^-1 T_UL Y_L`` for the hidden rows of ``t``.

    ``t`` is an n x n transition matrix, ``y_l`` the |L| x C one-hot (or soft) labels of the
    visible nodes in their original order, ``visible`` a boolean mask over the n nodes. Returns the
    |U| x C scores of the hidden nodes in their original order. Hidden nodes with no path to a
    labelled node get the class prior of the visible nodes.
    """
    hid = ~visible
    t_ul = t[hid][:, visible]
    t_uu = t[hid][:, hid]
    reach = reachable_from_labelled(t_ul, t_uu)
    prior = (y_l.sum(dim=0) / y_l.sum()).to(t.dtype)
    n_u = t_uu.shape[0]
    if bool(reach.all()):
        return _solve(t_uu, t_ul @ y_l.to(t.dtype), prior)
    # "+ 0 * t.sum()" keeps the result attached to the graph (zero gradient) when nothing is reachable.
    out = prior.expand(n_u, -1) + 0.0 * t.sum()
    if bool(reach.any()):
        r = reach.nonzero().squeeze(1)
        sub = _solve(t_uu[r][:, r], t_ul[r] @ y_l.to(t.dtype), prior)
        out = out.index_put((r,), sub)
    return out


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
        |U| x C tensor: for each hidden row (in original order) its propagated class scores. For a
        hidden node connected to the labelled set the row sums to 1; a node with no path to any
        labelled node gets the visible nodes' class prior.

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
