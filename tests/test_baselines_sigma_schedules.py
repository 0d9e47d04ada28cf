"""Baseline losses, sigma heuristics and schedules."""
import math

import pytest
import torch
import torch.nn.functional as F

from gloss_ray.errors import ConfigError
from gloss_ray.losses import (
    BatchAllTripletLoss, ContrastiveLoss, SigmaStrategy, SupConLoss, WeightedCrossEntropy,
    balanced_class_weights, sigma_dicm, sigma_root,
)
from gloss_ray.schedules import Schedule, int_schedule_value

D = torch.float64
SQUARE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=D)


# --- sigma --------------------------------------------------------------------------------------
def test_root_on_square():
    # 4 adjacent pairs at sqrt2, 2 diagonals at 2: lower median sqrt2 -> sqrt(sqrt2 / 3)
    assert sigma_root(SQUARE) == pytest.approx(math.sqrt(math.sqrt(2) / 3))


def test_dicm_on_square():
    # classes {0deg, 90deg} vs {180deg, 270deg}: nearest inter-class pair at sqrt2
    assert sigma_dicm(SQUARE, torch.tensor([0, 0, 1, 1])) == pytest.approx(math.sqrt(2) / 3)


def test_dicm_skips_zero_distance_between_classes():
    x = torch.cat([SQUARE, SQUARE[:1]])  # a copy of point 0 with another label
    assert sigma_dicm(x, torch.tensor([0, 0, 1, 1, 1])) == pytest.approx(math.sqrt(2) / 3)


def test_dicm_single_class_falls_back_to_median_over_3():
    assert sigma_dicm(SQUARE, torch.zeros(4, dtype=torch.long)) == pytest.approx(math.sqrt(2) / 3)


def test_dicm_all_inter_class_zero_falls_back_to_median():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=D)
    # classes {a0, b0} at the same point, {a1, b1} at another: inter-class distances 0 and sqrt2
    assert sigma_dicm(x, torch.tensor([0, 1, 0, 1])) == pytest.approx(math.sqrt(2) / 3)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    assert sigma_dicm(y, torch.tensor([0, 1])) == 0.0


def test_strategy_parse_and_guard():
    assert SigmaStrategy.parse(0.3).initial() == 0.3
    assert SigmaStrategy.parse("batch-dicm").batch_heuristic == "dicm"
    s = SigmaStrategy.parse({"kind": "root", "value": 0.25})
    assert s.initial(torch.ones(4, 3)) == 0.25  # collapsed embeddings: heuristic 0 -> fallback value
    with pytest.raises(ValueError, match="strategy"):
        SigmaStrategy.parse("median")
    with pytest.raises(ValueError, match="value"):
        SigmaStrategy(kind="fixed")


# --- baselines ----------------------------------------------------------------------------------
def test_supcon_matches_direct_sum():
    torch.manual_seed(0)
    x, y, tau = torch.randn(7, 4, dtype=D), torch.tensor([0, 0, 1, 1, 1, 2, 3]), 0.5
    z = F.normalize(x, dim=1)
    terms = []
    for i in range(7):
        pos = [p for p in range(7) if p != i and y[p] == y[i]]
        if not pos:
            continue
        den = sum(math.exp(z[i] @ z[a] / tau) for a in range(7) if a != i)
        terms.append(-sum(math.log(math.exp(z[i] @ z[p] / tau) / den) for p in pos) / len(pos))
    assert SupConLoss(tau)(x, y).item() == pytest.approx(sum(terms) / len(terms))


def test_supcon_without_positives_is_zero():
    assert SupConLoss()(torch.randn(3, 4), torch.tensor([0, 1, 2])).item() == 0.0


def test_triplet_by_hand():
    # 1-D points: a=0 (c0), p=1 (c0), q=3 (c1). Margin 5: triplets (a,p,q): 1-3+5=3, (p,a,q): 1-2+5=4
    x = torch.tensor([[0.0], [1.0], [3.0]])
    assert BatchAllTripletLoss(margin=5.0)(x, torch.tensor([0, 0, 1])).item() == pytest.approx(3.5)
    assert BatchAllTripletLoss(margin=0.5)(x, torch.tensor([0, 0, 1])).item() == 0.0


def test_triplet_gradient_finite_with_duplicates():
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    BatchAllTripletLoss(margin=1.0)(x, torch.tensor([0, 0, 1])).backward()
    assert torch.isfinite(x.grad).all()


def test_contrastive_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # pairs: (0,1) d=sqrt2 same class -> 2; (0,2) d=0 other class -> (1-0)^2=1; (1,2) d=sqrt2 other -> 0
    assert ContrastiveLoss(margin=1.0)(x, torch.tensor([0, 0, 1])).item() == pytest.approx(0.5 * 3 / 3)


def test_weighted_ce_and_balanced_weights():
    y = torch.tensor([0, 0, 0, 1])
    w = balanced_class_weights(y, 3)
    torch.testing.assert_close(w, torch.tensor([4 / 6, 4 / 2, 0.0]))
    logits = torch.randn(4, 3)
    expected = F.cross_entropy(logits, y, weight=w)
    torch.testing.assert_close(WeightedCrossEntropy(w)(logits, y), expected)


# --- schedules ----------------------------------------------------------------------------------
def test_schedule_shapes():
    assert Schedule(value=0.5)(0.7) == 0.5
    warm = Schedule(kind="linear_warmup", value=1.0, start=0.0, warmup=0.5)
    assert warm(0.25) == pytest.approx(0.5) and warm(0.9) == 1.0
    cos = Schedule(kind="cosine", value=0.0, start=1.0)
    assert cos(0.0) == pytest.approx(1.0) and cos(0.5) == pytest.approx(0.5) and cos(1.0) == pytest.approx(0.0)
    step = Schedule(kind="step", value=8.0, milestones=[0.5, 0.75], factor=0.5)
    assert [step(p) for p in (0.1, 0.5, 0.8)] == [8.0, 4.0, 2.0]


def test_schedule_round_trips_through_dict():
    s = Schedule(kind="step", value=3.0, milestones=[0.3], factor=0.1)
    assert Schedule.parse(s.to_dict()) == s


def test_schedule_shortcuts_and_int_values():
    s = Schedule.parse("linear_warmup", default_value=0.8)
    assert s(0.0) == pytest.approx(0.08) and s(1.0) == 0.8
    assert int_schedule_value(Schedule.parse("step", default_value=16), 0.9) == 4


def test_schedule_rejects_bad_input():
    with pytest.raises(ConfigError, match="kind"):
        Schedule(kind="exp")
    with pytest.raises(ConfigError, match="unknown schedule key"):
        Schedule.parse({"kind": "cosine", "speed": 2})
