"""Encoding and training throughput (issue 26): documents/s and real tokens/s of encoding in corpus
order (the batches before issue 26: 64 documents padded to their longest) against length-sorted
batches under a token budget (``gloss_ray.model.token_budget_batches``, what every encoding pass
uses now), and a training step's tokens/s and MFU against the device's peak.

    GLOSS_RAY_DATA=<data> python benchmarks/throughput.py                 # CPU, 1,000 docs per corpus
    GLOSS_RAY_DATA=<data> python benchmarks/throughput.py --docs 100000 --corpora mr   # a long pass
    python benchmarks/throughput.py --device cuda --docs 20000
    python benchmarks/throughput.py --compile                             # also torch.compile(dynamic=True)

Corpora: ``mr`` (MR training sentences, max length 128) and ``short`` (spans of 2-16 words cut from
the same sentences, seed 0, max length 64: SST-2-like phrases). Modes, on the same documents:
``corpus`` (input order, 64 per batch), ``presorted`` (sorted by length beforehand, 64 per batch: the
reference of the issue's "within 1.3x"), ``sorted`` (``encode`` as the project calls it: token budget
64 x max length, outputs put back in input order) and, with ``--compile``, ``sorted+compile``. The
documents are cut into 4 chunks and the modes take turns on each chunk in a rotating order, so a
change in machine load hits every mode alike; times are summed. The training step: batches of 32 in
corpus order, CE, forward + backward + AdamW, after one warm-up step. Prints a table; writes
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


def corpus(name: str, n: int) -> tuple[list[str], int]:
    import pandas as pd

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


def batches(ids: list[list[int]], rows: list[list[int]], collate, positions: bool):
    for r in rows:
        b = collate([{"input_ids": ids[i], "attention_mask": [1] * len(ids[i])} for i in r])
        if positions:
            b["position"] = torch.tensor(r)
        yield b


def encode_modes(model, ids, max_length, device, modes, chunks=4):
    """Seconds per mode over all of ``ids`` (summed over chunks, modes rotating) and the padded tokens."""
    collate = PadCollator(0)
    secs, padded = dict.fromkeys(modes, 0.0), dict.fromkeys(modes, 0)
    edges = np.linspace(0, len(ids), chunks + 1).astype(int)
    nets = {m: model for m in modes}
    if any(m.endswith("+compile") for m in modes):
        nets.update({m: torch.compile(model, dynamic=True) for m in modes if m.endswith("+compile")})
    outs = {}
    for c in range(chunks):
        part = ids[edges[c]:edges[c + 1]]
        lengths = [len(x) for x in part]
        order = sorted(range(len(part)), key=lambda i: lengths[i])
        plans = {"corpus": [list(range(i, min(i + BATCH, len(part)))) for i in range(0, len(part), BATCH)],
                 "presorted": [order[i:i + BATCH] for i in range(0, len(part), BATCH)],
                 "sorted": token_budget_batches(lengths, BATCH * max_length)}
        for m in modes[c % len(modes):] + modes[:c % len(modes)]:
            rows = plans[m.split("+")[0]]
            padded[m] += sum(len(r) * max(lengths[i] for i in r) for r in rows)
            t = time.perf_counter()
            logits, emb = encode(nets[m], batches(part, rows, collate, True), device, rows=len(part))
            if device.type == "cuda":
                torch.cuda.synchronize()
            secs[m] += time.perf_counter() - t
            outs.setdefault(m, []).append(emb)
    embs = {m: torch.cat(v) for m, v in outs.items()}
    diff = {m: float((embs[m] - embs["corpus"]).abs().max()) for m in modes}
    return secs, padded, diff


def train_steps(model, ids, device, steps: int, batch: int = 32) -> dict:
    """Forward + backward + AdamW on CE over ``steps`` corpus-order batches (after one warm-up)."""
    collate = PadCollator(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    meter = Meter(model.encoder)
    model.train()
    for s in range(steps + 1):
        b = collate([{"input_ids": x, "attention_mask": [1] * len(x)} for x in ids[s * batch:(s + 1) * batch]])
        labels = torch.zeros(len(b["input_ids"]), dtype=torch.long, device=device)
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, _ = model(b["input_ids"].to(device), b["attention_mask"].to(device))
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if s:                                  # step 0 warms up
            meter.add(b["attention_mask"], time.perf_counter() - t)
    return meter.sums


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--corpora", default="mr,short")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(dynamic=True) on sorted batches")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    load_before = os.getloadavg()
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    model = TextClassifier.from_encoder(None, 2).to(device)
    peak, source = peak_flops(device)
    modes = ["corpus", "presorted", "sorted"] + (["sorted+compile"] if args.compile else [])
    rows, result = [], {"device": str(device), "threads": torch.get_num_threads(), "peak_flops": peak,
                        "peak_source": source, "docs": args.docs, "platform": platform.platform(), "encode": {}}
    for name in args.corpora.split(","):
        texts, max_length = corpus(name, args.docs)
        ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
        real = sum(len(x) for x in ids)
        secs, padded, diff = encode_modes(model, ids, max_length, device, modes)
        result["encode"][name] = {"max_length": max_length, "real_tokens": real, "mean_length": real / len(ids),
                                  **{m: {"seconds": secs[m], "docs_per_s": len(ids) / secs[m],
                                         "tokens_per_s": real / secs[m], "padded_tokens": padded[m],
                                         "max_abs_diff_vs_corpus": diff[m]} for m in modes}}
        for m in modes:
            rows.append([f"encode {name}", m, f"{len(ids) / secs[m]:.1f}", f"{real / secs[m]:.0f}",
                         f"{padded[m] / real:.2f}", f"{secs['corpus'] / secs[m]:.2f}x", f"{diff[m]:.1e}"])
    if args.train_steps:
        texts, _ = corpus("mr", 32 * (args.train_steps + 1))
        ids = tok(texts, truncation=True, max_length=128)["input_ids"]
        sums = train_steps(model, ids, device, args.train_steps)
        rates = Meter.rates(sums, peak)
        result["train"] = {"batch": 32, "steps": args.train_steps, **sums, **rates}
        rows.append(["train step (MR, batch 32)", "corpus", f"{rates['docs_per_s']:.1f}", f"{rates['tokens_per_s']:.0f}",
                     f"{1 / (1 - rates['padding']):.2f}", f"MFU {rates['mfu']:.1%}", ""])
    result["loadavg_before"], result["loadavg_after"] = load_before, os.getloadavg()
    head = ["what", "mode", "docs/s", "real tok/s", "padded/real", "speed-up", "max|d emb|"]
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
