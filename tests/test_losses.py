"""G-Loss maths: label propagation, the two loss variants, masks, and their edge cases."""
import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import gloss_ray.losses.contrastive
import gloss_ray.losses.cross_entropy
import gloss_ray.losses.gloss
import gloss_ray.losses.propagation
import gloss_ray.losses.supcon
import gloss_ray.losses.triplet
from gloss_ray.losses import GLoss, combined_objective, label_propagation, stratified_mask, transition_matrix
from gloss_ray.losses.gloss import random_mask, visible_count
from gloss_ray.losses.propagation import gaussian_affinity, propagate

D = torch.float64


def _batch(n=12, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=D)
    y = torch.arange(n) % c
    vis = torch.zeros(n, dtype=torch.bool)
    vis[torch.randperm(n, generator=g)[: (2 * n) // 3]] = True
    return x, y, vis


def test_closed_form_equals_iterative_fixed_point():
    x, y, vis = _batch(n=20, c=4)
    f_u = label_propagation(x, y, vis, sigma=0.8, num_classes=4)
    xn = F.normalize(x, dim=1)
    t = transition_matrix(gaussian_affinity(xn, 0.8))
    y_l = F.one_hot(y, 4).to(D)
    f = torch.zeros(20, 4, dtype=D)
    f[vis] = y_l[vis]
    for _ in range(20000):
        f = t @ f
        f[vis] = y_l[vis]
    torch.testing.assert_close(f_u, f[~vis], rtol=0, atol=1e-8)


def test_path_graph_random_walk_by_hand():
    # 0 - 1 - 2 - 3, ends labelled A and B, random-walk transitions: f1 = 2/3, f2 = 1/3.
    t = torch.tensor([[0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5], [0, 0, 1, 0]], dtype=D)
    vis = torch.tensor([True, False, False, True])
    y_l = torch.tensor([[1, 0], [0, 1]], dtype=D)
    torch.testing.assert_close(propagate(t, y_l, vis), torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]], dtype=D))


def test_four_points_on_an_arc_match_the_hand_derived_path_graph():
    # Points at angles 0, th, 2th, 3th: with sigma small enough only neighbours on the arc connect
    # (second neighbours weigh e^-40 / e^-10 ~ 1e-13 as much), i.e. a path graph. With the
    # authors' normalisation (A_hat by columns, then rows) the hand derivation gives
    # T_10 = T_23 = 1/sqrt2, T_12 = T_21 = 1 - 1/sqrt2, hence f1 = 1 / (2 - 1/sqrt2), f2 = 1 - f1.
    th = 0.1
    x = torch.tensor([[math.cos(i * th), math.sin(i * th)] for i in range(4)], dtype=D)
    adjacent_sq = 2 - 2 * math.cos(th)
    sigma = math.sqrt(adjacent_sq / 20)  # exponent -10 for neighbours
    vis = torch.tensor([True, False, False, True])
    f_u = label_propagation(x, torch.tensor([0, 0, 1, 1]), vis, sigma, num_classes=2)
    f1 = 1 / (2 - 1 / math.sqrt(2))
    torch.testing.assert_close(f_u, torch.tensor([[f1, 1 - f1], [1 - f1, f1]], dtype=D), rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", ["nll", "paper"])
def test_gradcheck_wrt_embeddings(variant):
    x, y, vis = _batch(n=8, d=3, c=2, seed=1)
    loss = GLoss(num_classes=2, sigma=0.7, variant=variant)
    x = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: loss(e, y, vis), (x,), eps=1e-6, atol=1e-6)


def test_gradcheck_with_top_k():
    x, y, vis = _batch(n=8, d=3, c=2, seed=2)
    loss = GLoss(num_classes=2, sigma=0.7, k=3)
    x = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: loss(e, y, vis), (x,), eps=1e-6, atol=1e-6)


def test_k_n_minus_1_equals_dense():
    x, y, vis = _batch(n=10)
    dense = label_propagation(x, y, vis, 0.6, 3)
    full_k = label_propagation(x, y, vis, 0.6, 3, k=9)
    torch.testing.assert_close(dense, full_k, rtol=0, atol=1e-12)


