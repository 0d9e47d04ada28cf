"""Running on a cluster: cluster.yaml (checked with Ray's own cluster-config validation),
jobs/runtime_env.yaml, the jobs/*.py entry points, and real job submissions to a Ray head node
started here (`ray start --head`) through the Job Submission API - what `ray job submit` does:

* a fine-tuning job submitted with the `ray job submit` CLI itself, its outputs landing in the
  storage path the cluster's nodes advertise as $GLOSS_RAY_STORAGE;
* a job that fails after epoch 1's checkpoint, re-submitted with the same --name/--storage: it
  succeeds and resumes after epoch 1 (each epoch in history.csv once);
* a report job reading the runs through a storage URI;
* a sweep job whose report lands in the storage path.

The head node gets its own --temp-dir and free ports, so an in-process ``ray.init()`` of another
test module is neither joined nor disturbed; this module never calls ``ray.init``. Teardown
signals only the processes this module started (never ``ray stop``, which stops every Ray
instance on the machine). The dashboard / job API (HTTP) listens on 127.0.0.1 only; Ray itself
advertises the machine's address as the node IP and opens its gRPC ports (GCS, raylet, object
manager) on all interfaces - Ray 2.60 has no switch to confine them to loopback.
"""
from __future__ import annotations

import copy
import csv
import importlib.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("finetune", "sweep", "benchmark", "report", "predict")
JOB_TIMEOUT_S = 300
RAY_CLI = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"
ADDRESS_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")  # would override any address given to Ray's job client
# Environment of the head node (and so of every job driver / worker on it).
CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
               "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def _load_job_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_gloss_ray_job_{name}", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# cluster.yaml: Ray's cluster launcher validation (offline part of `ray up`)
# ---------------------------------------------------------------------------------------------
def _cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _ray_validate(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: fill in the provider's defaults, merge
    the setup commands, check docker, then validate against ray/autoscaler/ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation():
    import ray

    cfg = _cluster_config()
    prepared = _ray_validate(cfg)
    assert cfg["provider"]["type"] == "aws"
    image = cfg["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}")
    assert image.endswith("-gpu") and "ray-ml" not in image
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    gpu_types = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert gpu_types and all(t["resources"]["GPU"] >= 1 for t in gpu_types)
    for t in gpu_types:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
        assert t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "g6e.", "p4", "p5"))
    # gloss-ray with its GPU extra on every node, after a CUDA torch; storage env on every node
    setup = "\n".join(prepared["worker_setup_commands"])
    assert setup == "\n".join(prepared["head_setup_commands"][: len(prepared["worker_setup_commands"])])
    assert "torch==2.13.0" in setup and "gloss-ray[gpu]" in setup and "torch.version.cuda" in setup
    assert any("GLOSS_RAY_STORAGE=s3://" in opt for opt in cfg["docker"]["run_options"])
    assert "--gpus all" in cfg["docker"]["worker_run_options"]
    assert prepared["available_node_types"][cfg["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("breakage", ["unknown top-level key", "unknown docker key", "bad resources",
                                      "unknown head node type", "min above max_workers"])
def test_cluster_yaml_validation_rejects_broken_configs(breakage):
    """The validation above is not vacuous: each of these edits makes Ray reject the config."""
    import jsonschema

    cfg = _cluster_config()
    worker = next(n for n in cfg["available_node_types"] if n != cfg["head_node_type"])
    if breakage == "unknown top-level key":
        cfg["setup_comands"] = ["echo typo"]
    elif breakage == "unknown docker key":
        cfg["docker"]["imag"] = cfg["docker"]["image"]
    elif breakage == "bad resources":
        cfg["available_node_types"][worker]["resources"]["GPU"] = "one"
    elif breakage == "unknown head node type":
        cfg["head_node_type"] = "no_such_type"
    else:
        cfg["available_node_types"][worker]["min_workers"] = cfg["max_workers"] + 1
        cfg["available_node_types"][worker]["max_workers"] = cfg["max_workers"] + 1
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(cfg)


# ---------------------------------------------------------------------------------------------
# jobs/runtime_env.yaml and the entry points
# ---------------------------------------------------------------------------------------------
def _unknown_runtime_env_fields(runtime_env: dict) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**runtime_env)  # type-checks the known fields (env_vars: Dict[str, str], ...)
    return sorted((set(runtime_env) - set(RuntimeEnv.known_fields)) | {k for k, _ in env.plugins()})


