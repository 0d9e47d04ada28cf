"""gloss_ray.metrics: classification and embedding-quality metrics."""
import numpy as np

from gloss_ray.metrics import silhouette


def test_silhouette_is_none_when_every_document_has_its_own_class():
    # 48 test documents of a 52-class corpus, all of different classes: undefined, and a run's
    # final metrics must not fail on it (a five-benchmark dry run lost its R52 runs to this).
    emb = np.random.default_rng(0).normal(size=(48, 8))
    assert silhouette(emb, np.arange(48)) is None


def test_silhouette_of_two_separated_classes_is_near_one():
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal([5, 0], 0.01, size=(20, 2)), rng.normal([0, 5], 0.01, size=(20, 2))])
    assert silhouette(emb, np.repeat([0, 1], 20)) > 0.95
