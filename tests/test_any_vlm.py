"""Any VLM, end to end, by the README's own commands ("Use your own VLM"), with tiny random
transformers models standing in for real ones:

    make-random-vlm → train-mae (with distillation) → serve-cloud --vlm --mae
    → the edge agent in every mode → python app.py --vlm --mae and its /compare endpoint

The weights are random, so the answers are gibberish; what is checked is that every part runs
the same model: full-cloud and full-edge equal the whole model's answer, progressive decodes
every k, and a mismatched pair is refused.
"""
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_agent.agent import JPEG_QUALITY, EdgeAgent, PairingError
from edge_agent.runtime import PyTorchRuntime
from progvlm.cli.main import main as progvlm_main
from progvlm.images import load_image
from progvlm.serve.children import cloud_service, free_port
from progvlm.split import SplitError, load_split

ROOT = Path(__file__).resolve().parents[1]
Q = "what color is the cube?"
MODES = ("full-cloud", "full-edge", "progressive", "auto")


def write_images(folder: Path, count: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = rng.integers(48, 96, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


def make_pair(root: Path, preset: str, images: Path) -> tuple[Path, Path]:
    """The README's commands: a random VLM folder, then an MAE trained for it (distilled)."""
    vlm, mae = root / preset, root / f"{preset}-mae"
    assert progvlm_main(["make-random-vlm", "--preset", preset, "--out", str(vlm)]) == 0
    assert progvlm_main(["train-mae", "--vlm", str(vlm), "--images", str(images), "--steps", "4",
                         "--batch", "4", "--distill", "1.0", "--out", str(mae),
                         "--workdir", str(root / "work")]) == 0
    return vlm, mae


@pytest.fixture(scope="module", params=["tiny-idefics3-split", "tiny-smolvlm", "tiny-llava"])
def pair(request, tmp_path_factory, images):
    return make_pair(tmp_path_factory.mktemp("vlm"), request.param, images)


@pytest.fixture(scope="module")
def cloud(pair):
    vlm, mae = pair
    with cloud_service(vlm=vlm, mae=mae) as child:
        yield child  # its url, and its token (each child gets a fresh random one)


@pytest.mark.slow
def test_the_agent_answers_every_mode_with_the_same_vlm(pair, cloud, images):
    vlm, mae = pair
    runtime = PyTorchRuntime.load(str(vlm), mae)
    split = runtime.split
    agent = EdgeAgent(runtime, cloud.url, cloud.token)
    image = images / "im1.png"
    records = {m: agent.ask(image, Q, m, k=2, bandwidth_mbps=5, rtt_ms=2) for m in MODES}
    # full-edge: the whole model on the frame; full-cloud: the whole model on the JPEG it sent
    assert records["full-edge"]["answer"] == split.whole(load_image(image), Q).text
    sent = load_image(agent._jpeg(load_image(image), "camera", JPEG_QUALITY)[0])
    assert records["full-cloud"]["answer"] == split.whole(sent, Q).text
    for r in records.values():
        assert r["vlm_id"] == split.vlm.model_id
    frame = split.edge(load_image(image))
    if "split" in vlm.name:
        assert frame.grid is not None and frame.grid != (0, 0)  # the tile grid travels
    for k in range(1, split.num_layers + 1):
        r = agent.ask(image, Q, "progressive", k=k, bandwidth_mbps=5, rtt_ms=2)
        expected = split.cloud(split.unpack(split.pack(frame.prefix(k))), Q).text
        assert (r["k"], r["layers_used"], r["answer"]) == (k, k, expected)
    runtime.set_threads(runtime.default_threads)


@pytest.mark.slow
def test_a_mismatched_pair_is_refused(pair, cloud):
    # the bundled VLM at the edge, a transformers VLM in the cloud: refused before any request
    with pytest.raises(PairingError, match="runs VLM hf:.*this device runs VLM progvlm-tiny@"):
        EdgeAgent(PyTorchRuntime.load("bundled"), cloud.url, cloud.token)
    # an MAE trained for one VLM with another VLM
    with pytest.raises(SplitError, match="belongs to"):
        load_split("bundled", pair[1])
    # a transformers VLM without an MAE: the bundled MAE is not for it
    with pytest.raises(SplitError, match="no MAE given"):
        load_split(str(pair[0]))


@pytest.mark.slow
def test_serve_cloud_refuses_a_foreign_mae_with_a_reason(pair):
    out = subprocess.run([sys.executable, "-m", "progvlm", "serve-cloud", "--vlm", "bundled",
                          "--mae", str(pair[1]), "--port", str(free_port())],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "belongs to" in out.stderr


@pytest.mark.slow
def test_the_page_runs_the_chosen_vlm(tmp_path, images):
    """python app.py --vlm … --mae … starts, and /compare answers with that VLM."""
    from gradio_client import Client, handle_file
    vlm, mae = make_pair(tmp_path, "tiny-llava", images)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--vlm", str(vlm), "--mae", str(mae),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        *cards, chart, ladder, layer_map, notes, records = client.predict(
            handle_file(str(images / "im2.png")), Q, 1, 20, 2, list(MODES), 300, "host",
            api_name="/compare")
        assert [r["mode"] for r in records] == list(MODES)
        assert {r["vlm_id"] for r in records} == {f"hf:{vlm}"}
        assert records[1]["payload_bytes"] == 0 and records[0]["payload_bytes"] > 0
        assert len(ladder["data"] if isinstance(ladder, dict) else ladder) == 4
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_vlm_spec_that_cannot_load_says_why(tmp_path, capsys):
    from progvlm.backends import VLMSpecError, load_vlm
    with pytest.raises(VLMSpecError, match="not in the local Hugging Face cache.*hf download"):
        load_vlm("no-such-org/no-such-model")
    with pytest.raises(VLMSpecError, match="no such folder"):
        load_vlm(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VLMSpecError, match="no config.json"):
        load_vlm(str(tmp_path / "empty"))
    image = str(ROOT / "assets" / "examples" / "scene_00.png")
    assert progvlm_main(["ask", "--vlm", "no-such-org/no-such-model", "--image", image,
                         "--question", Q]) == 2
    assert "no-such-org/no-such-model" in capsys.readouterr().err


def test_smolvlm2_without_torchvision_is_refused_clearly(tmp_path, monkeypatch):
    """SmolVLM2's video processor needs torchvision, which has no build for the pinned torch."""
    import transformers
    from progvlm.backends.random_hf import write_random_vlm
    folder = write_random_vlm(tmp_path / "v", "tiny-smolvlm")

    def needs_torchvision(*args, **kwargs):
        raise ImportError("SmolVLMVideoProcessor requires the Torchvision library but it was not "
                          "found in your environment.")
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    from progvlm.backends import load_vlm
    with pytest.raises(ValueError, match="needs torchvision.*SmolVLM2"):
        load_vlm(str(folder))


def untrained_pair(root: Path, preset: str, images: Path) -> tuple[Path, Path]:
    """A stand-in VLM and an MAE whose codebooks saw its tokens for a few steps (no
    distillation): the fast set's pair, made in-process in a few seconds."""
    import torch
    from progvlm.backends import load_vlm
    from progvlm.backends.random_hf import write_random_vlm
    from progvlm.models.mae import MAE, MAEConfig
    from progvlm.training.train_mae import save_mae
    folder = write_random_vlm(root / preset, preset)
    vlm = load_vlm(str(folder))
    tokens = torch.cat([vlm.edge_half(load_image(p)) for p in sorted(images.iterdir())])
    mae = MAE(MAEConfig.for_tokens(vlm.tokens_per_block, vlm.token_dim))
    mae.cfg.vlm_id = vlm.model_id
    mae.train()
    blocks = tokens.view(-1, vlm.tokens_per_block, vlm.token_dim)
    for _ in range(3):
        mae(blocks, torch.randint(1, mae.cfg.num_layers + 1, (len(blocks),)))
    mae.eval()
    mae.invalidate_caches()
    save_mae(mae, root / f"{preset}-mae", {})
    return folder, root / f"{preset}-mae"


def test_a_tiled_vlm_through_the_cloud_service_in_every_mode(tmp_path, images):
    """Fast: the same pipeline in one process (cloud app on a loopback thread)."""
    import threading

    import uvicorn

    from progvlm.serve.cloud import create_app
    vlm, mae = untrained_pair(tmp_path, "tiny-idefics3-split", images)
    split = load_split(str(vlm), mae)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(split), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        runtime = PyTorchRuntime(split)
        agent = EdgeAgent(runtime, f"http://127.0.0.1:{port}")
        image = images / "im3.png"
        frame = split.edge(load_image(image))
        assert frame.grid == (2, 2) and frame.num_tokens == 20  # 4 tiles + the global view
        assert split.unpack(split.pack(frame)).grid == (2, 2)  # the grid travels in the header
        r = agent.ask(image, Q, "full-edge")
        assert r["answer"] == split.whole(load_image(image), Q).text
        for k in range(1, split.num_layers + 1):
            r = agent.ask(image, Q, "progressive", k=k, bandwidth_mbps=10, rtt_ms=0)
            assert r["answer"] == split.cloud(frame.prefix(k), Q).text and r["layers_used"] == k
        assert agent.ask(image, Q, "auto", budget_ms=5000, rtt_ms=0)["k"] == split.num_layers
        runtime.set_threads(runtime.default_threads)
    finally:
        server.should_exit = True
        thread.join(5)
