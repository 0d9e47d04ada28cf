"""One copy per node: a large CPU array shared by all the workers of a machine.

The global graph's embedding bank is ``num_docs x dim`` floats on every worker: 15.4 GB at 10M
documents of 384 floats, per worker. On CPU the workers of one node can hold one copy instead: a
file in ``/dev/shm`` (memory, not disk) that the node's first worker creates and every worker of
the node maps. It is unlinked as soon as all have mapped it, so nothing is left behind when a
worker dies; the memory goes when the last worker unmaps it.

Every function here is a collective: all ranks call it, in the same order.
"""
from __future__ import annotations

import math
import os
import socket
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from .. import distributed as D

SHM_DIR = "/dev/shm"
SHM_MARGIN = 256 << 20       # room /dev/shm must keep beyond the array
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32}


@dataclass
class NodeArray:
    """A node-shared tensor and whether this rank is its node's writer (the node's first rank)."""
    tensor: torch.Tensor
    writer: bool
    shared: bool             # False: this rank's own copy (one rank per node, or no room in /dev/shm)
    path: str | None = None


def node_ranks() -> tuple[int, int]:
    """``(position of this rank among its node's ranks, number of ranks on the node)``."""
    rank, _ = D.rank_and_world()
    hosts = D.gather_objects(socket.gethostname())
    mine = [r for r, h in enumerate(hosts) if h == hosts[rank]]
    return mine.index(rank), len(mine)


def shm_room(shm_dir: str = SHM_DIR) -> int:
    """Bytes free in ``shm_dir`` (0 when it does not exist)."""
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def node_zeros(shape: tuple[int, ...], dtype: torch.dtype, tag: str, log=print, shm_dir: str = SHM_DIR) -> NodeArray:
    """A zero tensor of ``shape``: one copy per node when some node runs several ranks and every
    node's ``shm_dir`` has room for it, else one per rank (said in one line by ``log``)."""
    local_rank, local_size = node_ranks()
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    room = shm_room(shm_dir)
    wants = local_size > 1
    fits = room >= nbytes + SHM_MARGIN
    votes = D.gather_objects((wants, fits, room))
    if not any(w for w, _, _ in votes) or dtype not in _NUMPY:
        return NodeArray(torch.zeros(shape, dtype=dtype), writer=True, shared=False)
    if not all(f for _, f, _ in votes):
        short = min(r for _, _, r in votes)
        log(f"[gloss-ray] {tag}: {nbytes / 2**30:.1f} GiB does not fit in {shm_dir} ({short / 2**30:.1f} GiB free "
            f"on some node): each worker keeps its own copy (give the containers a larger /dev/shm, e.g. docker "
            f"--shm-size)")
        return NodeArray(torch.zeros(shape, dtype=dtype), writer=True, shared=False)
    name = D.gather_objects(uuid.uuid4().hex if D.rank_and_world()[0] == 0 else None)[0]
    path = os.path.join(shm_dir, f"gloss-ray-{tag}-{name}")
    if local_rank == 0:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)            # a sparse file: zeros, no memory used until written
        finally:
            os.close(fd)
    D.barrier()
    array = np.memmap(path, dtype=_NUMPY[dtype], mode="r+", shape=shape)
    D.barrier()
    if local_rank == 0:
        os.unlink(path)                         # the mappings stay; nothing is left if a worker dies
    return NodeArray(torch.from_numpy(array), writer=local_rank == 0, shared=True, path=path)
