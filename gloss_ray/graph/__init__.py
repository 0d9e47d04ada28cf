"""Global document graph: an embedding bank over the whole corpus and a kNN index on it."""
from gloss_ray.graph.bank import EmbeddingBank, GlobalNeighbours
from gloss_ray.graph.index import (BACKENDS, KnnIndex, KnnResult, calibration_rows, choose_backend, exact_knn_torch,
                                   faiss_gpu_available, held_out_queries, label_homophily, recall_at_k)
from gloss_ray.graph.pseudo import LabelSpreading, propagate_labels_knn

__all__ = ["BACKENDS", "EmbeddingBank", "GlobalNeighbours", "KnnIndex", "KnnResult", "LabelSpreading",
           "calibration_rows", "choose_backend", "exact_knn_torch", "faiss_gpu_available", "held_out_queries",
           "label_homophily", "propagate_labels_knn", "recall_at_k"]
