"""The training objective of one step: ``(1 - lam) * CE + lam * aux`` on the GLOBAL batch.

An auxiliary loss plugs in through :class:`AuxiliaryLoss` (three methods), so the loop never asks
which loss it runs:

* ``calibrate(sample, device)`` once per run, before the first step (G-Loss's ``root`` / ``dicm``
  sigma from ``sample()``, embeddings and labels of a sample of the corpus, the same on every rank);
  returns what to checkpoint and log (``{"sigma": ...}``), or None;
* ``restore(state)`` on resume, with what ``calibrate`` returned;
* ``__call__(embeddings, labels, ctx)`` on the global batch, with this step's :class:`StepContext`;
* ``sigma_at(scale)`` -- the kernel width a step used, given the schedule's multiplier ``scale``
  (None for losses without one), for the per-step rows and the epoch's history row.

:data:`AUXILIARY` maps a loss name to the function that builds its auxiliary term; ``ce`` has none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .. import distributed as D
from ..config import TrainConfig
from ..losses import (BatchAllTripletLoss, ContrastiveLoss, GLoss, SupConLoss, WeightedCrossEntropy,
                      combined_objective)
from ..losses.gloss import Objective
from ..schedules import Schedule, int_schedule_value

Tensor = torch.Tensor


@dataclass
class StepContext:
    """What a step's auxiliary term may use besides the batch: the sigma multiplier and k of the
    schedules, the seed of G-Loss's visible-node mask (the same on every rank), and the global
    batch's corpus row indices (for the global graph)."""
    sigma_scale: float = 1.0
    k: int | None = None
    mask_seed: int = 0
    batch_index: Tensor | None = None


class AuxiliaryLoss(Protocol):
    def calibrate(self, sample: Callable[[], tuple[Tensor, Tensor]], device) -> dict | None: ...
    def restore(self, state: dict | None) -> None: ...
    def __call__(self, embeddings: Tensor, labels: Tensor, ctx: StepContext) -> Tensor: ...
    def sigma_at(self, scale: float) -> float | None: ...


class EmbeddingLoss:
    """An auxiliary loss that needs only the batch: SCL, triplet, contrastive."""

    def __init__(self, loss: torch.nn.Module):
        self.loss = loss

    def calibrate(self, sample, device) -> None:
        return None

    def restore(self, state) -> None:
        pass

    def __call__(self, embeddings, labels, ctx: StepContext) -> Tensor:
        return self.loss(embeddings, labels)

    def sigma_at(self, scale: float) -> None:
        return None


class GraphLoss:
    """G-Loss, with sigma set once from the corpus (``root`` / ``dicm``, rank 0's value on every
    rank), the schedules' sigma multiplier and k, a mask seeded per step, and optionally the global
    document graph: the batch's nearest corpus documents join its graph as labelled nodes (edge
    weight ``global_weight``), and the bank takes the batch's fresh embeddings."""

    def __init__(self, loss: GLoss, global_graph=None, global_weight: float = 1.0):
        self.loss, self.graph, self.global_weight = loss, global_graph, global_weight
        self.last_sigma = None          # the last batch's sigma, of the per-batch strategies

    def calibrate(self, sample, device) -> dict | None:
        if self.loss.strategy.kind not in ("root", "dicm"):
            return None
        emb, labels = sample()
        sigma = self.loss.calibrate(emb, labels)
        self.loss.use_sigma(D.broadcast_value(sigma, device))
        return {"sigma": self.loss.sigma_value, "kind": self.loss.strategy.kind, "docs": len(labels)}

    def restore(self, state: dict | None) -> None:
        if state and state.get("sigma") is not None:
            self.loss.use_sigma(state["sigma"])

    def __call__(self, embeddings, labels, ctx: StepContext) -> Tensor:
        gen = torch.Generator().manual_seed(ctx.mask_seed)
        sigma = self.loss.current_sigma(embeddings.detach(), labels) * ctx.sigma_scale
        if self.loss.strategy.per_batch:
            self.last_sigma = sigma
        extra = {}
        if self.graph is not None:
            g_idx = D.gather_with_grad(ctx.batch_index)
            ex_emb, ex_lab = self.graph.lookup(g_idx, embeddings.detach())
            extra = dict(extra_embeddings=ex_emb, extra_labels=ex_lab, extra_edge_weight=self.global_weight)
            self.graph.update_online(g_idx, embeddings.detach())
        return self.loss(embeddings, labels, sigma=sigma, k=ctx.k, generator=gen, **extra).float()

    def sigma_at(self, scale: float) -> float | None:
        """A fixed or calibrated sigma times the schedule's ``scale``; with a per-batch strategy,
        the last batch's (already scaled), None before the first."""
        if self.loss.strategy.per_batch:
            return None if self.last_sigma is None else float(self.last_sigma)
        return None if self.loss.sigma_value is None else self.loss.sigma_value * scale


