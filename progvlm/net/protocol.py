"""The edge–cloud protocol: the paths, limits, request kinds, WebSocket messages and error rule
that both sides import (the cloud, progvlm.serve; the edge's transport, progvlm.net.transport),
so that what the edge sends and checks is exactly what the cloud reads and accepts.

    GET  INFO_PATH         the cloud's models (the edge compares them with its own)
    POST FULL_PATH         an image → the whole VLM
    POST PROGRESSIVE_PATH  a bitstream (or a prefix) → MAE decode → the language half
    WS   STREAM_PATH       a session of requests, in sequence on one socket:

edge → cloud, per request     Start (text), the body in binary messages, END (text)
cloud → edge                  Refinement (progressive: after each newly complete layer, or once
                              without refine), then Final (ProgressiveFinal or FullFinal);
                              Resumed or Missing first when the Start asks to resume a frame;
                              Error instead of anything, and the socket closes with
                              close_code(status)

Every message is a JSON object whose `type` names it (the Start and END have none); every
duration in one is in ms (to_ms).
"""
from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, StrictBool, ValidationError,
                      model_validator)

from .frame_cache import check_frame_id

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
MAX_CONTROL_CHARS = 4096  # a Start or END message is a few dozen characters

# the `type` of each message the cloud sends
REFINEMENT, FINAL, ERROR, RESUMED, MISSING = "refinement", "final", "error", "resumed", "missing"
LAST_OF_REQUEST = (FINAL, ERROR)  # after one of these the socket carries the next request, or closes
END = {"end": True}  # the edge's last message of a request's body
INTERNAL_ERROR_CLOSE = 1011  # WebSocket close code: the server met an unexpected condition


class RequestError(Exception):
    """A request the cloud refuses: the HTTP status that says why (4xx) and the reason."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def to_ms(seconds: float) -> float:
    """A duration as every message states one: in ms, to the µs."""
    return round(seconds * 1e3, 3)


def close_code(status: int) -> int:
    """The WebSocket close code for an error of HTTP `status`: 4000 + status for a refused
    request (4xx), 1011 for an internal error (5xx)."""
    return INTERNAL_ERROR_CLOSE if status >= 500 else 4000 + status


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


_START_QUESTION = "field `question`"


# ---- edge → cloud --------------------------------------------------------------------------
class Start(BaseModel):
    """A request's first message. `refine`: answer after every layer (else once, when the layers
    are in); `keep_open`: the socket waits for the next request after the final answer;
    `frame_id`: the cloud keeps the frame for follow-ups (progvlm.net.frame_cache); `resume`:
    answer from the frame the cloud holds under `frame_id`, if it still does."""
    question: Annotated[str, BeforeValidator(lambda q: check_question(q, _START_QUESTION))]
    refine: StrictBool = True
    keep_open: StrictBool = False
    resume: StrictBool = False
    kind: Literal[KINDS] = "progressive"
    frame_id: Annotated[str | None, BeforeValidator(lambda f: f if f is None else check_frame_id(f))] = None

    @model_validator(mode="after")
    def _resume_names_a_frame(self):
        if self.resume and self.frame_id is None:
            raise ValueError("resume needs the frame_id of the frame to resume")
        return self

    @classmethod
    def message(cls, question: str, **fields) -> str:
        """The message's text, as the edge sends it (unchecked: the cloud checks it)."""
        return cls.model_construct(question=question, **fields).model_dump_json(exclude_defaults=True)


def control_json(text: str):
    """A control message's JSON, or ValueError: unparsable, or nested so deep that the parser
    would exhaust the stack (`[` × 2000 fits in MAX_CONTROL_CHARS)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def start_object(text: str | None, shape: str) -> dict:
    """A first message's JSON object (None: it was binary); RequestError saying why not.
    `shape`: how the object looks, for the message (e.g. '{"question": …}')."""
    if text is None:
        raise RequestError(400, f"expected a JSON start message {shape} first, got binary data")
    if len(text) > MAX_CONTROL_CHARS:
        raise RequestError(413, f"start message of {len(text)} characters, at most {MAX_CONTROL_CHARS}")
    try:
        start = control_json(text)
    except ValueError as e:
        raise RequestError(400, f"the start message is not JSON: {e}") from None
    if not isinstance(start, dict):
        raise RequestError(422, f"the start message must be a JSON object {shape}")
    return start


def parse_start(text: str | None) -> Start:
    """A request's first message (None: it was binary) → Start; RequestError saying why not."""
    start = start_object(text, '{"question": …}')
    try:
        return Start.model_validate(start)
    except ValidationError as e:
        raise RequestError(422, _first_reason(e.errors())) from None


def _first_reason(errors: list[dict]) -> str:
    """The first of pydantic's errors about a Start, in the protocol's words."""
    e = errors[0]
    name = e["loc"][0] if e["loc"] else "start"
    if e["type"] == "missing":  # only the question has no default
        return f"a question is required ({_START_QUESTION})"
    if e["type"] == "bool_type":
        return f"{name} must be true or false (a JSON boolean), got {e['input']!r}"
    if e["type"] == "literal_error":
        return f"{name} must be one of {', '.join(KINDS)}, got {e['input']!r}"
    return str(e["ctx"]["error"]) if "error" in e.get("ctx", {}) else f"{name}: {e['msg']}"


def check_end(text: str | None):
    """RequestError unless `text` (None: a binary message) is END: inside a request, anything
    but the body's bytes must be END."""
    try:
        end = text is not None and len(text) <= MAX_CONTROL_CHARS and control_json(text) == END
    except ValueError:
        end = False
    if not end:
        raise RequestError(400, 'inside a request, expected binary data or {"end": true}, got '
                                f"{(text or '')[:80]!r}")


