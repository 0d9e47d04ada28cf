"""The local Ray instance a gloss-ray command (or this test session) starts when no cluster is
given: on loopback, private to it, and its processes know its address -- so several commands at
once on one machine each finish cleanly (Ray's own lookups in them never see the other instances)."""
import os
import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.ray


def test_the_session_ray_instance_runs_on_loopback(ray_local):
    gcs = ray_local.get_runtime_context().gcs_address
    assert gcs.startswith("127.0.0.1:")
    assert {n["NodeManagerAddress"] for n in ray_local.nodes() if n["Alive"]} == {"127.0.0.1"}


def test_its_workers_are_told_its_address(ray_local):
    @ray_local.remote(num_cpus=0)
    def address():
        return os.environ.get("RAY_ADDRESS")

    assert ray_local.get(address.remote()) == ray_local.get_runtime_context().gcs_address


def test_two_commands_at_once_both_finish_with_clean_logs(tiny_model_dir, tmp_path):
    """Two ``gloss-ray train`` on one machine at once (each its own Ray instance, as any other
    instance running here): both succeed, and neither prints a traceback (Ray 2.60's Train
    placement-group cleaner used to fail with "Found multiple active Ray instances")."""
    frame = pd.DataFrame({"text": [f"{w} film {i}" for i, w in enumerate(["good", "bad"] * 8)],
                          "label": ["pos", "neg"] * 8})
    frame.to_csv(tmp_path / "docs.csv", index=False)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    procs = []
    for name in ("one", "two"):
        cmd = [sys.executable, "-m", "gloss_ray.cli", "train", "--train-file", str(tmp_path / "docs.csv"),
               "--model", tiny_model_dir, "--loss", "ce", "--epochs", "1", "--max-length", "8", "--batch-size", "8",
               "--cpus-per-worker", "1", "--storage", str(tmp_path / "runs"), "--name", name, "--no-progress",
               "--cache-dir", str(tmp_path / "cache")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    try:
        outputs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:            # only the processes this test started
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
        # The defect: the placement-group cleaner's ConnectionError traceback. (On an overloaded
        # machine Ray Train's controller may also log a transient "Failed to send resource request"
        # GetTimeoutError traceback of its own, which is not this defect and not checked here.)
        assert "multiple active Ray instances" not in out and "ConnectionError" not in out, out
        assert "test accuracy" in out
