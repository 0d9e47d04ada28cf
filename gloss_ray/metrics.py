"""Classification and embedding-quality metrics (accuracy, macro-F1, silhouette)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, silhouette_score


def classification_metrics(y_true, y_pred, num_classes: int) -> dict:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # macro over the classes present in y_true or y_pred (sklearn's default labels)
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def silhouette(embeddings: np.ndarray, labels: np.ndarray, max_points: int = 5000, seed: int = 0) -> float | None:
    """Cosine silhouette of the embeddings grouped by true label (a sample of ``max_points``);
    None where it is undefined: fewer than 2 classes, or as many classes as documents (a small test
    set of a many-class corpus, e.g. 48 R52 documents of 48 classes)."""
    labels = np.asarray(labels)
    if not 2 <= len(np.unique(labels)) <= len(labels) - 1:
        return None
    sample = None if len(labels) <= max_points else max_points
    return float(silhouette_score(embeddings, labels, metric="cosine", sample_size=sample, random_state=seed))
