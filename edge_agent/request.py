"""The request: every field of an ask or a compare, declared once with its type, default, range
and meaning (pydantic). Everything that takes a request builds from these models:

    edge_agent/service.py   the HTTP forms of POST /v1/ask and /v1/compare (FastAPI form models)
    EdgeAgent.check         `parse` → an AskRequest (AskError with the reasons)
    edge_agent/client.py    `as_form` → the multipart fields it sends
    python -m edge_agent    ask's options, one per field
    app.py                  the page's defaults and ranges (`AskRequest.model_json_schema()`)

A field's range is checked where the model is validated, with a message that names the range
(422 over HTTP). The link's ranges are progvlm.net.link's and the question's limit
progvlm.net.protocol's: the model references them. One field depends on the loaded model: k
(1..L, L the MAE's layers), checked by the progressive mode (edge_agent/modes/progressive.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated

from pydantic import (AfterValidator, BaseModel, BeforeValidator, Field, PrivateAttr, ValidationError,
                      field_validator, model_validator)

from progvlm.net.link import MAX_BANDWIDTH_MBPS, MAX_RTT_MS, MIN_BANDWIDTH_MBPS, LinkProfile
from progvlm.net.protocol import MAX_QUESTION_CHARS, check_question

from .errors import AskError
from .modes import MODES
from .profiles import PROFILES, DeviceProfile, get_profile

DEFAULT_BUDGET_MS = 500.0
JPEG_QUALITY = 90  # full-cloud's default
MAX_JPEG_QUALITY = 95  # (Pillow's useful range is 1..95)
# full-cloud's frame: the camera's own (what a device without the model would send), or the
# frame already resized to the model's input (which presumes the device knows the model)
FRAMES = ("camera", "model")
IMAGE_FORMATS = ("file", "rgb24")


def _no_bool(value):
    if isinstance(value, bool):  # (pydantic would read True as 1)
        raise ValueError(f"must be a number, not {value!r}")
    return value


Number = Annotated[float, BeforeValidator(_no_bool)]
Integer = Annotated[int, BeforeValidator(_no_bool)]


def one_of(name: str, choices):
    """A validator: the value is one of `choices`, else the error names the field and them."""
    def check(value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value
    return AfterValidator(check)


def within(name: str, low, high, what: str):
    """A validator: low <= value <= high (None passes), else the error names the range."""
    def check(value):
        if value is not None and not low <= value <= high:
            raise ValueError(f"{name} must be {what} in {low}..{high}, got {value!r}")
        return value
    return AfterValidator(check)


def _range(low, high=None, exclusive_low: bool = False) -> dict:
    """A range as the OpenAPI document shows it (the validators below enforce it)."""
    return {"exclusiveMinimum" if exclusive_low else "minimum": low,
            **({"maximum": high} if high is not None else {})}


class FrameRequest(BaseModel):
    """The fields of one question about one frame, shared by ask and compare."""
    question: str = Field(description=f"the question about the frame (at most {MAX_QUESTION_CHARS} "
                                      "characters; the model may read fewer words)")
    k: Integer | None = Field(None, description="progressive: the layers to send, 1..L (GET /v1/info's "
                                                "num_layers); default: all L")
    bandwidth_mbps: Number = Field(1.0, description="the uplink's bandwidth (Mbps)",
                                   json_schema_extra=_range(MIN_BANDWIDTH_MBPS, MAX_BANDWIDTH_MBPS))
    rtt_ms: Number = Field(20.0, description="the link's round-trip time (ms)",
                           json_schema_extra=_range(0, MAX_RTT_MS))
    budget_ms: Number = Field(DEFAULT_BUDGET_MS, description="auto's and adaptive's end-to-end latency "
                              "budget (ms)", json_schema_extra=_range(0, exclusive_low=True))
    device_profile: str | None = Field(None, description="the device whose compute times the record "
                                       f"shows ({', '.join(PROFILES)}); default: the agent's own")
    frame: Annotated[str, one_of("frame", FRAMES)] = Field(
        "camera", description="full-cloud's JPEG: the camera frame or the frame at the model's "
        "input size", json_schema_extra={"enum": list(FRAMES)})
    jpeg_quality: Annotated[Integer, within("jpeg_quality", 1, MAX_JPEG_QUALITY, "an integer")] = Field(
        JPEG_QUALITY, description="full-cloud's JPEG quality",
        json_schema_extra=_range(1, MAX_JPEG_QUALITY))
    link_emulation: bool = Field(True, description="false: a real shaped network lies between agent "
                                 "and cloud; nothing is paced here")
    image_format: Annotated[str, one_of("image_format", IMAGE_FORMATS)] = Field(
        "file", description="file (PNG, JPEG, …) or rgb24 (a raw camera frame of width × height)",
        json_schema_extra={"enum": list(IMAGE_FORMATS)})
    width: Integer | None = Field(None, description="rgb24: the frame's width in pixels")
    height: Integer | None = Field(None, description="rgb24: the frame's height in pixels")
    _link: LinkProfile | None = PrivateAttr(None)

    @property
    def link(self) -> LinkProfile:
        """The link the request describes (its ranges checked once, by LinkProfile.checked)."""
        return self._link

    @field_validator("question")
    @classmethod
    def _question(cls, question):
        return check_question(question)  # the cloud's limit (progvlm.net.protocol)

    @field_validator("budget_ms")
    @classmethod
    def _budget(cls, budget_ms):
        if not (math.isfinite(budget_ms) and budget_ms > 0):
            raise ValueError(f"the latency budget must be a positive number of ms, got {budget_ms!r}")
        return budget_ms

    @field_validator("device_profile")
    @classmethod
    def _device(cls, name):
        if name is not None:
            get_profile(name)  # ValueError naming the known profiles
        return name

    @model_validator(mode="after")
    def _check_link(self):
        # every mode: full-edge sends nothing, but a caller's values are checked alike
        self._link = LinkProfile.checked(self.bandwidth_mbps, self.rtt_ms, emulated=self.link_emulation)
        return self


class AskRequest(FrameRequest):
    """One question about one frame in one mode (POST /v1/ask)."""
    mode: str = Field("progressive", description="one of the agent's modes (GET /v1/info lists them)")
    cut_after_layer: Integer | None = Field(None, description="fault injection: the uplink dies after "
                                            "this many layers (progressive and auto)")
    stream: bool = Field(False, description="answer as NDJSON lines: a refinement per layer as the "
                         "cloud answers it, then the record")
    conversation: bool = Field(False, description="keep the frame at the cloud and resume it if held: a "
                               "follow-up question about the same pixels sends no image bytes "
                               "(progressive, auto, adaptive)")
    new_conversation: bool = Field(False, description="with conversation: this is a conversation's first "
                                   "question, so the frame is sent afresh whatever the cloud holds of it")
    adaptive_threshold: Annotated[Number | None, within("adaptive_threshold", 0, 1, "a number")] = Field(
        None, description="adaptive: stop once the answer's confidence reaches this (default: "
        "the cloud's)", json_schema_extra=_range(0, 1))

    @field_validator("mode")
    @classmethod
    def _mode(cls, mode):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        return mode

    @model_validator(mode="after")
    def _new_conversation(self):
        if self.new_conversation and not self.conversation:
            raise ValueError("new_conversation starts a conversation: it needs conversation=true")
        return self


class CompareRequest(FrameRequest):
    """One question about one frame in several modes (POST /v1/compare)."""
    modes: str | None = Field(None, description="comma-separated, of the agent's modes (GET /v1/info); "
                              "default: every one", validate_default=True)

    @field_validator("modes", mode="before")
    @classmethod
    def _modes(cls, modes):
        if modes is None:
            return ",".join(MODES)
        if isinstance(modes, (list, tuple)):
            modes = ",".join(modes)
        if not isinstance(modes, str):
            raise ValueError(f"modes must be a comma-separated string, got {modes!r}")
        names = list(dict.fromkeys(m.strip() for m in modes.split(",") if m.strip()))
        unknown = [m for m in names if m not in MODES]
        if not names or unknown:
            raise ValueError(f"modes must be a non-empty list of {', '.join(MODES)}"
                             + (f"; unknown: {', '.join(map(repr, unknown))}" if unknown else ""))
        return ",".join(names)

    @property
    def mode_names(self) -> list[str]:
        return self.modes.split(",")

    def for_mode(self, mode: str) -> AskRequest:
        """The ask of one of its modes: the same fields, already checked."""
        ask = AskRequest.model_construct(mode=mode, **{n: getattr(self, n) for n in FrameRequest.model_fields})
        ask._link = self._link
        return ask


@dataclass
class CheckedAsk:
    """One request, checked whole and its image decoded: what `EdgeAgent.run` needs."""
    request: AskRequest
    mode: object  # its edge_agent.modes.Mode
    k: int  # the layers asked (request.k, else all L)
    image: object  # PIL image
    decode_ms: float  # measured (not yet scaled by the profile)
    from_file: bool  # decoded from a file (host work, its own stage) or a raw camera frame
    profile: DeviceProfile
    client: str  # who asks: auto learns its estimates per client
    deadline: float  # time.monotonic() by which the record must be ready
    t_arrived: float  # time.perf_counter() when the check began: the record's wall_ms counts from it

    @property
    def link(self) -> LinkProfile:
        return self.request.link

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()


def reasons(errors: list[dict]) -> str:
    """pydantic's (or FastAPI's) validation errors as one sentence: each names its field."""
    out = []
    for err in errors:
        field = ".".join(str(part) for part in err["loc"] if part not in ("body", "query"))
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        out.append(msg if not field or msg.startswith(field) else f"{field}: {msg}")
    return "; ".join(out)


def _known(model: type[BaseModel], fields: dict):
    unknown = sorted(set(fields) - set(model.model_fields))
    if unknown:
        raise TypeError(f"{model.__name__} has no field {', '.join(unknown)}")


def parse(model: type[BaseModel], **fields) -> BaseModel:
    """`model` from keyword fields (a Python caller's), or AskError with the reasons."""
    _known(model, fields)
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise AskError(reasons(e.errors())) from None


def as_form(model: type[BaseModel], **fields) -> dict[str, str]:
    """The multipart form fields for `model`'s given fields (None: not sent, the agent's default)."""
    _known(model, fields)
    form = {}
    for name, value in fields.items():
        if value is None:
            continue
        form[name] = (("true" if value else "false") if isinstance(value, bool) else
                      ",".join(value) if isinstance(value, (list, tuple)) else str(value))
    return form