def test_top_k_changes_the_graph():
    x, y, vis = _batch(n=16)
    assert not torch.allclose(label_propagation(x, y, vis, 0.6, 3), label_propagation(x, y, vis, 0.6, 3, k=2))


@pytest.mark.parametrize("variant", ["nll", "paper"])
def test_permuting_batch_and_mask_keeps_loss(variant):
    x, y, vis = _batch(n=14)
    loss = GLoss(num_classes=3, sigma=0.6, variant=variant)
    perm = torch.randperm(14, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss(x, y, vis), loss(x[perm], y[perm], vis[perm]), rtol=0, atol=1e-12)


def _authors_formula(emb, labels, vis, sigma, num_classes, class_weights):
    """Independent float64 re-derivation of the authors' published G-Loss computation:
    labelled rows first, Gaussian kernel, A = W + W^T, D^-1/2 A D^-1/2 with NaN/inf -> 1e-10,
    column- then row-normalised transition matrix, closed-form solve, weighted CE on the raw
    scores as logits, divided by |U|."""
    lab, hid = emb[vis], emb[~vis]
    e = torch.cat((lab, hid), dim=0)
    e = e / e.norm(dim=1, keepdim=True)
    w = torch.exp(-(torch.cdist(e, e, p=2) ** 2) / (2 * sigma**2))
    w = w - torch.diag(torch.diag(w))
    a = w + w.t()
    dinv = torch.diag(torch.pow(torch.sum(a, dim=1), -0.5))
    a = a.mm(dinv).transpose(0, 1).mm(dinv)
    a = torch.where(torch.isnan(a), torch.tensor(1e-10, dtype=D), a)
    a = torch.where(torch.isinf(a), torch.tensor(1e-10, dtype=D), a)
    t = a / a.sum(dim=0, keepdim=True)
    t = t / t.sum(dim=1, keepdim=True)
    n_l = lab.shape[0]
    y_l = torch.zeros(n_l, num_classes, dtype=D)
    y_l[torch.arange(n_l), labels[vis]] = 1
    t_uu, t_ul = t[n_l:, n_l:], t[n_l:, :n_l]
    f_u = torch.linalg.solve(torch.eye(t_uu.shape[0], dtype=D) - t_uu, t_ul.mm(y_l))
    y_u = labels[~vis]
    return F.cross_entropy(f_u, y_u, weight=class_weights) / len(y_u)


def test_paper_variant_matches_authors_formula():
    x, y, vis = _batch(n=32, d=16, c=4, seed=4)
    cw = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=D)
    ours = GLoss(num_classes=4, sigma=0.4, variant="paper", class_weights=cw)(x, y, vis)
    ref = _authors_formula(x, y, vis, 0.4, 4, cw)
    assert torch.equal(ours, ref), (ours - ref).item()  # bit for bit


def test_nll_variant_is_weighted_mean_nll_of_row_normalised_scores():
    x, y, vis = _batch(n=20, c=4, seed=5)
    cw = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=D)
    f_u = label_propagation(x, y, vis, 0.5, 4)
    p = f_u / f_u.sum(1, keepdim=True)
    y_u = y[~vis]
    expected = (cw[y_u] * -torch.log(p[torch.arange(len(y_u)), y_u])).sum() / cw[y_u].sum()
    torch.testing.assert_close(GLoss(4, sigma=0.5, class_weights=cw)(x, y, vis), expected)


def test_nll_variant_does_not_scale_with_batch_size():
    x, y, vis = _batch(n=12, c=3, seed=6)
    loss = GLoss(3, sigma=0.5)
    big = loss(torch.cat([x, x + 1e-3]), torch.cat([y, y]), torch.cat([vis, vis]))
    assert abs(big.item() - loss(x, y, vis).item()) < 0.5 * loss(x, y, vis).item()


@pytest.mark.parametrize("variant", ["nll", "paper"])
@pytest.mark.parametrize("sigma", [1e-4, 1e-3])
def test_tiny_sigma_is_finite(variant, sigma):
    x, y, vis = _batch(n=16, seed=7)
    x = x.clone().requires_grad_(True)
    loss = GLoss(3, sigma=sigma, variant=variant)(x, y, vis)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_unreachable_hidden_nodes_get_the_class_prior():
    # sigma so small that every kernel weight underflows to 0: no hidden node reaches a label.
    x, y, vis = _batch(n=10, seed=8)
    f_u = label_propagation(x, y, vis, 1e-4, 3)
    prior = torch.bincount(y[vis], minlength=3).to(D) / vis.sum()
    torch.testing.assert_close(f_u, prior.expand_as(f_u))


