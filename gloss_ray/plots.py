"""Per-run figures: loss components, validation curves and a 2-D map of the test embeddings."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402


def training_curves(history: list[dict], out: Path, title: str) -> Path:
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="total")
    a.plot(ep, [h["train_ce"] for h in history], "s--", label="CE")
    if any(h.get("train_aux") for h in history):
        a.plot(ep, [h["train_aux"] for h in history], "^--", label="auxiliary (G-Loss/SCL/...)")
    a.set_xlabel("epoch"), a.set_ylabel("training loss"), a.legend(), a.grid(alpha=0.3)
    b.plot(ep, [h["val_accuracy"] for h in history], "o-", label="accuracy")
    b.plot(ep, [h["val_macro_f1"] for h in history], "s-", label="macro-F1")
    b.set_xlabel("epoch"), b.set_ylabel("validation"), b.legend(), b.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def embedding_map(embeddings: np.ndarray, labels: np.ndarray, label_names: list[str], out: Path, title: str,
                  max_points: int = 3000, seed: int = 0) -> Path:
    """PCA of the L2-normalised test embeddings, coloured by true class."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(labels))[:max_points]
    x = embeddings[idx] / np.maximum(np.linalg.norm(embeddings[idx], axis=1, keepdims=True), 1e-12)
    xy = PCA(n_components=2, random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab20" if len(label_names) > 10 else "tab10")
    for c in np.unique(labels[idx]):
        m = labels[idx] == c
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, color=cmap(int(c) % cmap.N),
                   label=label_names[c] if len(label_names) <= 20 else None)
    if len(label_names) <= 20:
        ax.legend(markerscale=2, fontsize=7, loc="best")
    ax.set_title(title), ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    path = out / "embedding_map.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
