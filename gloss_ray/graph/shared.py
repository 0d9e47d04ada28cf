"""One copy per node: a large CPU array shared by all the workers of a machine.

The global graph's embedding bank is ``num_docs x dim`` floats on every worker: 15.4 GB at 10M
documents of 384 floats, per worker. On CPU the workers of one node can hold one copy instead: a
file in ``/dev/shm`` (memory, not disk) that the node's first worker (the writer) creates and every
worker of the node maps, the others read-only.

Safety:

* The writer reserves the file's memory (``posix_fallocate``) before anyone maps it, and keeps
  ``margin`` bytes free for the rest of the node (Ray's object store also lives in ``/dev/shm``).
  A sparse file would be filled only when written, and a full ``/dev/shm`` then kills the writer
  with SIGBUS. If the reservation fails (ENOSPC), every rank keeps its own copy, said in one line.
* "A node" is the set of ranks that see the same ``/dev/shm``: same Ray node ID (inside Ray; the
  hostname outside it), same kernel (boot id) and same file system under ``shm_dir`` (its device
  number). Containers that share a hostname (host networking) but not ``/dev/shm`` are apart.
* Every reader confirms that it opened the writer's very file (device and inode); if one cannot,
  every rank falls back to its own copy.
* The file is unlinked by its writer once all have mapped it, in a ``finally``: nothing is left
  behind, even when a rank fails; the memory goes when the last worker unmaps it.
* :func:`recheck` (run at each refresh of the global graph) verifies that the reservation still holds.

Every function here that takes no ``NodeArray`` is a collective: all ranks call it, in the same order.
"""
from __future__ import annotations

import math
import mmap
import os
import socket
import sys
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import distributed as D
from ..log import say

SHM_DIR = "/dev/shm"
SHM_MARGIN = 256 << 20       # bytes /dev/shm must keep free beyond the array (read when called)
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32}


@dataclass
class NodeArray:
    """A node-shared tensor and whether this rank is its node's writer (the node's first rank)."""
    tensor: torch.Tensor
    writer: bool
    shared: bool             # False: this rank's own copy (one rank per node, or no room in /dev/shm)
    path: str | None = None
    fd: int | None = None    # the writer's descriptor of the (unlinked) file, kept to check its reservation


def _private(shape: tuple[int, ...], dtype: torch.dtype) -> NodeArray:
    return NodeArray(torch.zeros(shape, dtype=dtype), writer=True, shared=False)


def node_key(shm_dir: str = SHM_DIR) -> tuple:
    """What ranks that can share a file in ``shm_dir`` have in common: ``(Ray node ID, or the hostname
    outside Ray; the kernel's boot id; the device number of shm_dir's file system, or -1)``."""
    node = None
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    try:
        dev = os.stat(shm_dir).st_dev
    except OSError:
        dev = -1
    return (node or socket.gethostname(), boot, dev)


def node_group(shm_dir: str = SHM_DIR) -> list[int]:
    """The ranks (ascending) with this rank's :func:`node_key`, this rank included."""
    keys = D.gather_objects(node_key(shm_dir))
    mine = keys[D.rank_and_world()[0]]
    return [r for r, k in enumerate(keys) if k == mine]


def node_ranks(shm_dir: str = SHM_DIR) -> tuple[int, int]:
    """``(position of this rank among its node's ranks, number of ranks on the node)``."""
    group = node_group(shm_dir)
    return group.index(D.rank_and_world()[0]), len(group)


def shm_room(shm_dir: str = SHM_DIR) -> int:
    """Bytes free in ``shm_dir`` (0 when it does not exist)."""
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _reserve(path: str, nbytes: int, margin: int, shm_dir: str) -> tuple[int | None, str | None]:
    """Create ``path`` with ``nbytes`` of memory reserved: ``(fd, None)``, or ``(None, why not)`` with
    nothing left behind. Fails when the reservation fails or leaves less than ``margin`` free."""
    before = shm_room(shm_dir)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as e:
        return None, f"cannot create a file in {shm_dir} ({e.strerror})"
    try:
        os.posix_fallocate(fd, 0, nbytes)
        left = shm_room(shm_dir)
        if left < margin:
            raise OSError(0, f"{_size(left)} would be left, under the {_size(margin)} kept free")
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        return None, f"{_size(nbytes)} could not be reserved in {shm_dir} ({e.strerror}; {_size(before)} were free)"
    return fd, None


