import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def bundled_backend():
    from progvlm.backends.tiny import DEFAULT_WEIGHTS, TinyVLMBackend
    if not (DEFAULT_WEIGHTS / "model.safetensors").is_file():
        pytest.fail(f"bundled VLM weights missing at {DEFAULT_WEIGHTS}")
    return TinyVLMBackend.load()
