import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One compute thread, here and in every child process the tests start (services, the demo,
# the benchmark): the tests' models are tiny, a process with two threads gains little, and
# on a busy two-core host (a cloud and an edge in one test, or other jobs) OpenMP threads
# that wait on each other made eval-vlm 5.7x slower (4.4 s with one thread, 24.9 s with two).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def bundled_backend():
    from progvlm.backends.tiny import DEFAULT_WEIGHTS, TinyVLMBackend
    if not (DEFAULT_WEIGHTS / "model.safetensors").is_file():
        pytest.fail(f"bundled VLM weights missing at {DEFAULT_WEIGHTS}")
    return TinyVLMBackend.load()


@pytest.fixture(scope="session")
def split():
    """The bundled VLM with its MAE (progvlm.split.load_split), loaded once for the session:
    the services' tests build their apps and runtimes on it instead of loading it again."""
    from progvlm.split import load_split
    return load_split(None, None)


@dataclass(frozen=True)
class RunningCloud:
    url: str
    token: str


@pytest.fixture(scope="session")
def running_cloud(split):
    """The cloud backend (progvlm.serve.cloud) serving `split` on loopback, in a thread of
    this process: a real URL for CloudLink and the edge agent, without a second model load."""
    import uvicorn
    from progvlm.serve.cloud import create_app
    from progvlm.serve.children import free_port
    token, port = "test-cloud-token", free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(split, token), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the cloud backend did not start")
        time.sleep(0.02)
    yield RunningCloud(f"http://127.0.0.1:{port}", token)
    server.should_exit = True
    thread.join(5)
