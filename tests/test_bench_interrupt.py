"""Ctrl-C during ``gloss-ray bench`` stops the sweep: the running run stops and no queued run starts
(a bug once let the next seed start on a fresh Ray instance after "interrupted")."""
import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.ray
def test_ctrl_c_during_a_bench_starts_no_queued_run(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "gloss_ray.cli", "bench", "--benchmarks", "mr", "--losses", "ce", "--seeds", "2",
            "--concurrency", "1", "--storage", str(out), "--name", "b",
            *[a for kv in (f"model={tiny_model_dir}", f"data_dir={data_dir}", "max_train=256", "max_eval=48",
                           "max_length=32", "batch_size=16", "epochs=40", "patience=40", "progress=false")
              for a in ("--set", kv)]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    first, second = out / "b" / "runs" / "mr" / "ce" / "seed0", out / "b" / "runs" / "mr" / "ce" / "seed1"
    deadline = time.time() + 300
    while time.time() < deadline and not (first / "history.csv").exists() and proc.poll() is None:
        time.sleep(0.2)                    # seed 0 has trained an epoch: it is running, seed 1 is queued
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, text
    assert "interrupted" in text
    assert not second.exists(), text        # the queued seed never started
