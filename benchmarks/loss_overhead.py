"""Cost of G-Loss on top of cross-entropy: one full training step (forward + backward + AdamW) with a
real encoder, CE alone vs CE + G-Loss computed from the SAME forward pass.

    python benchmarks/loss_overhead.py                       # CPU: batch 32, all-MiniLM-L6-v2
    python benchmarks/loss_overhead.py --device cuda --batch-size 128

Steps of the two losses are interleaved (ABAB...) so drift in machine speed hits both alike; the
table gives the median step time of each and their ratio, and a JSON file records everything.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gloss_ray.losses import GLoss, WeightedCrossEntropy, combined_objective  # noqa: E402
from gloss_ray.model import TextClassifier, load_tokenizer  # noqa: E402


def texts(n: int) -> list[str]:
    from gloss_ray.download import find_or_download

    data = find_or_download("mr")               # $GLOSS_RAY_DATA, ./data, the user cache, else downloaded
    f = data / "mr" / "train.parquet"
    if f.exists():
        import pandas as pd

        return pd.read_parquet(f)["text"].tolist()[:n]
    return [f"document number {i} about topic {i % 7} with some words" for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 on GPU, 32 on CPU")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="measured steps per loss")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    bs = args.batch_size or (128 if dev.type == "cuda" else 32)
    tok = load_tokenizer(args.model)
    model = TextClassifier.from_encoder(args.model, args.classes).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ce_fn = WeightedCrossEntropy()
    gloss = GLoss(args.classes, sigma=0.5, gamma=0.7).to(dev)
    pool = texts(bs * 8)
    batches = []
    for i in range(8):
        b = tok(pool[i * bs:(i + 1) * bs], padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        batches.append((b["input_ids"].to(dev), b["attention_mask"].to(dev), (torch.arange(bs) % args.classes).to(dev)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step(i: int, with_gloss: bool) -> float:
        ids, am, y = batches[i % len(batches)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast:
            logits, emb = model(ids, am)
        ce = ce_fn(logits.float(), y)
        aux = gloss(emb.float(), y, generator=torch.Generator().manual_seed(i)) if with_gloss else torch.zeros((), device=dev)
        loss = combined_objective(ce, aux, 0.5 if with_gloss else 0.0).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for i in range(args.warmup):
        step(i, False), step(i, True)
    times = {"ce": [], "ce+gloss": []}
    for i in range(args.steps):
        times["ce"].append(step(i, False))
        times["ce+gloss"].append(step(i, True))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ce+gloss"] / med["ce"]
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    print(f"\nloss overhead: all-MiniLM-L6-v2, batch {bs}, max_length {args.max_length}, {device_name}")
    print(f"{'loss':<10} {'median step (ms)':>17} {'min (ms)':>9}")
    for k, v in times.items():
        print(f"{k:<10} {med[k] * 1e3:>17.1f} {min(v) * 1e3:>9.1f}")
    print(f"ratio CE+G-Loss / CE: {ratio:.3f}")
    out = Path(args.out or Path(__file__).parent / "results" / f"loss_overhead_{dev.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name, "batch_size": bs, "max_length": args.max_length, "steps": args.steps,
                               "median_s": med, "times_s": times, "ratio": ratio, "torch": torch.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