def _map(fd: int, shape: tuple[int, ...], dtype: torch.dtype, writable: bool) -> torch.Tensor:
    """The file ``fd`` mapped shared as a tensor of ``shape``; read-only unless ``writable``."""
    n = math.prod(shape)
    nbytes = n * np.dtype(_NUMPY[dtype]).itemsize
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    buf = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=prot)
    array = np.frombuffer(buf, dtype=_NUMPY[dtype], count=n).reshape(shape)
    with warnings.catch_warnings():           # "the given NumPy array is not writable": by design (readers)
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def node_zeros(shape: tuple[int, ...], dtype: torch.dtype, tag: str, log=say, shm_dir: str = SHM_DIR,
               margin: int | None = None) -> NodeArray:
    """A zero tensor of ``shape``: one copy per node when some node runs several ranks and every
    node's writer could reserve it in ``shm_dir`` (leaving ``margin``, default :data:`SHM_MARGIN`,
    free) and every reader opened it; else one per rank (said in one line by rank 0's ``log``).
    Readers' copies are read-only mappings: only the writer may write."""
    margin = SHM_MARGIN if margin is None else margin
    rank, _ = D.rank_and_world()
    group = node_group(shm_dir)
    wants = D.gather_objects(len(group) > 1)
    if not any(wants) or dtype not in _NUMPY or math.prod(shape) == 0:
        return _private(shape, dtype)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    name = D.gather_objects(uuid.uuid4().hex if rank == 0 else None)[0]
    path = os.path.join(shm_dir, f"gloss-ray-{tag}-{name}")
    writer = group[0] == rank and len(group) > 1
    fd, tensor = None, None

    def fall_back(why: str) -> NodeArray:
        if fd is not None:
            os.close(fd)
        if rank == 0:
            log(f"{tag}: each worker keeps its own copy: {why} (give the containers a larger "
                f"/dev/shm, e.g. docker --shm-size)")
        return _private(shape, dtype)

    try:
        ident = None
        if writer:
            fd, why = _reserve(path, nbytes, margin, shm_dir)
            if fd is not None:
                st = os.fstat(fd)
                ident = (st.st_dev, st.st_ino)
            reserved = (fd is not None, why, ident)
        else:
            reserved = (True, None, None)
        votes = D.gather_objects(reserved)
        failed = [why for ok, why, _ in votes if not ok]
        if failed:
            return fall_back(failed[0])
        opened = None
        try:
            if writer:
                tensor = _map(fd, shape, dtype, writable=True)
            elif len(group) > 1:
                rfd = os.open(path, os.O_RDONLY)
                try:
                    st = os.fstat(rfd)
                    if (st.st_dev, st.st_ino) != votes[group[0]][2] or st.st_size != nbytes:
                        raise OSError(0, "not the writer's file")
                    tensor = _map(rfd, shape, dtype, writable=False)
                finally:
                    os.close(rfd)
        except (OSError, ValueError) as e:
            opened = f"rank {rank} could not map {path} ({getattr(e, 'strerror', None) or e})"
        confirmations = D.gather_objects(opened)
        missing = [c for c in confirmations if c]
        if missing:
            tensor = None
            return fall_back(missing[0])
        if len(group) == 1:                   # a node with one rank (others have several): its own copy
            return _private(shape, dtype)
        return NodeArray(tensor, writer=writer, shared=True, path=path, fd=fd)
    finally:
        if writer:
            try:
                os.unlink(path)                  # the mappings stay; nothing is left if a worker dies
            except FileNotFoundError:
                pass


def reservation_holds(array: NodeArray) -> bool:
    """This rank's part of :func:`recheck`: False only for a writer whose file no longer has its
    whole size allocated (so a write could fault)."""
    if not (array.shared and array.writer and array.fd is not None):
        return True
    st = os.fstat(array.fd)
    nbytes = array.tensor.numel() * array.tensor.element_size()
    return st.st_size >= nbytes and st.st_blocks * 512 >= nbytes


def recheck(array: NodeArray, tag: str, log=say) -> NodeArray:
    """``array`` if every node's reservation still holds (a collective), else a private zero copy on
    every rank (said in one line by rank 0): contents are not kept, call it before rewriting them."""
    if all(D.gather_objects(reservation_holds(array))) or not array.shared:
        return array
    if array.fd is not None:
        os.close(array.fd)
    if D.rank_and_world()[0] == 0:
        log(f"{tag}: the node-shared copy lost its reserved memory: each worker keeps its own copy")
    return _private(tuple(array.tensor.shape), array.tensor.dtype)
