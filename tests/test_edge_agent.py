"""The edge side: image → bitstream with per-stage times; clear errors for bad input."""
import io
import json

import pytest

from edge_agent.__main__ import main
from edge_agent.device import EdgeDevice
from progvlm.bitstream import parse
from progvlm.examples import load_examples
from progvlm.images import ImageInputError


@pytest.fixture(scope="module")
def device():
    return EdgeDevice.bundled()


def test_encode_gives_a_decodable_stream_with_stage_times(device):
    path = load_examples()[2]["path"]
    result = device.encode(path, 2)
    bs = parse(result.bitstream, expected_fingerprint=device.runtime.mae.fingerprint())
    assert len(bs.layers) == 2 and result.layer_bytes == [len(p) for p in bs.layers]
    assert set(result.stage_ms) == {"edge_preprocess", "edge_vision", "mae_encode"}
    assert all(v > 0 for v in result.stage_ms.values())
    tokens, _ = device.runtime.mae.decompress(result.bitstream)
    assert tokens.shape == (device.runtime.mae.cfg.num_tokens, device.runtime.mae.cfg.token_dim)


@pytest.mark.parametrize("k", [0, 5, -1, 2.5])
def test_k_out_of_range_is_refused(device, k):
    with pytest.raises(ValueError, match="k must be an integer in 1..4"):
        device.encode(load_examples()[0]["path"], k)


def test_non_image_is_refused(device):
    with pytest.raises(ImageInputError, match="not an image"):
        device.encode(io.BytesIO(b"hello").getvalue(), 1)


def test_cli_writes_the_stream_and_prints_json(tmp_path, capsys):
    out = tmp_path / "frame.pvb"
    assert main(["encode", "--image", load_examples()[1]["path"], "--k", "3", "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["bytes"] == len(out.read_bytes()) and record["k"] == 3
    assert main(["encode", "--image", str(out), "--out", str(tmp_path / "x")]) == 2  # not an image
