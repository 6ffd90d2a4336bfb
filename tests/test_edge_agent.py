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


def test_packing_keeps_what_it_knew(split):
    """The agent sends the stream it packed without parsing it again: runtime.pack gives the
    same bytes as the codec's pack, with the header's and each layer's end as parse finds them."""
    from edge_agent.runtime import PyTorchRuntime
    runtime = PyTorchRuntime(split)
    frame = split.edge(load_image(load_examples()[3]["path"]), 3)
    packed = runtime.pack(frame.layers, frame.num_tokens, frame.grid)
    stream = parse(packed.data)
    assert packed.data == split.pack(frame) == runtime.frame_bytes(frame.layers, frame.num_tokens)
    assert (packed.header_bytes, packed.layer_ends) == (stream.header_bytes, stream.layer_ends())
    assert sum(packed.layer_bytes) + packed.header_bytes == len(packed.data)
    assert runtime.read(packed.data).packed() == packed
    assert runtime.stream_sizes(frame.layers, frame.num_tokens)[-1] == len(packed.data)


def test_every_surface_of_a_request_builds_from_one_model():
    """The HTTP form, the edge CLI and the client's form have the request model's fields, and
    the OpenAPI document its defaults and the link's own ranges."""
    from edge_agent.__main__ import NOT_ASK_OPTIONS, build_parser
    from edge_agent.request import AskRequest, CompareRequest, FrameRequest, as_form
    from edge_agent.service import AskForm, CompareForm
    from progvlm.net import link
    assert set(AskForm.model_fields) - {"image"} == set(AskRequest.model_fields)
    assert set(CompareForm.model_fields) - {"image"} == set(FrameRequest.model_fields) | {"modes"}
    ask = next(a for a in build_parser()._actions if a.dest == "command").choices["ask"]
    assert {a.dest for a in ask._actions} >= set(AskRequest.model_fields) - set(NOT_ASK_OPTIONS)
    schema = AskRequest.model_json_schema()["properties"]
    assert (schema["bandwidth_mbps"]["minimum"], schema["bandwidth_mbps"]["maximum"]) == (
        link.MIN_BANDWIDTH_MBPS, link.MAX_BANDWIDTH_MBPS)
    assert schema["rtt_ms"]["maximum"] == link.MAX_RTT_MS
    assert schema["budget_ms"]["default"] == CompareRequest.model_fields["budget_ms"].default
    assert as_form(AskRequest, question="q", k=None, conversation=True, rtt_ms=5) == {
        "question": "q", "conversation": "true", "rtt_ms": "5"}
    with pytest.raises(TypeError, match="no field bandwith"):
        as_form(AskRequest, question="q", bandwith=1)
