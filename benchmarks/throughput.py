"""Encoding and training throughput (issue 26): documents/s and real tokens/s of encoding in corpus
order (the batches before issue 26: 64 documents padded to their longest) against length-sorted
batches under a token budget (``gloss_ray.model.token_budget_batches``, what every encoding pass
uses now), and a training step's tokens/s and MFU against the device's peak.

    GLOSS_RAY_DATA=<data> python benchmarks/throughput.py                 # CPU, 1,000 docs per corpus
    GLOSS_RAY_DATA=<data> python benchmarks/throughput.py --docs 100000 --corpora mr   # a long pass
    python benchmarks/throughput.py --device cuda --docs 20000
    python benchmarks/throughput.py --compile                             # also torch.compile(dynamic=True)
    python benchmarks/throughput.py --corpus-file /tmp/corpus100k/train.parquet --max-length 64 \
        --docs 100000 --modes sorted --train-steps 0                      # the 100k refresh's encode alone
    python benchmarks/throughput.py --compile --compile-warmup --train-steps 20   # compile, its cost apart

Corpora: ``mr`` (MR training sentences, max length 128) and ``short`` (spans of 2-16 words cut from
the same sentences, seed 0, max length 64: SST-2-like phrases). Modes, on the same documents:
``corpus`` (input order, 64 per batch), ``presorted`` (sorted by length beforehand, 64 per batch: the
reference of the issue's "within 1.3x"), ``sorted`` (``encode`` as the project calls it: token budget
64 x max length, outputs put back in input order) and, with ``--compile``, ``sorted+compile``
(``torch.compile(dynamic=True)`` on the sorted batches) and ``bucket+compile`` (a static-shape compile
over length buckets: the presorted batches of 64 padded to a multiple of 32 tokens, so a pass sees
``max_length / 32`` widths and one more for its last, shorter batch). ``--corpus-file`` replaces the
corpora with a file's ``text`` column (``--max-length``, default 64; e.g. the 100k corpus of
``build_large_corpus.py``); ``--modes`` picks the modes (speed-up and difference need ``corpus``).
``--compile-warmup`` encodes the first chunk once with each compiled model before timing and reports
that warm-up (mostly compilation) apart. The
documents are cut into 4 chunks and the modes take turns on each chunk in a rotating order, so a
change in machine load hits every mode alike; times are summed. The training step: batches of 32 in
corpus order, CE, forward + backward + AdamW, after one warm-up step; with ``--compile`` also under
``torch.compile(dynamic=True)`` (two warm-up steps, their time reported as the compile cost). Prints a table; writes
``benchmarks/results/throughput_<device>.json`` (with the load average before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gloss_ray.data import PadCollator  # noqa: E402
from gloss_ray.model import TextClassifier, encode, load_tokenizer, token_budget_batches  # noqa: E402
from gloss_ray.throughput import Meter, peak_flops  # noqa: E402

BATCH = 64


def corpus(name: str, n: int, max_length: int = 64) -> tuple[list[str], int]:
    import pandas as pd

    if name.endswith((".parquet", ".csv")):
        frame = pd.read_parquet(name) if name.endswith(".parquet") else pd.read_csv(name)
        return frame["text"].astype(str).tolist()[:n], max_length

    data = Path(os.environ.get("GLOSS_RAY_DATA", "data"))
    texts = pd.read_parquet(data / "mr" / "train.parquet")["text"].tolist()
    if name == "mr":
        return (texts * (n // len(texts) + 1))[:n], 128
    rng = np.random.default_rng(0)
    out = []
    while len(out) < n:
        words = texts[int(rng.integers(len(texts)))].split()
        size = int(rng.integers(2, 17))
        start = int(rng.integers(max(1, len(words) - size + 1)))
        out.append(" ".join(words[start:start + size]))
    return out, 64


def batches(ids: list[list[int]], rows: list[list[int]], collate, positions: bool, multiple: int = 1):
    for r in rows:
        b = collate([{"input_ids": ids[i], "attention_mask": [1] * len(ids[i])} for i in r])
        extra = -b["input_ids"].shape[1] % multiple          # length buckets: pad up to a multiple
        if extra:
            b = {k: torch.nn.functional.pad(v, (0, extra)) for k, v in b.items()}   # pad id 0, mask 0
        if positions:
            b["position"] = torch.tensor(r)
        yield b


BUCKET = 32


def plans_for(part: list[list[int]], max_length: int) -> dict[str, list[list[int]]]:
    """The rows of each batch, per mode, over one chunk of tokenised documents."""
    lengths = [len(x) for x in part]
    order = sorted(range(len(part)), key=lambda i: lengths[i])
    presorted = [order[i:i + BATCH] for i in range(0, len(part), BATCH)]
    return {"corpus": [list(range(i, min(i + BATCH, len(part)))) for i in range(0, len(part), BATCH)],
            "presorted": presorted, "bucket": presorted,
            "sorted": token_budget_batches(lengths, BATCH * max_length)}


def encode_modes(model, ids, max_length, device, modes, chunks=4, warmup=False):
    """Seconds per mode over all of ``ids`` (summed over chunks, modes rotating), the padded tokens, the
    largest difference to ``corpus``'s embeddings (None without it) and each compiled mode's warm-up seconds."""
    collate = PadCollator(0)
    secs, padded, warm = dict.fromkeys(modes, 0.0), dict.fromkeys(modes, 0), {}
    edges = np.linspace(0, len(ids), chunks + 1).astype(int)
    nets = {m: model for m in modes}
    nets.update({m: torch.compile(model, dynamic=not m.startswith("bucket")) for m in modes if m.endswith("+compile")})
    multiple = {m: BUCKET if m.startswith("bucket") else 1 for m in modes}

    def run(m, part, rows):
        emb = encode(nets[m], batches(part, rows, collate, True, multiple[m]), device, rows=len(part))[1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return emb

    for m in (m for m in modes if m.endswith("+compile") and warmup):
        part = ids[edges[0]:edges[1]]
        t = time.perf_counter()
        run(m, part, plans_for(part, max_length)[m.split("+")[0]])
        warm[m] = time.perf_counter() - t
    outs = {}
    for c in range(chunks):
        part = ids[edges[c]:edges[c + 1]]
        lengths = [len(x) for x in part]
        plans = plans_for(part, max_length)
        for m in modes[c % len(modes):] + modes[:c % len(modes)]:
            rows = plans[m.split("+")[0]]
            padded[m] += sum(len(r) * (max(lengths[i] for i in r) + multiple[m] - 1) // multiple[m] * multiple[m]
                             for r in rows)
            t = time.perf_counter()
            outs.setdefault(m, []).append(run(m, part, rows))
            secs[m] += time.perf_counter() - t
    embs = {m: torch.cat(v) for m, v in outs.items()}
    diff = {m: float((embs[m] - embs["corpus"]).abs().max()) if "corpus" in embs else None for m in modes}
    return secs, padded, diff, warm


def train_steps(model, ids, device, steps: int, batch: int = 32, net=None, warmup: int = 1) -> tuple[dict, float]:
    """Forward + backward + AdamW on CE over ``steps`` corpus-order batches after ``warmup`` untimed ones
    (``net``: a compiled ``model``); the meter's sums and the warm-up's seconds."""
    collate = PadCollator(0)
    net = net or model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    meter = Meter(model.encoder)
    model.train()
    t0 = time.perf_counter()
    warm = 0.0
    for s in range(steps + warmup):
        if s == warmup:
            warm = time.perf_counter() - t0
        b = collate([{"input_ids": x, "attention_mask": [1] * len(x)}
                     for x in ids[(s * batch) % len(ids):][:batch]])
        labels = torch.zeros(len(b["input_ids"]), dtype=torch.long, device=device)
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, _ = net(b["input_ids"].to(device), b["attention_mask"].to(device))
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if s >= warmup:
            meter.add(b["attention_mask"], time.perf_counter() - t)
    return meter.sums, warm


def _secs(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--corpora", default="mr,short")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile: dynamic shapes on sorted batches, static over 32-token length "
                         "buckets, and the training step (dynamic)")
    ap.add_argument("--compile-warmup", action="store_true",
                    help="time each compiled encoder after one untimed pass over the first chunk (its compile cost "
                         "is reported apart)")
    ap.add_argument("--corpus-file", default=None, help="a .parquet/.csv with a text column instead of the corpora")
    ap.add_argument("--max-length", type=int, default=64, help="token cap for --corpus-file (default 64)")
    ap.add_argument("--modes", default=None,
                    help="comma-separated encode modes (default corpus,presorted,sorted and, with --compile, "
                         "sorted+compile,bucket+compile)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    load_before = os.getloadavg()
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    model = TextClassifier.from_encoder(None, 2).to(device)
    peak, source = peak_flops(device)
    modes = (args.modes.split(",") if args.modes else
             ["corpus", "presorted", "sorted"] + (["sorted+compile", "bucket+compile"] if args.compile else []))
    rows, result = [], {"device": str(device), "threads": torch.get_num_threads(), "peak_flops": peak,
                        "peak_source": source, "docs": args.docs, "platform": platform.platform(), "encode": {}}
    for name in [args.corpus_file] if args.corpus_file else args.corpora.split(","):
        texts, max_length = corpus(name, args.docs, args.max_length)
        t = time.perf_counter()
        ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
        tokenize_s = time.perf_counter() - t
        real = sum(len(x) for x in ids)
        secs, padded, diff, warm = encode_modes(model, ids, max_length, device, modes, warmup=args.compile_warmup)
        result["encode"][name] = {"max_length": max_length, "real_tokens": real, "mean_length": real / len(ids),
                                  "docs": len(ids), "tokenize_s": tokenize_s,
                                  **{m: {"seconds": secs[m], "docs_per_s": len(ids) / secs[m],
                                         "tokens_per_s": real / secs[m], "padded_tokens": padded[m],
                                         "max_abs_diff_vs_corpus": diff[m], "warmup_s": warm.get(m)} for m in modes}}
        for m in modes:
            speedup = f"{secs['corpus'] / secs[m]:.2f}x" if "corpus" in secs else "n/a"
            rows.append([f"encode {Path(name).name} ({len(ids)})", m, f"{len(ids) / secs[m]:.1f}",
                         f"{real / secs[m]:.0f}", f"{padded[m] / real:.2f}", speedup,
                         "n/a" if diff[m] is None else f"{diff[m]:.1e}", _secs(warm.get(m))])
    if args.train_steps:
        texts, _ = corpus("mr", 32 * (args.train_steps + 2))
        ids = tok(texts, truncation=True, max_length=128)["input_ids"]
        result["train"] = {}
        for kind in ["eager"] + (["compile"] if args.compile else []):
            torch.manual_seed(0)
            net = TextClassifier.from_encoder(None, 2).to(device)
            compiled = torch.compile(net, dynamic=True) if kind == "compile" else None
            sums, warm = train_steps(net, ids, device, args.train_steps, net=compiled, warmup=2 if compiled else 1)
            rates = Meter.rates(sums, peak)
            result["train"][kind] = {"batch": 32, "steps": args.train_steps, "warmup_s": warm, **sums, **rates}
            rows.append(["train step (MR, batch 32)", kind, f"{rates['docs_per_s']:.1f}", f"{rates['tokens_per_s']:.0f}",
                         f"{1 / (1 - rates['padding']):.2f}", f"MFU {rates['mfu']:.1%}", "", _secs(warm)])
    result["loadavg_before"], result["loadavg_after"] = load_before, os.getloadavg()
    head = ["what", "mode", "docs/s", "real tok/s", "padded/real", "speed-up", "max|d emb|", "warm-up"]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"peak {peak / 1e9:.1f} GFLOP/s ({source}); load average {load_before[0]:.2f} before, "
          f"{result['loadavg_after'][0]:.2f} after")
    out = Path(args.out or Path(__file__).parent / "results" / f"throughput_{device.type}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