def _job_runtime_env() -> dict:
    """The runtime_env `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml` sends."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    return parse_runtime_env_args(runtime_env=str(ROOT / "jobs" / "runtime_env.yaml"), working_dir=str(ROOT))


def test_runtime_env_yaml_is_a_valid_runtime_env():
    renv = _job_runtime_env()
    assert _unknown_runtime_env_fields(renv) == []
    assert renv["working_dir"] == str(ROOT)
    for pattern in (".git", "runs/", "data/", ".gpu/", "*.safetensors", "__pycache__"):
        assert pattern in renv["excludes"]
    env = renv["env_vars"]
    assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["GLOSS_RAY_DATA"]
    # the same check catches a misspelt field and a non-string env var
    assert _unknown_runtime_env_fields({**renv, "env_var": {"A": "1"}}) == ["env_var"]
    with pytest.raises(TypeError):
        _unknown_runtime_env_fields({**renv, "env_vars": {"A": 1}})


@pytest.mark.parametrize("name, command", [("finetune", "train"), ("sweep", "tune"), ("benchmark", "bench"),
                                           ("report", "report")])
def test_the_submit_command_a_job_documents_is_accepted_by_ray_and_gloss_ray(name, command):
    """The `ray job submit` line in a job script's header parses with Ray's own job CLI (nothing is
    submitted), ships the repository with the project's runtime env, and runs this script with
    arguments that gloss-ray's parser for the job's command accepts."""
    from ray.dashboard.modules.job.cli import job_cli_group

    from gloss_ray.cli import parse_args

    header = (ROOT / "jobs" / f"{name}.py").read_text().split('"""', 1)[0]
    line = next(ln for ln in header.splitlines() if "ray job submit" in ln)
    argv = shlex.split(line.split("ray job submit", 1)[1])
    params = job_cli_group.commands["submit"].make_context("submit", argv).params
    assert (params["working_dir"], params["runtime_env"]) == (".", "jobs/runtime_env.yaml")
    assert (ROOT / params["runtime_env"]).is_file()
    python, script, *args = params["entrypoint"]
    assert (python, script) == ("python", f"jobs/{name}.py")
    assert parse_args([command, *args]).command == command


def test_storage_defaults_to_env(monkeypatch):
    job = _load_job_module("finetune")
    monkeypatch.delenv("GLOSS_RAY_STORAGE", raising=False)
    assert job.with_default_storage(["--benchmark", "mr"]) == ["--benchmark", "mr"]
    monkeypatch.setenv("GLOSS_RAY_STORAGE", "s3://bucket/gloss-ray")
    assert job.with_default_storage(["--benchmark", "mr"]) == ["--benchmark", "mr", "--storage",
                                                                "s3://bucket/gloss-ray"]
    for given in (["--storage", "runs"], ["--storage=runs"], ["--stor", "runs"]):
        assert job.with_default_storage(["--benchmark", "mr", *given]) == ["--benchmark", "mr", *given]


