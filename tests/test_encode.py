"""Encoding in length-sorted batches under a token budget (issue 26): the batches, the order of the
outputs, and how close the outputs are to those of corpus-order batches. No Ray."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gloss_ray.data import PadCollator, tokenize_split
from gloss_ray.model import TextClassifier, encode, load_tokenizer, token_budget_batches
from gloss_ray.train.inputs import WorkerData

# Not bit-identical: the batch's shape (rows and padded length) changes the summation order of a
# document's floats, even for a document its batch does not pad (measured: all-MiniLM-L6-v2 on 256 MR
# documents, sorted vs corpus-order batches of 64: 150 of 256 embeddings bit-identical, the rest within
# 1.4e-6). A wrong order or a lost document differs by orders of magnitude more than TOL.
TOL = 1e-5


def _texts(n=40, seed=0):
    rng = np.random.default_rng(seed)
    words = "the film was a fine moving dull long short story about people and their lives".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    torch.manual_seed(0)
    model = TextClassifier.from_encoder(tiny_model_dir, 3)
    tok = load_tokenizer(tiny_model_dir)
    ds = tokenize_split(_texts(), tok, 64, None, "encode-test")
    data = WorkerData(corpus=None, tokenizer=tok, collate=PadCollator(tok.pad_token_id), full_train=ds, train=ds,
                      train_labels=None, known_labels=None, true_labels=None, eval_sets={}, sampler=None,
                      loader=None, total_steps=0, eval_batch_size=8, max_length=64)
    return model, data, ds


def _alone(model, ds, rows):
    """Each document encoded on its own (no padding at all), stacked in ``rows`` order."""
    collate = PadCollator(0)
    outs = [encode(model, [collate([ds[int(i)]])], "cpu") for i in rows]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def test_token_budget_batches_are_longest_first_within_the_budget():
    lengths = [5, 30, 5, 12, 30, 3, 100, 12]
    batches = token_budget_batches(lengths, 60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))        # each row once
    flat = [i for b in batches for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert flat.index(1) < flat.index(4) and flat.index(0) < flat.index(2)           # stable on ties
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 60
    assert batches[0] == [6]                       # longer than the budget: alone
    assert [len(b) for b in batches] == [1, 2, 5]  # 2 x 30, then 12, 12, 5, 5, 3 (5 x 12 = 60)
    # past min_rows rows a batch ends before a document under 7/8 of its longest, budget or not
    assert [len(b) for b in token_budget_batches([40] * 20 + [35] * 4 + [34] * 8, 10_000, min_rows=16)] == [24, 8]


def test_loader_for_pads_little_and_encode_returns_input_order(setup):
    model, data, ds = setup
    rows = list(range(len(ds)))[::-1][:33]          # a subset, in an order of its own
    loader = data.loader_for(ds, rows)
    real = padded = 0
    for b in loader:
        assert b["attention_mask"].numel() <= data.encode_tokens or len(b["position"]) == 1
        real, padded = real + int(b["attention_mask"].sum()), padded + b["attention_mask"].numel()
    lengths = [len(ds[i]["input_ids"]) for i in rows]
    corpus_order = sum(8 * max(lengths[i:i + 8]) if i + 8 <= len(rows) else len(lengths[i:]) * max(lengths[i:])
                       for i in range(0, len(rows), 8))
    assert padded - real < 0.5 * (corpus_order - real), (padded, corpus_order, real)  # under half the padding
    logits, emb = encode(model, loader, "cpu")
    ref_logits, ref_emb = _alone(model, ds, rows)
    assert emb.shape == ref_emb.shape
    assert (emb - ref_emb).abs().max() < TOL and (logits - ref_logits).abs().max() < TOL
    # and as corpus-order batches of 8 (the encoding before issue 26) give them
    part = ds.select(rows).remove_columns([c for c in ds.column_names if c not in ("input_ids", "attention_mask")])
    old_logits, old_emb = encode(model, DataLoader(part, batch_size=8, collate_fn=data.collate), "cpu")
    assert (emb - old_emb).abs().max() < TOL and (logits - old_logits).abs().max() < TOL


def test_encode_checks_its_row_count(setup):
    model, data, ds = setup
    batches = list(data.loader_for(ds, range(5)))
    with pytest.raises(ValueError, match="row count"):
        encode(model, iter(batches), "cpu")
    assert encode(model, iter(batches), "cpu", rows=5)[1].shape[0] == 5


def test_predict_batches_keep_the_input_order(tiny_model_dir, setup):
    """``gloss-ray predict`` / ``embed``: sorted batches, outputs in the file's order, as before."""
    from gloss_ray.inference import _batches

    model, _, _ = setup
    tok = load_tokenizer(tiny_model_dir)
    texts = _texts(30, seed=1)
    batches = list(_batches(tok, texts, 4 * 64, 64))
    assert len(batches) < 30 / 4 + 1            # short texts share batches beyond 4 documents
    _, emb = encode(model, iter(batches), "cpu", rows=len(texts))
    old = [tok(texts[i:i + 4], padding=True, truncation=True, max_length=64, return_tensors="pt")
           for i in range(0, len(texts), 4)]
    _, old_emb = encode(model, old, "cpu")
    assert (emb - old_emb).abs().max() < TOL