AUXILIARY: dict[str, Callable[..., AuxiliaryLoss]] = {
    "gloss": lambda cfg, C, cw, graph: GraphLoss(
        GLoss(C, sigma=cfg.sigma, gamma=cfg.gamma, k=cfg.k, variant=cfg.variant, mask=cfg.mask, class_weights=cw),
        graph, cfg.global_weight),
    "scl": lambda cfg, C, cw, graph: EmbeddingLoss(SupConLoss(cfg.temperature)),
    "triplet": lambda cfg, C, cw, graph: EmbeddingLoss(BatchAllTripletLoss(cfg.margin_value)),
    "contrastive": lambda cfg, C, cw, graph: EmbeddingLoss(ContrastiveLoss(cfg.margin_value)),
}


def build_auxiliary(cfg: TrainConfig, num_classes: int, class_weights, device, graph=None) -> AuxiliaryLoss | None:
    """The auxiliary term of ``cfg.loss`` on ``device`` (None for plain cross-entropy)."""
    make = AUXILIARY.get(cfg.loss)
    if make is None:
        return None
    aux = make(cfg, num_classes, class_weights, graph)
    aux.loss.to(device)
    return aux


def step_objective(ce_fn: WeightedCrossEntropy, aux: AuxiliaryLoss | None, logits: Tensor, emb: Tensor, y: Tensor,
                   lam: float, ctx: StepContext | None = None) -> tuple[Objective, Tensor]:
    """The loss of one step: ``(Objective for logging, loss to backpropagate)``.

    Both terms are the single-process objective of the GLOBAL batch. CE: the class-weighted sum of
    the local batch over the weight sum of the global batch (summed over workers), so with class
    weights too the workers' parts add up to the global weighted mean. The auxiliary loss sees the
    global batch itself (all workers' embeddings and labels, in rank order, gradient flowing to the
    local part). Each rank's backward term is scaled by the world size: DDP's gradient average then
    equals the gradient of the single-process objective on the global batch.
    """
    _, world = D.rank_and_world()
    ce_sum, ce_weight = ce_fn.terms(logits.float(), y)
    totals = D.all_sum_tensor(torch.stack([ce_sum.detach(), ce_weight.detach()]))
    ce = totals[0] / totals[1]                       # the global batch's weighted mean (logged)
    ce_local = ce_sum / totals[1]                    # this worker's share of it (backpropagated)
    aux_value = torch.zeros((), device=logits.device)
    if aux is not None and lam > 0:
        aux_value = aux(D.gather_with_grad(emb.float()), D.gather_with_grad(y), ctx or StepContext())
    obj = combined_objective(ce, aux_value, lam)
    return obj, world * ((1 - lam) * ce_local + lam * aux_value)


class TrainingObjective:
    """CE + the auxiliary term with lam, sigma and k following their schedules over training
    progress (step / total steps)."""

    def __init__(self, cfg: TrainConfig, ce_fn: WeightedCrossEntropy, aux: AuxiliaryLoss | None, total_steps: int):
        self.cfg, self.ce_fn, self.aux, self.total_steps = cfg, ce_fn, aux, max(1, total_steps)
        self.lam = Schedule.parse(cfg.lam_schedule, default_value=cfg.lam)
        self.sigma_scale = Schedule.parse(cfg.sigma_schedule, default_value=1.0)
        self.k = Schedule.parse(cfg.k_schedule, default_value=float(cfg.k or 16)) if cfg.k_schedule else None

    def lam_at(self, step: int) -> float:
        return self.lam(step / self.total_steps) if self.aux is not None else 0.0

    def k_at(self, step: int) -> int | None:
        """The batch graph's k at ``step``: the k schedule's value, else ``--k`` (None: dense)."""
        return int_schedule_value(self.k, step / self.total_steps) if self.k else self.cfg.k

    def __call__(self, logits, emb, y, step: int, batch_index: Tensor) -> tuple[Objective, Tensor]:
        ctx = StepContext(sigma_scale=self.sigma_scale(step / self.total_steps), k=self.k_at(step),
                          mask_seed=self.cfg.seed * 1_000_003 + step, batch_index=batch_index)
        return step_objective(self.ce_fn, self.aux, logits, emb, y, self.lam_at(step), ctx)

    def log_values(self, step: int) -> dict:
        """lambda, sigma and k as scheduled at ``step`` (0-based: the values step ``step`` trained
        with), not as configured: sigma is None for losses without one and, with a per-batch
        strategy, the last batch's; k is None for the dense graph and for losses without a graph."""
        graph = self.aux is not None and self.cfg.loss == "gloss"
        return {"sigma": self.aux.sigma_at(self.sigma_scale(step / self.total_steps)) if self.aux else None,
                "lam": self.lam_at(step), "k": self.k_at(step) if graph else None}