def test_jobs_run_from_a_plain_checkout(tmp_path):
    """Without an installed gloss-ray, a job finds the package next to its jobs/ folder."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "gloss_ray", checkout / "gloss_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "jobs", checkout / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    # hide the installed (editable) gloss_ray and the repository, then run each job with --help
    code = (
        "import sys, runpy\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'gloss_ray' not in repr(f)]\n"
        f"sys.path[:] = [p for p in sys.path if p not in ('', {str(ROOT)!r})]\n"
        "for script in sys.argv[1:]:\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), (script, e.code)\n"
    )
    scripts = [str(checkout / "jobs" / f"{name}.py") for name in ("finetune", "sweep", "benchmark", "predict")]
    out = subprocess.run([sys.executable, "-c", code, *scripts], cwd=tmp_path, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(f"gloss_ray from {checkout / 'gloss_ray'}") == 4, out.stdout
    for usage in ("gloss-ray train", "gloss-ray tune", "gloss-ray bench", "gloss-ray predict"):
        assert f"usage: {usage}" in out.stdout


# ---------------------------------------------------------------------------------------------
# A real local Ray cluster and the Job Submission API
# ---------------------------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _psutil():
    try:
        import psutil
    except ImportError:  # Ray bundles psutil (ray/thirdparty_files) and puts it on sys.path
        import ray  # noqa: F401
        import psutil
    return psutil


def _cluster_processes(head_pid: int) -> dict:
    """The processes of the head node started here: the `ray start --block` process's session
    (Ray's daemons and workers) plus their descendants (job drivers run in their own sessions)."""
    psutil = _psutil()

    found = {}
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == head_pid:
                found[p.pid] = p
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    for p in list(found.values()):
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    return found


def _alive(procs) -> list:
    psutil = _psutil()

    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            continue
    return alive


def _stop_cluster(head: subprocess.Popen) -> None:
    psutil = _psutil()

    procs = _cluster_processes(head.pid)
    if head.poll() is None:
        procs.setdefault(head.pid, psutil.Process(head.pid))
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    deadline = time.time() + 5  # Ray's daemons exit on SIGTERM; the GCS and `ray start` need SIGKILL
    while _alive(procs.values()) and time.time() < deadline:
        time.sleep(0.5)
    procs.update(_cluster_processes(head.pid))
    for p in _alive(procs.values()):
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(scope="module")
def cluster(data_dir):
    """A Ray head node with 3 CPUs on this machine, its dashboard (job API) on 127.0.0.1 only."""
    temp_dir = tempfile.mkdtemp(prefix="grc", dir="/tmp")  # short: Ray's unix sockets live here
    work = Path(tempfile.mkdtemp(prefix="gloss_ray_cluster_test_"))
    storage = work / "bucket"  # stands in for s3://YOUR-BUCKET/gloss-ray
    storage.mkdir()
    (gcs, dash, agent_http, agent_grpc, renv_agent, metrics, client, node_mgr, obj_mgr) = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in ADDRESS_VARS}
    env.update(CLUSTER_ENV, GLOSS_RAY_STORAGE=str(storage))
    cmd = [RAY_CLI, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={renv_agent}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", "--num-cpus=3", "--num-gpus=0", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    log_path = work / "ray_start.log"
    log = open(log_path, "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the Ray dashboard did not come up at {address}:\n{log_path.read_text()}")
            time.sleep(1)
        from ray.job_submission import JobSubmissionClient

        saved = {k: os.environ.pop(k) for k in ADDRESS_VARS if k in os.environ}
        try:
            client = JobSubmissionClient(address)
        finally:
            os.environ.update(saved)
        print(f"\n[test_cluster] Ray head up at {address} (temp dir {temp_dir})", flush=True)
        yield {"address": address, "client": client, "storage": storage, "work": work, "env": env}
    finally:
        _stop_cluster(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _train_args(cluster, tiny_model_dir, tag: str, *extra: str) -> list[str]:
    """A 1-epoch G-Loss run of the tiny random BERT (conftest's ``tiny_model_dir``) on 64 MR docs."""
    return ["--benchmark", "mr", "--loss", "gloss", "--data-dir", os.environ["GLOSS_RAY_DATA"], "--model", str(tiny_model_dir),
            "--max-train", "64", "--max-eval", "32", "--max-length", "32", "--batch-size", "16",
            "--epochs", "1", "--workers", "1", "--cache-dir", str(cluster["work"] / f"token-cache-{tag}"), *extra]


def _runtime_env(**env_vars: str) -> dict:
    renv = _job_runtime_env()
    renv["env_vars"] = {**renv["env_vars"], **CLUSTER_ENV, "GLOSS_RAY_DATA": os.environ["GLOSS_RAY_DATA"], **env_vars}
    return renv


def _wait(cluster, job_id: str, expect: str, timeout: float = JOB_TIMEOUT_S) -> str:
    from ray.job_submission import JobStatus

    client = cluster["client"]
    t0 = time.time()
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.time() - t0 < timeout:
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    if status != JobStatus(expect):
        info = client.get_job_info(job_id)
        print(f"\n----- job {job_id} log -----\n{logs}\n----- end of log -----")
        pytest.fail(f"job {job_id}: {status} (expected {expect}) after {time.time() - t0:.0f}s: {info.message}")
    print(f"[test_cluster] job {job_id}: {status} in {time.time() - t0:.0f}s", flush=True)
    return logs


def _history_epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "history.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def _check_run_outputs(run_dir: Path, epochs: int) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == epochs and metrics["num_workers"] == 1
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert _history_epochs(run_dir) == list(range(1, epochs + 1))
    model = run_dir / "model"
    assert (model / "config.json").exists() and (model / "model.safetensors").exists()
    assert (model / "tokenizer.json").exists() or (model / "vocab.txt").exists()
    return metrics


@pytest.fixture(scope="module")
def jobs(cluster, tiny_model_dir):
    """Submit the independent jobs at once (the head has a CPU for each one's Train worker), so
    that they run side by side while the tests below wait for them one after the other."""
    work, client = cluster["work"], cluster["client"]
    submitted = {}

    # 1. with the `ray job submit` CLI exactly as documented, no --storage (-> $GLOSS_RAY_STORAGE)
    submitted["smoke"] = f"finetune-{uuid.uuid4().hex[:8]}"
    cmd = [RAY_CLI, "job", "submit", "--address", cluster["address"], "--submission-id", submitted["smoke"],
           "--no-wait", "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
           "python", "jobs/finetune.py", *_train_args(cluster, tiny_model_dir, "smoke", "--name", "smoke")]
    # the submitting machine's own $GLOSS_RAY_STORAGE must not matter: the job reads the node's
    out = subprocess.run(cmd, cwd=ROOT, env={**cluster["env"], "GLOSS_RAY_STORAGE": "/nonexistent"},
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr

    # 2. fails once after epoch 1 (after its checkpoint), no retries
    marker = work / "failed-once"
    resume = {"storage": work / "resume-bucket", "marker": marker,
              "entrypoint": " ".join(["python", "jobs/finetune.py", *_train_args(
                  cluster, tiny_model_dir, "resume", "--epochs", "3", "--max-failures", "0", "--name", "resume",
                  "--storage", str(work / "resume-bucket"))]),
              "runtime_env": _runtime_env(GLOSS_RAY_FAIL_ONCE_AFTER_EPOCH=f"1:{marker}")}
    resume["first"] = client.submit_job(entrypoint=resume["entrypoint"], runtime_env=resume["runtime_env"])
    submitted["resume"] = resume

    # 3. a sweep (Tune search of 1 trial + 1 final run + report)
    base = {"model": tiny_model_dir, "data_dir": os.environ["GLOSS_RAY_DATA"], "max_train": 64, "max_eval": 32, "max_length": 32,
            "batch_size": 16, "epochs": 1, "cache_dir": work / "token-cache-sweep"}
    sets = " ".join(f"--set {k}={v}" for k, v in base.items())
    storage = work / "sweep-bucket"
    entrypoint = (f"python jobs/sweep.py --benchmarks mr --losses ce --seeds 1 --samples 1 --concurrency 1 "
                  f"--space tune_spaces/default.yaml --workers 1 --storage {storage} --name sweep {sets}")
    submitted["sweep"] = {"storage": storage,
                          "id": client.submit_job(entrypoint=entrypoint, runtime_env=_runtime_env())}
    return submitted


@pytest.mark.ray
def test_submitted_finetune_job_writes_to_cluster_storage(cluster, jobs):
    """`ray job submit ... -- python jobs/finetune.py` (the CLI, as a user runs it) without
    --storage: the run lands in $GLOSS_RAY_STORAGE of the cluster's nodes."""
    logs = _wait(cluster, jobs["smoke"], "SUCCEEDED")
    run_dir = cluster["storage"] / "smoke"
    assert f"--storage {cluster['storage']}" in logs  # taken from $GLOSS_RAY_STORAGE
    assert "[gloss-ray] epoch 1:" in logs and "test accuracy" in logs
    _check_run_outputs(run_dir, epochs=1)


@pytest.mark.ray
def test_failed_job_resubmitted_resumes_from_checkpoint(cluster, jobs):
    """A job that dies after epoch 1's checkpoint (no retries) FAILS; submitting the same command
    again (same --name and --storage) resumes after epoch 1 and finishes epochs 2 and 3."""
    job = jobs["resume"]
    logs = _wait(cluster, job["first"], "FAILED")
    assert job["marker"].exists() and "simulated worker failure after epoch 1" in logs
    run_dir = job["storage"] / "resume"
    assert not (run_dir / "metrics.json").exists()
    assert any(p.name.startswith("checkpoint") for p in run_dir.rglob("*")), sorted(run_dir.rglob("*"))

    second = cluster["client"].submit_job(entrypoint=job["entrypoint"], runtime_env=job["runtime_env"])
    logs = _wait(cluster, second, "SUCCEEDED")
    assert "resumed from checkpoint after epoch 1" in logs
    assert "[gloss-ray] epoch 1:" not in logs and "[gloss-ray] epoch 3:" in logs
    _check_run_outputs(run_dir, epochs=3)


@pytest.mark.ray
def test_submitted_report_job_reads_storage_uri(cluster, jobs):
    """jobs/report.py given a storage URI fetches the result files and uploads the report there."""
    results = cluster["storage"] / "smoke"
    if not (results / "metrics.json").exists():
        pytest.skip("needs the run of test_submitted_finetune_job_writes_to_cluster_storage")
    job = cluster["client"].submit_job(entrypoint=f"python jobs/report.py {results.as_uri()}",
                                       runtime_env=_runtime_env())
    logs = _wait(cluster, job, "SUCCEEDED")
    assert "file(s) fetched" in logs
    report = results / "report"
    assert (report / "report.md").exists() and (report / "results.csv").exists()
    assert "mr" in (report / "results.csv").read_text()
    # the same entry point on local folders, without Ray (in this process; jobs/ leaves sys.path after)
    saved_path = list(sys.path)
    try:
        status = _load_job_module("report").main([str(results), "--out", str(cluster["work"] / "local-report")])
    finally:
        sys.path[:] = saved_path
        sys.modules.pop("finetune", None)
    assert status == 0 and (cluster["work"] / "local-report" / "report.html").exists()


@pytest.mark.ray
def test_submitted_sweep_report_lands_in_storage(cluster, jobs):
    """`python jobs/sweep.py` as a job: search, final run and the report, all in the storage path."""
    logs = _wait(cluster, jobs["sweep"]["id"], "SUCCEEDED")
    storage = jobs["sweep"]["storage"]
    sweep = storage / "sweep"
    report = sweep / "report"
    assert (report / "report.md").exists(), sorted(str(p.relative_to(storage)) for p in storage.rglob("*"))[:60]
    assert "mr" in (report / "results.csv").read_text()
    assert (sweep / "search" / "mr__ce" / "trials.json").exists()
    assert (sweep / "runs" / "mr" / "ce" / "seed0" / "metrics.json").exists()
    assert "[gloss-ray] report:" in logs


@pytest.mark.ray
def test_submitted_predict_job_writes_parquet_shards(cluster, tiny_model_dir):
    """`python jobs/predict.py` as a job: a folder of Parquet shards classified through Ray Data on the
    cluster (the job always takes the Ray Data path), one output row per document, keyed by its id."""
    import pandas as pd

    from gloss_ray.model import TextClassifier, load_tokenizer

    work = cluster["work"]
    model = work / "predict-model"
    TextClassifier.from_encoder(tiny_model_dir, 2).save_pretrained(model, load_tokenizer(tiny_model_dir), ["neg", "pos"])
    corpus = work / "predict-corpus"
    corpus.mkdir()
    for i in range(2):
        pd.DataFrame({"id": [f"{i}-{j}" for j in range(10)],
                      "text": [f"film {j} of part {i} was fine" for j in range(10)]}).to_parquet(corpus / f"p{i}.parquet")
    out = work / "predictions"
    job = cluster["client"].submit_job(
        entrypoint=f"python jobs/predict.py --model-dir {model} --input {corpus} --output {out} --batch-size 8",
        runtime_env=_runtime_env())
    logs = _wait(cluster, job, "SUCCEEDED")
    assert "--ray" in logs and f"wrote 20 rows" in logs
    got = pd.read_parquet(out)
    assert sorted(got["id"]) == sorted(f"{i}-{j}" for i in range(2) for j in range(10))
    assert set(got["label"]) <= {"neg", "pos"} and got["confidence"].between(0.5, 1).all()
