"""Global document graph: an embedding bank over the whole corpus and a kNN index on it."""
from gloss_ray.graph.bank import EmbeddingBank, GlobalNeighbours
from gloss_ray.graph.index import (BACKEND_CLASSES, BACKENDS, FaissFlatIndex, FaissGpuIndex, FaissHnswIndex,
                                   FaissIvfIndex, KnnIndex, KnnResult, TorchExactIndex, calibrate, calibration_rows,
                                   choose_backend, exact_knn_torch, faiss_gpu_available, held_out_queries,
                                   label_homophily, make_index, recall_at_k, restore_index)
from gloss_ray.graph.pseudo import LabelSpreading

__all__ = ["BACKEND_CLASSES", "BACKENDS", "EmbeddingBank", "FaissFlatIndex", "FaissGpuIndex", "FaissHnswIndex",
           "FaissIvfIndex", "GlobalNeighbours", "KnnIndex", "KnnResult", "LabelSpreading", "TorchExactIndex",
           "calibrate", "calibration_rows", "choose_backend", "exact_knn_torch", "faiss_gpu_available",
           "held_out_queries", "label_homophily", "make_index", "recall_at_k",
           "restore_index"]