def test_top_k_cut_component_gets_prior_and_others_propagate():
    # Two labelled points near each other, two hidden points far away and near each other:
    # with k=1 the hidden pair only links to itself.
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.0], [-0.99, 0.14], [0.98, -0.2]], dtype=D)
    y = torch.tensor([0, 1, 0, 1, 0])
    vis = torch.tensor([True, True, False, False, False])
    f_u = label_propagation(x, y, vis, 0.5, 2, k=1)
    torch.testing.assert_close(f_u[:2], torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=D))
    assert torch.isclose(f_u[2].sum(), torch.tensor(1.0, dtype=D)) and f_u[2, 0] > 0.5


def test_single_class_batch_is_finite():
    x, _, vis = _batch(n=10)
    y = torch.zeros(10, dtype=torch.long)
    for variant in ("nll", "paper"):
        assert torch.isfinite(GLoss(3, sigma=0.5, variant=variant)(x, y, vis))


def test_class_with_single_member_is_finite():
    x, y, vis = _batch(n=10)
    y = y.clone()
    y[0] = 4  # only member of class 4
    vis = vis.clone()
    vis[0] = False  # and hidden: nothing can propagate its label
    loss = GLoss(5, sigma=0.5)(x, y, vis)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("gamma", [0.01, 0.99])
def test_extreme_gamma_still_has_both_sides(gamma):
    x, y, _ = _batch(n=32)
    loss = GLoss(3, sigma=0.5, gamma=gamma)
    vis = loss.sample_mask(y, torch.Generator().manual_seed(0))
    assert 0 < vis.sum() < 32
    assert torch.isfinite(loss(x, y, vis))


@pytest.mark.parametrize("vis", [torch.zeros(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool)])
def test_mask_without_visible_or_hidden_nodes_raises(vis):
    x, y, _ = _batch(n=6)
    with pytest.raises(ValueError, match="visible|hidden"):
        GLoss(3, sigma=0.5)(x, y, vis)


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.1])
def test_gamma_outside_open_interval_raises(gamma):
    with pytest.raises(ValueError, match="gamma"):
        GLoss(3, gamma=gamma)


def test_random_mask_matches_authors_count():
    for n in (5, 32, 128):
        assert int(random_mask(n, 0.7, torch.Generator().manual_seed(0)).sum()) == math.ceil(n * 0.7)
    assert visible_count(128, 0.7) == 90


def test_stratified_mask_keeps_a_visible_and_a_hidden_member_per_class():
    y = torch.tensor([0] * 2 + [1] * 7 + [2] * 1 + [3] * 20)
    for seed in range(20):
        vis = stratified_mask(y, 0.9, torch.Generator().manual_seed(seed))
        for c in (0, 1, 3):
            assert vis[y == c].any() and (~vis[y == c]).any()
        assert vis[y == 2].all()


def test_extra_labelled_nodes_none_equals_batch_loss():
    x, y, vis = _batch(n=12)
    loss = GLoss(3, sigma=0.5)
    empty = torch.zeros(0, x.shape[1], dtype=D)
    torch.testing.assert_close(loss(x, y, vis), loss(x, y, vis, extra_embeddings=empty, extra_labels=torch.zeros(0)))


