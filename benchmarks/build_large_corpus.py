"""Build a ~100k-document corpus from the shared benchmark parquet files (issue 13, part 2).

    export GLOSS_RAY_DATA=<folder holding <name>/{train,validation,test}.parquet>   # or let it download
    python benchmarks/build_large_corpus.py /tmp/corpus100k --size 100000 --eval-size 2000 --seed 0

Writes ``<out>/{train,validation,test}.parquet`` (columns ``text``, ``label``) for
``gloss-ray train --train-file ... --validation-file ... --test-file ...``.

Construction (each split of each benchmark is cut the same way; train units come from the benchmarks'
train splits only, validation/test units from their own validation/test splits):

* 20ng: each post's header block (everything up to the first blank line: From/Subject/Organization/...)
  is dropped, the body is cut into paragraphs at blank lines, stripped; label ``20ng/<newsgroup>``.
* ohsumed: the texts are one sentence per line (title, then abstract sentences): one unit per line;
  label ``ohsumed/<Cxx>``.
* r52: the texts are lower-cased without punctuation, so they are cut into consecutive 40-word
  windows; label ``r52/<class>``. (R8 is left out: its documents are a subset of R52's.)
* mr: one sentence per text already; label ``mr/<negative|positive>``.

Units shorter than ``--min-chars`` (40) characters are dropped, then exact duplicate texts (the first
kept, in the order above), then ``--size`` units are drawn without replacement with ``--seed``
(all of them when there are fewer). Validation and test: the same cutting of the validation/test
splits, units whose label is not in train dropped, ``--eval-size`` drawn of each. From the shared data
this gives 108,652 train units, 105,033 unique, of 97 classes (counts are printed), of which 100,000 are
kept (52,592 20ng / 24,388 ohsumed / 17,325 r52 / 5,695 mr; mean 239 characters); validation and test
2,000 each (82 and 74 of the 97 classes). Takes ~3 s.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from gloss_ray.download import find_or_download

SOURCES = ("20ng", "ohsumed", "r52", "mr")
R52_WORDS = 40


def _20ng(text: str) -> list[str]:
    body = text.split("\n\n", 1)[1] if "\n\n" in text else ""   # drop the header block
    return [p.strip() for p in re.split(r"\n\s*\n", body)]


def _ohsumed(text: str) -> list[str]:
    return [s.strip() for s in text.split("\n")]


def _r52(text: str) -> list[str]:
    w = text.split()
    return [" ".join(w[i:i + R52_WORDS]) for i in range(0, len(w), R52_WORDS)]


def _mr(text: str) -> list[str]:
    return [text.strip()]


CUT = {"20ng": _20ng, "ohsumed": _ohsumed, "r52": _r52, "mr": _mr}


def _read(name: str, split: str) -> pd.DataFrame:
    root = find_or_download(name)
    return pd.read_parquet(f"{root}/{name}/{split}.parquet")


def units(split: str, min_chars: int) -> pd.DataFrame:
    """All units of ``split`` of the four sources, deduplicated, with per-source counts printed."""
    rows = []
    for name in SOURCES:
        df = _read(name, split)
        n = 0
        for text, label in zip(df["text"], df["label"]):
            for u in CUT[name](text):
                if len(u) >= min_chars:
                    rows.append((u, f"{name}/{label}"))
                    n += 1
        print(f"  {split:10s} {name:8s} {len(df):6d} texts -> {n:7d} units", file=sys.stderr)
    out = pd.DataFrame(rows, columns=["text", "label"])
    before = len(out)
    out = out.drop_duplicates("text", keep="first").reset_index(drop=True)
    print(f"  {split:10s} {before} units, {len(out)} after dropping duplicate texts", file=sys.stderr)
    return out


def draw(df: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    if len(df) <= size:
        return df.reset_index(drop=True)
    rows = np.sort(np.random.default_rng(seed).permutation(len(df))[:size])
    return df.iloc[rows].reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder")
    p.add_argument("--size", type=int, default=100_000, help="training units to keep")
    p.add_argument("--eval-size", type=int, default=2000, help="validation and test units to keep (each)")
    p.add_argument("--min-chars", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train = draw(units("train", a.min_chars), a.size, a.seed)
    classes = set(train["label"])
    frames = {"train": train}
    for i, split in enumerate(("validation", "test"), start=1):
        df = units(split, a.min_chars)
        df = df[df["label"].isin(classes)]
        df = df[~df["text"].isin(set(train["text"]))]   # no training text in the evaluation splits
        frames[split] = draw(df, a.eval_size, a.seed + i)
    for split, df in frames.items():
        df.to_parquet(out / f"{split}.parquet", index=False, compression="zstd")
        per = df["label"].str.split("/").str[0].value_counts().to_dict()
        print(f"{split}: {len(df)} docs, {df['label'].nunique()} classes, mean {df['text'].str.len().mean():.0f} chars, "
              f"by source {per}")
    print(f"wrote {out}/{{train,validation,test}}.parquet in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
