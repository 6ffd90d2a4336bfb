"""The edge side: image → frame (per-layer payloads) with per-stage times; clear errors for bad input."""
import io
import json

import pytest

from edge_agent.__main__ import main
from progvlm.codec.bitstream import parse
from progvlm.toyworld.examples import load_examples
from progvlm.images import ImageInputError, load_image
from progvlm.split import load_split


@pytest.fixture(scope="module")
def split():
    return load_split()


def test_edge_gives_a_decodable_frame_with_stage_times(split):
    frame = split.edge(load_image(load_examples()[2]["path"]), 2)
    bs = parse(split.pack(frame), expected_fingerprint=split.mae.fingerprint())
    assert len(bs.layers) == 2 and bs.layers == frame.layers and bs.grid is None
    assert set(frame.stage_ms) == {"edge_preprocess", "edge_vision", "mae_encode"}
    assert all(v > 0 for v in frame.stage_ms.values())
    tokens = split.decode(split.unpack(split.pack(frame)))
    assert tokens.shape == (split.mae.cfg.num_tokens, split.mae.cfg.token_dim)


@pytest.mark.parametrize("k", [0, 5, -1, 2.5])
def test_k_out_of_range_is_refused(split, k):
    with pytest.raises(ValueError, match="k must be an integer in 1..4"):
        split.edge(load_image(load_examples()[0]["path"]), k)


def test_non_image_is_refused():
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(io.BytesIO(b"hello").getvalue())


def test_cli_writes_the_stream_and_prints_json(tmp_path, capsys):
    out = tmp_path / "frame.pvb"
    assert main(["encode", "--image", load_examples()[1]["path"], "--k", "3", "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["bytes"] == len(out.read_bytes()) and record["k"] == 3
    assert record["vlm_id"].startswith("progvlm-tiny@")
    assert main(["encode", "--image", str(out), "--out", str(tmp_path / "x")]) == 2  # not an image
