"""Losses: G-Loss and the baselines it is compared with. Plain PyTorch, no Ray."""
from .contrastive import ContrastiveLoss
from .cross_entropy import WeightedCrossEntropy, balanced_class_weights, balanced_weights
from .gloss import GLoss, Objective, combined_objective, random_mask, stratified_mask
from .propagation import gaussian_affinity, label_propagation, transition_matrix
from .sigma import SigmaStrategy, sigma_dicm, sigma_root
from .supcon import SupConLoss
from .triplet import BatchAllTripletLoss

__all__ = [
    "BatchAllTripletLoss", "ContrastiveLoss", "GLoss", "Objective", "SigmaStrategy", "SupConLoss",
    "WeightedCrossEntropy", "balanced_class_weights", "balanced_weights", "combined_objective", "gaussian_affinity",
    "label_propagation", "random_mask", "sigma_dicm", "sigma_root", "stratified_mask", "transition_matrix",
]
