"""Training throughput against the hardware: real (non-padding) tokens/s, documents/s and the
model-FLOPs utilisation (MFU), the share of the device's peak that the encoder's own arithmetic uses.

Model FLOPs of one training step (forward + backward, the usual 3x the forward's), counted on the
real tokens only, per document of ``n`` tokens::

    6 * P * n  +  12 * L * H * n**2

``P``: the encoder's weights that multiply every token (its linear layers: attention projections,
feed-forward, pooler and classifier ignored, <0.1%); ``L`` layers of width ``H``; the second term is
the attention's scores and weighted sum (2 * 2 * n * H multiply-adds per token and layer in the
forward). Embedding look-ups, layer norms, softmax, GELU, the loss and the optimiser are not
counted: they are what MFU leaves out by definition, with padding, the gap to 100%.

The peak: a table of dense bf16 tensor-core peaks for known GPUs (training runs under bf16 autocast
on CUDA), else measured once per machine by a matmul probe in the dtype training uses (float32 on
CPU), cached per host and thread count in ``~/.cache/gloss_ray/peak_flops.json``. The probe measures
what the machine gives now: on a busy machine it reads low, and MFU high.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

# dense bf16 tensor-core peaks, FLOP/s (vendor data sheets; SXM parts, no sparsity)
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def matmul_flops(encoder: nn.Module) -> tuple[int, int, int]:
    """``(P, L, H)`` of :func:`step_flops`: weights of the encoder's ``nn.Linear`` layers outside its
    pooler, its layers and hidden width (from its config)."""
    pooler = getattr(encoder, "pooler", None)
    skip = {id(m) for m in pooler.modules()} if isinstance(pooler, nn.Module) else set()
    weights = sum(m.weight.numel() for m in encoder.modules() if isinstance(m, nn.Linear) and id(m) not in skip)
    return weights, int(encoder.config.num_hidden_layers), int(encoder.config.hidden_size)


def step_flops(attention_mask: torch.Tensor, weights: int, layers: int, hidden: int) -> float:
    """Model FLOPs of a training step (forward + backward) on a batch: 6 P n + 12 L H n^2 summed
    over its documents' real token counts ``n``."""
    n = attention_mask.sum(1).double()
    return float(6 * weights * n.sum() + 12 * layers * hidden * (n * n).sum())


def _cache_file() -> Path:
    return Path(os.path.expanduser("~")) / ".cache" / "gloss_ray" / "peak_flops.json"


def probe_peak(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` square ``size`` matmuls (bf16 on CUDA, float32 else)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):                   # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def peak_flops(device: torch.device | str) -> tuple[float, str]:
    """``(FLOP/s, source)``: a known GPU's table peak (source ``table:<name>``), else the cached or
    newly run matmul probe of this host and thread count (``probe:<key>``)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name.upper().replace("NVIDIA ", ""):
                return peak, f"table:{key}"
        key = f"{platform.node()}/{name}"
    else:
        key = f"{platform.node()}/{platform.processor() or platform.machine()}/{torch.get_num_threads()}threads"
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = probe_peak(device)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=2))
            os.replace(tmp, cache)
        except OSError:                            # a read-only home: probe again next time
            pass
    return float(known[key]), f"probe:{key}"


class Meter:
    """Sums over training steps: real tokens, padded tokens, documents, model FLOPs and seconds;
    :meth:`rates` turns sums (this rank's, or all ranks' added up) into per-second figures."""

    FIELDS = ("tokens", "padded_tokens", "docs", "flops", "seconds")

    def __init__(self, encoder: nn.Module):
        self.shape = matmul_flops(encoder)
        self.sums = dict.fromkeys(self.FIELDS, 0.0)

    def add(self, attention_mask: torch.Tensor, seconds: float) -> dict:
        """Count one step; returns the step's own figures (tokens, docs, flops, seconds)."""
        step = {"tokens": float(attention_mask.sum()), "padded_tokens": float(attention_mask.numel()),
                "docs": float(attention_mask.shape[0]), "flops": step_flops(attention_mask, *self.shape),
                "seconds": seconds}
        for k, v in step.items():
            self.sums[k] += v
        return step

    @staticmethod
    def rates(sums: dict, peak: float, devices: int = 1) -> dict:
        """tokens/s, docs/s, MFU (model FLOP/s over ``devices`` x ``peak``) and the padding share of
        the tokens computed, from summed figures whose ``seconds`` is the wall time they took."""
        s = max(sums["seconds"], 1e-12)
        return {"tokens_per_s": sums["tokens"] / s, "docs_per_s": sums["docs"] / s,
                "mfu": sums["flops"] / s / (peak * devices),
                "padding": 1 - sums["tokens"] / max(sums["padded_tokens"], 1)}