def test_extra_labelled_nodes_change_the_loss_but_not_the_gradient_path():
    x, y, vis = _batch(n=12)
    extra = torch.randn(5, x.shape[1], dtype=D, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    out = GLoss(3, sigma=0.5)(xg, y, vis, extra_embeddings=extra, extra_labels=torch.tensor([0, 1, 2, 0, 1]), extra_edge_weight=0.5)
    out.backward()
    assert extra.grad is None and torch.isfinite(xg.grad).all()
    assert not torch.isclose(out, GLoss(3, sigma=0.5)(x, y, vis))


def test_combined_objective_parts():
    obj = combined_objective(torch.tensor(1.0), torch.tensor(3.0), lam=0.3)
    assert obj.total.item() == pytest.approx(0.7 * 1.0 + 0.3 * 3.0)
    assert obj.ce.item() == 1.0 and obj.aux.item() == 3.0
    with pytest.raises(ValueError, match="lambda"):
        combined_objective(torch.tensor(1.0), torch.tensor(1.0), lam=1.5)


@pytest.mark.parametrize(
    "module",
    [gloss_ray.losses.propagation, gloss_ray.losses.gloss, gloss_ray.losses.supcon, gloss_ray.losses.triplet,
     gloss_ray.losses.contrastive, gloss_ray.losses.cross_entropy],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_near_singular_hidden_group_does_not_raise():
    # Labelled points near (1, 0) and (0, 1); a tight group of hidden near-duplicates far from both, whose
    # links to the labelled nodes are ~1e-100 of their links to each other: I - T_UU is singular in float64.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.02, 1.0], [-1.0, 0.6 - 1e-9], [-1.0, 0.6], [-1.0, 0.6 + 1e-9]],
                     dtype=D, requires_grad=True)
    y = torch.tensor([0, 1, 1, 1, 0, 0])
    vis = torch.tensor([True, True, True, False, False, False])
    t = transition_matrix(gaussian_affinity(F.normalize(x.detach(), dim=1), 0.05))
    assert (t[3:, :3] > 0).any() and t[3:, :3].max() < 1e-50  # linked, but only by tiny transitions
    loss = GLoss(2, sigma=0.05)(x, y, vis)
    loss.backward()
    # the group is unreachable: every row is the visible nodes' class prior (1/3, 2/3), with no gradient
    prior = torch.tensor([1 / 3, 2 / 3], dtype=D)
    torch.testing.assert_close(label_propagation(x.detach(), y, vis, 0.05, 2), prior.expand(3, 2), rtol=0, atol=0)
    torch.testing.assert_close(loss.detach(), -(prior[1].log() + 2 * prior[0].log()) / 3, rtol=0, atol=1e-15)
    assert torch.isfinite(x.grad).all() and not x.grad[3:].any()


# A toy graph: labelled clusters around e1 (class 0) and e2 (class 1), a hidden near-duplicate pair around e3
# (squared distance ~2 from every labelled node). With sigma below ~0.2 the pair's links to the labelled
# nodes are < 1e-11 of its inner link; below ~0.037 they underflow to 0.
TOY_X = torch.tensor([[1.0, 0, 0], [1, 0.05, 0], [0, 1, 0], [0.05, 1, 0], [0, 0, 1], [0, 0.001, 1]], dtype=D)
TOY_Y = torch.tensor([0, 0, 1, 1, 0, 0])
TOY_VIS = torch.tensor([True, True, True, True, False, False])


@pytest.mark.parametrize("sigma", [0.15, 0.1, 0.06, 0.04])
def test_near_singular_hidden_group_gets_exactly_the_class_prior(sigma):
    # links of 1e-20 .. 1e-270: positive, so the group is reachable through the graph's support, but float64
    # cannot resolve I - T_UU on it (before: rows of 1e-35 .. 1e-262, or rows off by 1e-4).
    f_u = label_propagation(TOY_X, TOY_Y, TOY_VIS, sigma, 2)
    torch.testing.assert_close(f_u, torch.full((2, 2), 0.5, dtype=D), rtol=0, atol=0)


def test_loss_is_continuous_in_sigma_when_a_hidden_group_drifts_away():
    # Before: 0.70 (sigma 0.2) -> 18.42 (the maximal penalty, sigma 0.12 .. 0.037) -> 0.69 (underflow).
    sigmas = torch.linspace(0.6, 0.02, 581).tolist()
    losses = torch.tensor([GLoss(2, sigma=s)(TOY_X, TOY_Y, TOY_VIS).item() for s in sigmas])
    assert (losses[1:] - losses[:-1]).abs().max() < 0.01
    assert losses.max() < 0.7


# cont.py of the 2026-12-07 review: the toy graph, but the hidden pair leans towards the class-1 cluster, so
# its harmonic solution (~[0.0002, 0.9998] at sigma 0.193) is far from the prior [0.5, 0.5].
LEAN_X = torch.tensor([[1.0, 0, 0], [1, 0.05, 0], [0, 1, 0], [0.05, 1, 0], [0, 0.35, 1], [0, 0.351, 1]], dtype=D)
LEAN_Y = torch.tensor([0, 0, 1, 1, 1, 1])


def test_loss_is_continuous_in_sigma_when_an_asymmetric_hidden_group_drifts_away():
    # Before: 0.0002 at sigma 0.193, 0.6931 at 0.192 (the pair's bottleneck crossed sqrt(eps): harmonic -> prior).
    # The pair's share of its harmonic solution is a smoothstep in log(bottleneck) over log(tau/lo) = 9.0 (max
    # slope 1.5/9.0 = 0.17), and its links to the class-1 nodes (squared distance 1.34) change log(bottleneck) by
    # 1.34 * d(1/(2 sigma^2)) <= 0.31 per 0.001 step of sigma where the blend happens (sigma >= 0.155): the share
    # moves by <= 0.052 per step, and so does the loss (-log of a probability >= 0.5). Tolerance: twice that.
    sigmas = torch.linspace(0.6, 0.02, 581).tolist()
    losses = torch.tensor([GLoss(2, sigma=s)(LEAN_X, LEAN_Y, TOY_VIS).item() for s in sigmas])
    assert losses.min() < 0.001 and losses[-1] == pytest.approx(math.log(2), abs=1e-15)  # harmonic ... prior
    assert (losses[1:] - losses[:-1]).abs().max() < 0.1


def _asymmetric_graph(seed, pairs=3, group=3, dim=3):
    """Labelled pairs (every node has a close partner, so no degree underflows on the sigma range used), a
    tight hidden group at squared distance > 0.4 from them, and a hidden node beside the first pair. Returns
    ``x, y, visible`` and the group's smallest squared distance to another node."""
    g = torch.Generator().manual_seed(seed)
    while True:
        cen = F.normalize(torch.randn(pairs + 1, dim, generator=g, dtype=D), dim=1)
        d2 = ((cen[-1] - cen[:-1]) ** 2).sum(1)
        if d2.min() > 0.4 and torch.pdist(cen[:-1]).min() > 0.5:
            break
    lab = torch.cat([F.normalize(c + 0.08 * torch.randn(2, dim, generator=g, dtype=D), dim=1) for c in cen[:-1]])
    grp = cen[-1] + 1e-3 * torch.randn(group, dim, generator=g, dtype=D)
    near = F.normalize(lab[0] + 0.08 * torch.randn(1, dim, generator=g, dtype=D), dim=1)
    cls = torch.randperm(pairs, generator=g) % 2
    y = torch.cat([cls.repeat_interleave(2), torch.zeros(group + 1, dtype=torch.long)])
    return torch.cat([lab, grp, near]), y, torch.arange(2 * pairs + group + 1) < 2 * pairs, float(d2.min())


@pytest.mark.parametrize("seed", [0, 2, 4])
def test_propagation_is_continuous_in_sigma_on_random_asymmetric_graphs(seed):
    # sigma on a grid uniform in s = 1/(2 sigma^2), from where the hidden group is well linked (bottleneck
    # ~exp(-5.4) >> tau = sqrt(eps)) to where it is cut off (~exp(-40.5) << lo = eps^(3/4)). A step moves the
    # log of the group's kernel weight to its nearest other node by d2 * ds = delta. The share of its harmonic
    # solution a node keeps is a smoothstep in log(bottleneck) over log(tau/lo) (max slope 1.5/log(tau/lo)), so
    # it moves by <= 1.5 * delta / log(tau/lo) = 0.033 per step, and the rows (probabilities) by no more.
    # Tolerance: twice that (the normalisations in T also move the bottleneck a little). The old rule switched
    # the group's rows from the harmonic solution to the prior in one step: a jump >= 0.25 here (checked).
    x, y, vis, d2 = _asymmetric_graph(seed)
    eps = torch.finfo(D).eps
    delta = 0.2
    s = torch.arange(0.3 * 0.5 * math.log(1 / eps) / d2, 1.5 * 0.75 * math.log(1 / eps) / d2, delta / d2, dtype=D)
    f_u = torch.stack([label_propagation(x, y, vis, float((1 / (2 * v)).sqrt()), 2) for v in s])
    prior = F.one_hot(y[vis], 2).to(D).mean(0)
    assert (f_u[0, :3] - prior).abs().max() > 0.25 and torch.equal(f_u[-1, :3], prior.expand(3, 2))
    tau, lo = eps ** 0.5, eps ** 0.75  # full harmonic solution at or above, exactly the prior at or below
    assert (f_u[1:] - f_u[:-1]).abs().max() < 2 * 1.5 * delta / math.log(tau / lo)


def _reference_transition(x, sigma):
    """Independent float64 transition matrix (dense graph), written from the module docstring's formulas."""
    x = x.double() / x.double().norm(dim=1, keepdim=True)
    w = torch.exp(-((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))
    w.fill_diagonal_(0)
    a = w + w.T
    deg = a.sum(1)
    a_hat = a / torch.sqrt(deg[:, None] * deg[None, :])
    t = a_hat / a_hat.sum(0, keepdim=True)
    return t / t.sum(1, keepdim=True)


def test_reachable_nodes_beside_a_near_singular_group_keep_their_closed_form_and_gradient():
    # The toy graph plus a hidden node near e1, which reaches the labelled nodes well: it gets the harmonic
    # solution with the unreachable pair fixed at the prior, (I - T_GG)^-1 (T_GL Y_L + T_GB prior).
    x = torch.cat([TOY_X, torch.tensor([[1.0, -0.1, 0.05]], dtype=D)])
    y = torch.cat([TOY_Y, torch.tensor([0])])
    vis = torch.cat([TOY_VIS, torch.tensor([False])])
    sigma = 0.1
    f_u = label_propagation(x, y, vis, sigma, 2)
    t = _reference_transition(x, sigma)
    prior = torch.tensor([0.5, 0.5], dtype=D)
    g, b, lab = [6], [4, 5], [0, 1, 2, 3]
    y_l = F.one_hot(y[lab], 2).to(D)
    rhs = t[g][:, lab] @ y_l + t[g][:, b].sum(1, keepdim=True) * prior
    f_g = torch.linalg.solve(torch.eye(1, dtype=D) - t[g][:, g], rhs)
    torch.testing.assert_close(f_u[2:], f_g, rtol=0, atol=1e-12)
    torch.testing.assert_close(f_u[:2], prior.expand(2, 2), rtol=0, atol=0)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: GLoss(2, sigma=sigma)(e, y, vis), (xg,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [None, 3, 7])
def test_closed_form_matches_an_independent_float64_implementation(k):
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(20):
        n, c = int(torch.randint(8, 40, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
        x = torch.randn(n, 8, generator=g, dtype=D)
        y = torch.randint(0, c, (n,), generator=g)
        vis = torch.rand(n, generator=g) < 0.6
        vis[0], vis[1] = True, False
        sigma = float(torch.empty(1).uniform_(0.3, 1.5, generator=g))
        xn = x / x.norm(dim=1, keepdim=True)
        w = torch.exp(-((xn[:, None, :] - xn[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))
        w.fill_diagonal_(0)
        if k is not None:  # keep each row's k strongest edges
            keep = torch.zeros_like(w)
            for i in range(n):
                s = w[i].clone()
                s[i] = -1
                keep[i, torch.argsort(s, descending=True)[:k]] = 1
            w = w * keep
        a = w + w.T
        deg = a.sum(1)
        a_hat = a / torch.sqrt(deg[:, None] * deg[None, :])
        t = a_hat / a_hat.sum(0, keepdim=True)
        t = t / t.sum(1, keepdim=True)
        u, lab = (~vis).nonzero().squeeze(1), vis.nonzero().squeeze(1)
        ref = torch.linalg.solve(torch.eye(len(u), dtype=D) - t[u][:, u], t[u][:, lab] @ F.one_hot(y[lab], c).to(D))
        worst = max(worst, (label_propagation(x, y, vis, sigma, c, k) - ref).abs().max().item())
    assert worst < 1e-12


def test_float32_propagation_is_not_mistaken_for_unreachable():
    x, y, vis = _batch(n=64, d=16, c=4, seed=5)
    f64 = label_propagation(x, y, vis, 0.5, 4)
    f32 = label_propagation(x.float(), y, vis, 0.5, 4)
    torch.testing.assert_close(f32.double(), f64, rtol=0, atol=1e-5)
