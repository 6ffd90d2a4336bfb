"""The edge–cloud protocol: the paths, limits and request kinds that both sides import, so that
what the edge checks before its work is exactly what the cloud will accept.

    GET  INFO_PATH         the cloud's models (the edge compares them with its own)
    POST FULL_PATH         an image → the whole VLM
    POST PROGRESSIVE_PATH  a bitstream (or a prefix) → MAE decode → the language half
    WS   STREAM_PATH       a session of requests (kinds KINDS), see cloud_service's stream route
"""
from __future__ import annotations

INFO_PATH = "/v1/info"
FULL_PATH = "/v1/full"
PROGRESSIVE_PATH = "/v1/progressive"
STREAM_PATH = "/v1/progressive/stream"
KINDS = ("progressive", "full")  # what one request on the stream carries

MAX_QUESTION_CHARS = 500
# The most time one request may spend on the shaped link (round trip + payload + reply at the
# asked bandwidth); the edge refuses a request that would take longer before sending anything.
# The link's own ranges (progvlm.net.link: 0.01–10000 Mbps, RTT 0–10000 ms) are checked first.
MAX_LINK_S = 120.0
# The most time one request may take from its start to its answer, by default: the link's bound
# and a minute of compute and of waiting for the device (one request at a time). The cloud cuts
# a request on its stream that takes longer (a client trickling bytes to hold it open).
COMPUTE_ALLOWANCE_S = 60.0
REQUEST_TIMEOUT_S = MAX_LINK_S + COMPUTE_ALLOWANCE_S


def check_question(question, where: str = "question") -> str:
    """`question` if the cloud will read it (a non-blank string of at most MAX_QUESTION_CHARS
    characters), else ValueError saying why; `where` names the field in the message. The
    model may refuse a shorter one still (its own token limit: the backends' check_question)."""
    if question is not None and not isinstance(question, str):
        raise ValueError(f"the question ({where}) must be a string, got {type(question).__name__}")
    if question is None or not question.strip():
        raise ValueError(f"a question is required ({where})")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"question too long: {len(question):,} characters, at most "
                         f"{MAX_QUESTION_CHARS}")
    return question
