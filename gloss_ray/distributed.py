"""Collectives used by the training loop (plain ``torch.distributed``; no-ops on one process)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` (equal shapes) in rank order; gradient flows to the local part.

    Every rank then holds the global batch and computes the same global loss. Only the local slice
    carries a gradient, so the caller scales that loss by the world size before ``backward`` (DDP
    averages gradients over ranks): the summed gradient equals the single-process gradient.
    """
    if not is_dist():
        return x
    rank, world = rank_and_world()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


def gather_objects(obj) -> list:
    """All ranks' Python objects, in rank order (for evaluation shards of unequal size)."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_finite(value: torch.Tensor) -> bool:
    """True only if ``value`` is finite on EVERY rank: a NaN guard all ranks take together."""
    flag = torch.tensor([1.0 if bool(torch.isfinite(value).all()) else 0.0], device=value.device)
    if is_dist():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all ranks (a new tensor, no gradient; ``t`` itself on one process)."""
    if not is_dist():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def broadcast_value(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if is_dist():
        dist.broadcast(t, src=0)
    return float(t.item())


def broadcast_rows(parts: list[torch.Tensor] | None, specs: list[tuple[torch.dtype, tuple[int, ...]]],
                   device, src: int = 0) -> list[torch.Tensor]:
    """Rank ``src``'s ``parts`` on every rank: tensors of equal length ``m`` (rows), the i-th of dtype and
    trailing shape ``specs[i]`` (``[m, *trailing]``), ``m`` known only to ``src``. Other ranks pass
    ``parts=None``. Used so that one rank's choice (e.g. the global graph's extra nodes) is every rank's."""
    if not is_dist():
        return [p.to(device, dt) for p, (dt, _) in zip(parts, specs)]
    mine = dist.get_rank() == src
    m = torch.tensor([int(parts[0].shape[0]) if mine else 0], dtype=torch.long, device=device)
    dist.broadcast(m, src=src)
    out = []
    for i, (dt, trailing) in enumerate(specs):
        t = parts[i].to(device, dt).contiguous() if mine else torch.empty((int(m.item()), *trailing), dtype=dt,
                                                                           device=device)
        dist.broadcast(t, src=src)
        out.append(t)
    return out


def barrier() -> None:
    if is_dist():
        dist.barrier()


def shard_indices(n: int, world_size: int, rank: int) -> list[int]:
    """Contiguous evaluation shard of ``range(n)`` for ``rank``: shards in rank order cover every
    index exactly once (the first ``n % world_size`` ranks get one extra), no padding."""
    if world_size < 1 or not 0 <= rank < world_size or n < 0:
        raise ValueError(
            f"need n >= 0 and 0 <= rank < world_size, got n={n}, world_size={world_size}, rank={rank}"
        )
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def gather_rows(indices, rows, chunk: int = 16384):
    """Every rank's ``(indices, rows)`` (numpy arrays of equal length), yielded as ``(indices, rows)``
    parts of at most ``chunk`` rows, gathered round by round: a rank holds at most one round
    (world x chunk rows) at a time, not every rank's whole share. All ranks must consume it all."""
    if not is_dist():
        for s in range(0, len(indices), chunk):
            yield indices[s:s + chunk], rows[s:s + chunk]
        return
    rounds = max(gather_objects(-(-len(indices) // chunk)))
    for r in range(rounds):
        for idx, part in gather_objects((indices[r * chunk:(r + 1) * chunk], rows[r * chunk:(r + 1) * chunk])):
            if len(idx):
                yield idx, part
