"""One bank per node (gloss_ray.graph.shared): reserved memory, who counts as one node, read-only readers,
and falling back to private copies instead of failing (issue 21, items 1 and 2)."""
import datetime
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

TIMEOUT_S = 30          # a collective that waits longer has lost its peer


def _init(rank: int, world: int, store: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _mapping_perms(name_part: str) -> list[str]:
    """Permissions of this process's mappings of files whose path contains ``name_part``."""
    with open("/proc/self/maps") as f:
        return [line.split()[1] for line in f if name_part in line]


def _scenarios_worker(rank: int, world: int, root: str) -> None:
    """Runs every two-rank scenario in order; each records its outcome (or its error) for the tests."""
    import torch.distributed as dist

    from gloss_ray.graph import shared

    _init(rank, world, f"{root}/store")
    out: dict = {}

    def run(name, fn):
        logs: list[str] = []
        try:
            out[name] = fn(logs)
        except Exception as e:          # recorded: the test names the scenario that failed
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        out[name]["logs"] = logs

    def one_node(logs):
        d = f"{root}/one"
        arr = shared.node_zeros((256, 8), torch.float32, "t", log=logs.append, shm_dir=d)
        if arr.writer:
            arr.tensor[3] = 1.0
        dist.barrier()
        return {"shared": arr.shared, "writer": arr.writer, "perms": _mapping_perms(os.path.basename(arr.path or "-")),
                "row3": float(arr.tensor[3].sum()), "left": os.listdir(d)}

    def lost_reservation(logs):
        arr = shared.node_zeros((256, 8), torch.float32, "t", log=logs.append, shm_dir=f"{root}/lost")
        if arr.writer:
            os.ftruncate(arr.fd, 0)     # the file loses its memory (a write to the mapping would now fault)
        again = shared.recheck(arr, "t", log=logs.append)
        again.tensor.fill_(2.0)         # safe: a private copy
        return {"before": arr.shared, "after": again.shared}

    def unseen_file(logs):
        d = f"{root}/unseen/{'a' if rank == 0 else 'b'}"   # one file system, but rank 1 looks elsewhere
        arr = shared.node_zeros((256, 8), torch.float32, "t", log=logs.append, shm_dir=d)
        return {"shared": arr.shared, "left": os.listdir(d)}

    run("one_node", one_node)
    run("lost_reservation", lost_reservation)
    run("unseen_file", unseen_file)       # last: on failure its peer waits TIMEOUT_S and the group is gone
    with open(f"{root}/{rank}.json", "w") as f:
        json.dump(out, f)
    os._exit(0)                           # no destroy_process_group: the group may be broken by a failure


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The scenarios' outcomes on two ranks of one machine: ``[rank 0's, rank 1's]``."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("shared_bank")
    for d in ("one", "lost", "unseen/a", "unseen/b"):
        (root / d).mkdir(parents=True)
    mp.spawn(_scenarios_worker, args=(2, str(root)), nprocs=2)
    return [json.loads((root / f"{r}.json").read_text()) for r in (0, 1)]


def _ok(results, name):
    for r in results:
        assert "error" not in r[name], r[name]["error"]
    return [r[name] for r in results]


def test_readers_map_the_bank_read_only(two_ranks):
    w, r = _ok(two_ranks, "one_node")
    assert w["shared"] and r["shared"] and (w["writer"], r["writer"]) == (True, False)
    assert w["perms"] == ["rw-s"] and r["perms"] == ["r--s"]
    assert w["row3"] == r["row3"] == 8.0          # the reader sees the writer's row
    assert w["left"] == [] and r["left"] == []    # unlinked once mapped


def test_lost_reservation_turns_every_rank_private_at_the_check(two_ranks):
    w, r = _ok(two_ranks, "lost_reservation")
    assert w["before"] and r["before"] and not w["after"] and not r["after"]
    assert len(w["logs"]) == 1 and "lost its reserved memory" in w["logs"][0] and r["logs"] == []


def test_a_rank_that_cannot_open_the_file_makes_every_rank_fall_back(two_ranks):
    w, r = _ok(two_ranks, "unseen_file")
    assert not w["shared"] and not r["shared"]
    assert w["left"] == []                        # the writer unlinked its file
    assert len(w["logs"]) == 1 and "could not map" in w["logs"][0] and r["logs"] == []


# ------------------------------------------------------------------ private mount namespaces (unshare)
def _unshare_ok() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_unshare = pytest.mark.skipif(not _unshare_ok(), reason="needs `unshare -rm` (user + mount namespaces) "
                                                             "to mount a small private tmpfs")


def _in_own_tmpfs(mount: str, size: str, code: str, *args: str, timeout: int = 300) -> subprocess.Popen:
    """``python -c code args`` in a private mount namespace with a fresh tmpfs of ``size`` on ``mount``."""
    script = f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$1" -c "$2" "${{@:3}}"'
    return subprocess.Popen(["unshare", "-rm", "bash", "-c", script, mount, sys.executable, code, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


FULL_SHM = textwrap.dedent("""
    import json, sys, torch, torch.multiprocessing as mp

    def worker(rank, shm, root):
        import datetime, torch.distributed as dist
        from gloss_ray.graph import shared
        shared.SHM_MARGIN = 1 << 20               # scaled down with the tmpfs (6 MiB)
        dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=30))
        logs = []
        first = shared.node_zeros((1024, 1024), torch.float32, "bank", log=logs.append, shm_dir=shm)
        second = shared.node_zeros((1024, 1024), torch.float32, "bank", log=logs.append, shm_dir=shm)
        for arr in (first, second):               # 4 MiB each: both do not fit in 6 MiB
            if arr.writer:
                arr.tensor.fill_(1.0)
        dist.barrier()
        json.dump({"shared": [first.shared, second.shared], "logs": logs}, open(f"{root}/{rank}.json", "w"))

    if __name__ == "__main__":                   # fork: a "-c" script cannot be re-imported by spawn
        mp.start_processes(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2, start_method="fork")
""")


@needs_unshare
def test_a_full_shm_gives_a_private_bank_instead_of_sigbus(tmp_path):
    # Before: the second bank passed the room check (the first was a sparse file) and filling it killed
    # rank 0 with SIGBUS. Now the first is reserved, the second cannot be: one line, private copies.
    shm = tmp_path / "shm"
    shm.mkdir()
    proc = _in_own_tmpfs(str(shm), "6m", FULL_SHM, str(shm), str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["shared"] == r1["shared"] == [True, False]
    assert len(r0["logs"]) == 1 and "could not be reserved" in r0["logs"][0] and r1["logs"] == []


SAME_HOST = textwrap.dedent("""
    import datetime, json, os, sys, torch, torch.distributed as dist
    rank, shm, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    from gloss_ray.graph import shared
    shared.SHM_MARGIN = 1 << 20                   # scaled down with the tmpfs (16 MiB): room for a shared bank
    result = {}
    try:
        result["shared"] = shared.node_zeros((1000, 8), torch.float32, "bank", shm_dir=shm).shared
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["left"] = os.listdir(shm)
    json.dump(result, open(f"{root}/{rank}.json", "w"))
    os._exit(0)
""")


@needs_unshare
def test_one_hostname_with_separate_shm_is_two_nodes(tmp_path):
    # Two containers with host networking: one hostname, each its own /dev/shm. Before: rank 1 could not
    # find rank 0's file, rank 0 failed at the barrier and left its file behind.
    shm = tmp_path / "shm"
    shm.mkdir()
    procs = [_in_own_tmpfs(str(shm), "16m", SAME_HOST, str(r), str(shm), str(tmp_path)) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    for r in (0, 1):
        res = json.loads((tmp_path / f"{r}.json").read_text())
        assert "error" not in res, res["error"]
        assert res["shared"] is False and res["left"] == []