# ---- cloud → edge --------------------------------------------------------------------------
class Message(BaseModel):
    type: str  # which message this is (each kind fixes it)


class Answered(BaseModel):
    """An answer of the language half (also the HTTP routes' answers, progvlm.serve.cloud)."""
    answer: str
    # how sure the language half was of its answer, in [0, 1] (null: the backend cannot tell)
    confidence: float | None = None


class Refinement(Answered, Message):
    """The answer from the first `layers` layers."""
    type: Literal[REFINEMENT] = REFINEMENT
    layers: int
    stage_ms: dict[str, float]  # the cloud's stages of this answer
    received_ms: float  # first byte to layer `layers` complete, as the cloud saw them
    t_ms: float  # first byte to this answer


class ProgressiveFinal(Answered, Message):
    """A progressive request's end: its newest answer (from `layers` of `layers_announced`)."""
    type: Literal[FINAL] = FINAL
    layers: int
    layers_announced: int
    partial: bool
    received_bytes: int
    resumed: bool


class FullFinal(Answered, Message):
    """A full request's answer (the backend's own fields, e.g. batch_size, ride along)."""
    model_config = ConfigDict(extra="allow")
    type: Literal[FINAL] = FINAL
    stage_ms: dict[str, float]
    received_bytes: int
    receive_ms: float  # first byte to last as the cloud saw them
    resumed: bool


class Error(Message):
    type: Literal[ERROR] = ERROR
    status: int  # as HTTP would say it
    detail: str


class Resumed(Message):
    """The cloud holds `layers` layers (`received_bytes` of the stream) of the frame."""
    type: Literal[RESUMED] = RESUMED
    frame_id: str
    layers: int
    received_bytes: int


class Missing(Message):
    """The cloud holds nothing of the frame: the edge sends it from its start."""
    type: Literal[MISSING] = MISSING
    frame_id: str
    detail: str = ("this cloud holds no such frame for this client (never sent, expired, evicted, "
                   "or the cloud restarted): send it from its start")


# ---- streams of frames (a camera that watches: progvlm.serve.watch) ------------------------------
# WS WATCH_PATH   edge → cloud: WatchStart (text), then one binary message per frame (a key or
#                 delta frame of progvlm.codec.temporal, a JPEG, or an H.264 packet), END to finish
#                 cloud → edge: Watching once, then per frame a FrameAck (events: only the
#                 standing questions whose answer changed) or a Resync; Error and close for
#                 anything refused
WATCH_PATH = "/v1/watch"
FRAME_CODECS = ("layers", "jpeg", "h264")  # how a stream's frames travel
MAX_STANDING_QUESTIONS = 8
WATCH_IDLE_S = 30.0  # a stream with no frame for this long is closed (4408)
MAX_STREAMS_PER_CLIENT = 4  # watch sockets open at once per client address
WATCHING, FRAME, RESYNC = "watching", "frame", "resync"


class WatchStart(BaseModel):
    """A stream's first message: its standing questions, answered on every frame, and how its
    frames travel. `refines`: the edge may send more layers of a frame while an answer is unsure
    (adaptive), so the cloud runs the adaptive rule's refinement probe on answers from layer 1,
    as it does for a single request whose stream announced more layers."""
    questions: list[Annotated[str, BeforeValidator(lambda q: check_question(q, "questions"))]]
    codec: Literal[FRAME_CODECS] = "layers"
    refines: bool = False

    @model_validator(mode="after")
    def _some_questions(self):
        if not 1 <= len(self.questions) <= MAX_STANDING_QUESTIONS:
            raise ValueError(f"a stream has 1..{MAX_STANDING_QUESTIONS} standing questions, "
                             f"got {len(self.questions)}")
        return self


class Watching(Message):
    """The stream is open: the cloud holds no reference yet (the first frame must be a key).
    `adaptive_threshold`: the confidence at which an answer is sure enough (the split's
    calibrated rule), for an edge that refines unsure frames with more layers."""
    type: Literal[WATCHING] = WATCHING
    questions: int
    adaptive_threshold: float | None = None


class Event(BaseModel):
    """A standing question whose answer changed on this frame (previous None: the first answer)."""
    question: str
    answer: str
    previous: str | None
    confidence: float | None = None


class FrameAck(Message):
    """Frame `index` (0-based, frames decoded on this stream) is decoded and held: the next delta
    is coded against it. `kind`: key/delta (layers), jpeg or h264."""
    type: Literal[FRAME] = FRAME
    index: int
    kind: str
    layers: int | None
    received_bytes: int
    events: list[Event]
    confidence_min: float | None  # the least sure of the standing questions' answers
    stage_ms: dict[str, float]
    t_ms: float  # since the stream's first frame arrived, as the cloud saw it


class Resync(Message):
    """The frame could not be decoded against what the cloud holds (no reference: a new or
    restarted cloud, another shape): nothing of it was used; send it again as a key frame."""
    type: Literal[RESYNC] = RESYNC
    index: int
    detail: str


def parse_watch_start(text: str | None) -> WatchStart:
    """A stream's first message → WatchStart; RequestError saying why not."""
    start = start_object(text, '{"questions": [...]}')
    try:
        return WatchStart.model_validate(start)
    except ValidationError as e:
        err = e.errors()[0]
        raise RequestError(422, str(err["ctx"]["error"]) if "error" in err.get("ctx", {})
                           else f"{'.'.join(map(str, err['loc'])) or 'start'}: {err['msg']}") from None
