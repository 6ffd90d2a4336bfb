"""Both services against their own OpenAPI schemas, property-based (schemathesis).

Whatever a schema says a client may send (and, in schemathesis's negative mode, what it says a
client may not), the service answers without a 5xx, with a status code, content type and body
that the same schema declares. The generated requests are mixed with real bodies, so that the
model path runs too, not only the input checks: a real PNG in the edge's multipart `image`,
and for the cloud a real JPEG (/v1/full) and a real bitstream from split.pack(split.edge(img))
(/v1/progressive), whole, cut and as each other's body.

Both apps run in-process (ASGI); the edge agent talks to a real cloud on loopback
(conftest.running_cloud). The fast set runs 30 fuzzed examples per operation and generation
mode with a fixed seed, besides schemathesis's coverage cases (`python -m pytest
tests/test_api_fuzz.py`, ~15 s); `-m slow` runs 200, seeded anew each run. A failure prints the
check that failed with its reason, and the request as a curl command.
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
from schemathesis.transport.serialization import Binary

from edge_agent.agent import EdgeAgent
from edge_agent.modes import MODES
from edge_agent.runtime import PyTorchRuntime
from edge_agent.service import create_app as create_edge_app
from progvlm.codec.bitstream import parse
from progvlm.serve.cloud import create_app as create_cloud_app
from progvlm.toyworld.examples import load_examples
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


def _or_real(generated: dict, real: dict):
    """The generated fields, or with real values in place of some."""
    return st.one_of(st.just(generated), st.fixed_dictionaries(real).map(lambda r: {**generated, **r}))


def _hooks(schema, real_bodies: dict[str, list[bytes]]):
    """Generated requests, many of them carrying a real body (in the edge's multipart form, a
    real image) and a real question, so that the fuzzer reaches the model, not only the input
    checks. Each operation mostly gets its own kind of body, sometimes another's (a JPEG sent
    to /v1/progressive must be refused with a reason)."""
    every = [body for bodies in real_bodies.values() for body in bodies]

    def real_for(context):
        return st.sampled_from(real_bodies.get(context.operation.path, []) * 3 + every)

    @schema.hook
    def flatmap_body(context, body):
        if isinstance(body, (bytes, Binary)):  # a raw body (schemathesis wraps bytes in Binary)
            return st.one_of(st.just(body), real_for(context).map(Binary))
        if isinstance(body, dict):
            return _or_real(body, {"image": real_for(context), "question": st.just(Q),
                                   "mode": st.sampled_from(list(MODES))})
        return st.just(body)

    @schema.hook
    def flatmap_query(context, query):
        if "question" in context.operation.query:  # the cloud's question is in the query
            return _or_real(query or {}, {"question": st.just(Q)})
        return st.just(query)


# ---- the two apps --------------------------------------------------------------------------

# as a local program calls the services: they answer only Hosts that name them (TrustedHost)
LOCAL = {"Host": "127.0.0.1"}


def _schema(app, real, max_examples, seed, headers=None):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=LOCAL,
                                            config=_config(max_examples, seed, {**LOCAL, **(headers or {})}))
    _hooks(schema, real)
    return schema


@pytest.fixture(scope="module")
def cloud_app(split):
    return create_cloud_app(split, token=TOKEN)


@pytest.fixture(scope="module")
def edge_app(split, running_cloud):
    runtime = PyTorchRuntime(split)
    # max_link_s: a fuzzed 0.01 Mbps / 10 s RTT request is refused (422) instead of taking
    # minutes on the emulated link; requests that fit run end to end
    yield create_edge_app(EdgeAgent(runtime, running_cloud.url, running_cloud.token, max_link_s=0.5))
    runtime.set_threads(runtime.default_threads)


def _cloud_bodies(real: dict) -> dict:
    return {"/v1/full": [real["jpeg"], real["png"]],
            "/v1/progressive": [real["bitstream"], real["bitstream_cut"]]}


def _edge_bodies(real: dict) -> dict:
    return {"/v1/ask": [real["png"], real["jpeg"]]}


@pytest.fixture(scope="module")
def cloud_schema(cloud_app, real_bodies):
    return _schema(cloud_app, _cloud_bodies(real_bodies), FAST_EXAMPLES, seed=1, headers=AUTH)


@pytest.fixture(scope="module")
def edge_schema(edge_app, real_bodies):
    return _schema(edge_app, _edge_bodies(real_bodies), FAST_EXAMPLES, seed=1)


@pytest.fixture(scope="module")
def cloud_schema_slow(cloud_app, real_bodies):
    return _schema(cloud_app, _cloud_bodies(real_bodies), SLOW_EXAMPLES, seed=None, headers=AUTH)


@pytest.fixture(scope="module")
def edge_schema_slow(edge_app, real_bodies):
    return _schema(edge_app, _edge_bodies(real_bodies), SLOW_EXAMPLES, seed=None)


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
    response = case.call_and_validate(headers={**LOCAL, **AUTH}, checks=CHECKS)
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
    response = case.call_and_validate(headers=LOCAL, checks=CHECKS)
    assert response.status_code == 200, response.text
    record = json.loads(response.text.splitlines()[-1])["record"] if stream else response.json()
    assert record["k"] == 2 and record["answer"]
