"""Both services against their own OpenAPI schemas, property-based (schemathesis).

Whatever a schema says a client may send (and, in schemathesis's negative mode, what it says a
client may not), the service answers without a 5xx, with a status code, content type and body
that the same schema declares. The generated requests are mixed with real bodies, so that the
model path runs too, not only the input checks: a real PNG in the edge's multipart `image`,
and for the cloud a real JPEG (/v1/full) and a real bitstream from split.pack(split.edge(img))
(/v1/progressive), whole, cut and as each other's body.

Both apps run in-process (ASGI); the edge agent talks to a real cloud on loopback
(conftest.running_cloud). The fast set
runs a few fuzzed examples per operation with a fixed seed; `-m slow` runs many, seeded anew.
A failure prints the request as a curl command, and the check that failed with its reason.
"""
import io
import json

import pytest
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from progvlm.bitstream import parse
from progvlm.examples import load_examples
from progvlm.images import resize_for_model

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Q = "describe the scene ."
# What a truthful schema promises, checked on every response.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
FAST_EXAMPLES = 30  # per operation and generation mode, besides the schema's coverage cases
SLOW_EXAMPLES = 200


def _config(max_examples: int, seed: int | None, headers: dict | None = None):
    return schemathesis.Config.from_dict({
        **({"seed": seed} if seed is not None else {}),
        **({"headers": headers} if headers else {}),
        "generation": {"max-examples": max_examples, "database": "none"},
    })


# ---- real bodies ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_bodies(split):
    """A real camera frame as a PNG upload, as the JPEG full-cloud sends (the model's input
    size, q90) and as its bitstream (4 layers, and cut after layer 2). The PNG is a 64×64
    thumbnail: a failure prints the request as a curl command, bytes included."""
    frame = Image.open(load_examples()[1]["path"]).convert("RGB")
    png, jpeg = io.BytesIO(), io.BytesIO()
    frame.resize((64, 64), Image.LANCZOS).save(png, "PNG")
    resize_for_model(frame, split.vlm.input_size).save(jpeg, "JPEG", quality=90)
    stream = split.pack(split.edge(frame))
    cut = stream[:parse(stream).layer_ends()[1]]
    return {"png": png.getvalue(), "jpeg": jpeg.getvalue(), "bitstream": stream,
            "bitstream_cut": cut}


def _mixed_with(real: list[bytes]):
    """A hook for flatmap_body: the generated body, or a real one in its place (or, for a
    multipart form, in its `image` field), so every run both fuzzes and exercises the model."""
    def flatmap_body(context, body):
        if isinstance(body, (bytes, bytearray)):
            return st.one_of(st.just(body), st.sampled_from(real))
        if isinstance(body, dict) and "image" in body:
            return st.one_of(st.just(body), st.sampled_from(real).map(lambda b: {**body, "image": b}))
        return st.just(body)
    return flatmap_body


# ---- the two apps --------------------------------------------------------------------------

def _schema(app, real, max_examples, seed, headers=None):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app,
                                            config=_config(max_examples, seed, headers))
    schema.hook("flatmap_body")(_mixed_with(real))
    return schema


@pytest.fixture(scope="module")
def cloud_app(split):
    from progvlm.cloud_service import create_app
    return create_app(split, token=TOKEN)


@pytest.fixture(scope="module")
def edge_app(split, running_cloud):
    from edge_agent.agent import EdgeAgent
    from edge_agent.runtime import PyTorchRuntime
    from edge_agent.service import create_app
    runtime = PyTorchRuntime(split)
    # max_link_s: a fuzzed 0.01 Mbps / 10 s RTT request is refused (422) instead of taking
    # minutes on the emulated link; requests that fit run end to end
    yield create_app(EdgeAgent(runtime, running_cloud.url, running_cloud.token, max_link_s=0.5))
    runtime.set_threads(runtime.default_threads)


@pytest.fixture(scope="module")
def cloud_schema(cloud_app, real_bodies):
    return _schema(cloud_app, list(real_bodies.values()), FAST_EXAMPLES, seed=1,
                   headers=AUTH)


@pytest.fixture(scope="module")
def edge_schema(edge_app, real_bodies):
    return _schema(edge_app, [real_bodies["png"], real_bodies["jpeg"]], FAST_EXAMPLES, seed=1)


@pytest.fixture(scope="module")
def cloud_schema_slow(cloud_app, real_bodies):
    return _schema(cloud_app, list(real_bodies.values()), SLOW_EXAMPLES, seed=None,
                   headers=AUTH)


@pytest.fixture(scope="module")
def edge_schema_slow(edge_app, real_bodies):
    return _schema(edge_app, [real_bodies["png"], real_bodies["jpeg"]], SLOW_EXAMPLES, seed=None)


# ---- the fuzzers ---------------------------------------------------------------------------

@schemathesis.pytest.from_fixture("cloud_schema").parametrize()
def test_the_cloud_answers_as_its_schema_says(case):
    case.call_and_validate(checks=CHECKS)


@schemathesis.pytest.from_fixture("edge_schema").parametrize()
def test_the_edge_agent_answers_as_its_schema_says(case):
    case.call_and_validate(checks=CHECKS)


@pytest.mark.slow
@schemathesis.pytest.from_fixture("cloud_schema_slow").parametrize()
def test_the_cloud_answers_as_its_schema_says_many_examples(case):
    case.call_and_validate(checks=CHECKS)


@pytest.mark.slow
@schemathesis.pytest.from_fixture("edge_schema_slow").parametrize()
def test_the_edge_agent_answers_as_its_schema_says_many_examples(case):
    case.call_and_validate(checks=CHECKS)


# ---- the real bodies, as the schema says to send them --------------------------------------

def _body_media_type(operation) -> str:
    media_types = [body.media_type for body in operation.body]
    assert media_types, (f"{operation.label} declares no request body: a client reading the "
                         "schema cannot know what to send")
    return media_types[0]


@pytest.mark.parametrize("path, body, extra", [
    ("/v1/full", "jpeg", {}),
    ("/v1/progressive", "bitstream", {"layers_used": 4, "partial": False}),
    ("/v1/progressive", "bitstream_cut", {"layers_used": 2, "partial": True}),
])
def test_the_cloud_answers_real_bodies_sent_as_its_schema_says(cloud_schema, real_bodies, path,
                                                                body, extra):
    operation = cloud_schema[path]["POST"]
    case = operation.Case(query={"question": Q}, body=real_bodies[body],
                          media_type=_body_media_type(operation))
    response = case.call_and_validate(headers=AUTH, checks=CHECKS)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["answer"] and reply["received_bytes"] == len(real_bodies[body])
    assert {key: reply[key] for key in extra} == extra


@pytest.mark.parametrize("stream", [False, True])
def test_the_edge_agent_answers_a_real_png_sent_as_its_schema_says(edge_schema, real_bodies, stream):
    operation = edge_schema["/v1/ask"]["POST"]
    form = {"image": real_bodies["png"], "question": Q, "mode": "progressive", "k": 2,
            "rtt_ms": 0, "stream": stream}
    case = operation.Case(body=form, media_type=_body_media_type(operation))
    response = case.call_and_validate(checks=CHECKS)
    assert response.status_code == 200, response.text
    record = json.loads(response.text.splitlines()[-1])["record"] if stream else response.json()
    assert record["k"] == 2 and record["answer"]
