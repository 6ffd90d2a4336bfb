"""One request from the edge to the cloud on an open channel: the session that reads, sends and
times it, and the layer schedules that drive it (progvlm.net.transport runs them: its one
exchange loop). A schedule is a generator of Rounds: each round sends some bytes (paced), maybe
ends the body, and waits for one message, which the schedule receives back; its return value
is the Exchange.

    full         one round: the image, the end, the final answer
    progressive  one round: every layer, paced, the refinements seen as they come, then the
                 final (or, on a cut link, the answer to the last layer that got through)
    steered      layers sent on demand: a round per layer the answers ask for (adaptive), after
                 a round that asks the cloud for a frame it holds (a conversation)

Time accounting, the same for every schedule (stages add up to the exchange's wall time):
    uplink    per round of sending, RTT/2 + the bytes at the bandwidth as really sent; on the
              emulated link at most what the link takes (a delay past that is no link's: e.g.
              the sender waiting for a cloud in the same process, which has begun computing, is
              overhead); where the cloud computed nothing while the bytes arrived (full, and
              progressive without refinements), at least RTT/2 + the cloud's receive time (a
              kernel buffer in front of a slow real link takes the bytes long before they arrive)
    downlink  each message the edge acts on (it sends more, or has its answer): RTT/2 + its bytes
              at the bandwidth (on a real link, at most what the wait left after the cloud's
              compute). A message it only waits past travelled while the cloud computed.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterable, Protocol

from .link import LinkProfile, paced_chunks, paced_segments
from .protocol import END, ERROR, FINAL, LAST_OF_REQUEST, MISSING, REFINEMENT, RESUMED, to_ms

PACING_SLACK_S = 0.001  # a paced round's own bookkeeping, counted as uplink


class ChannelClosed(Exception):
    """The channel to the cloud closed (or was found closed)."""


class Channel(Protocol):
    """An open, ordered, message-based connection to the cloud's stream route."""

    def send(self, message: str | bytes) -> None: ...  # ChannelClosed if closed
    def recv(self) -> str: ...  # the next text message; ChannelClosed if closed
    def close(self) -> None: ...


class CloudError(RuntimeError):
    """The cloud could not be reached or refused the request; str(e) says which and why."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Stale(Exception):
    """A reused channel turned out closed before the cloud saw the request: open another."""


@dataclass
class Exchange:
    reply: dict
    uplink_ms: float
    downlink_ms: float
    wall_ms: float
    refinements: list[dict] = field(default_factory=list)
    cut_after_layer: int | None = None
    connect_ms: float = 0.0  # 0 on a reused socket
    # steered exchanges (Transport.steered) only:
    bytes_sent: int | None = None  # the frame's bytes sent in this request (0: all resumed)
    resumed: bool | None = None  # None: not asked; else whether the cloud held the frame
    layers_held: int = 0  # layers the cloud already held when the request began
    cloud_waited_ms: float | None = None  # cloud time of the earlier answers the edge waited for

    def overhead_ms(self, cloud_ms: float) -> float:
        """The wall time no other stage accounts for (cloud_ms: the cloud stages counted)."""
        return max(0.0, self.wall_ms - self.connect_ms - self.uplink_ms - self.downlink_ms - cloud_ms)

    def link_stages_ms(self, cloud_ms: float) -> dict[str, float]:
        """connect, uplink, downlink and overhead: with the cloud's stages, the wall time."""
        return {"connect": self.connect_ms, "uplink": self.uplink_ms, "downlink": self.downlink_ms,
                "overhead": round(self.overhead_ms(cloud_ms), 3)}


@dataclass
class Round:
    """One round of a schedule: `send` (None: nothing) paced on the link, then END if `end`,
    then the first message `wait` accepts, within `within_s` (None: the transport's timeout);
    without it a `required` wait is a CloudError, another one gives None."""
    send: Iterable[bytes] | None = None
    end: bool = False
    wait: Callable[[dict], bool] | None = None
    within_s: float | None = None
    required: bool = True


Schedule = Callable[["Session"], Generator[Round, "dict | None", Exchange]]


def is_final(msg: dict) -> bool:
    return msg["type"] == FINAL


def answer_to(layers: int) -> Callable[[dict], bool]:
    """A wait for the answer from `layers` layers (or more: a cut link's last)."""
    return lambda msg: msg["type"] == REFINEMENT and msg["layers"] >= layers


def final_reply(answer: dict, layers_announced: int, partial: bool, **extra) -> dict:
    """The final message's fields from the refinement the exchange ends on."""
    return {"type": FINAL, "layers": answer["layers"], "answer": answer["answer"],
            "confidence": answer.get("confidence"), "layers_announced": layers_announced,
            "partial": partial, "stage_ms": answer["stage_ms"], **extra}


class Session:
    """One request on one channel: a thread reads the cloud's messages as they arrive (until
    the final or error message, or the channel closes), stamping each with when the edge has
    it; the exchange loop sends rounds and waits through it."""

    def __init__(self, channel: Channel, link: LinkProfile, t0: float, connect_s: float,
                 reused: bool, timeout_s: float, what: str, on_refinement=None):
        self.channel, self.link, self.t0, self.connect_s = channel, link, t0, connect_s
        self.reused, self.timeout_s, self.what = reused, timeout_s, what
        self.on_refinement = on_refinement
        self.refinements: list[dict] = []
        self.final: dict | None = None
        self.received = 0
        self.ended = False  # END sent
        self.uplink_s = 0.0
        self._downlink_ms = self._latest_downlink_ms = 0.0
        self._t_wait = t0
        self._inbox: queue.Queue = queue.Queue()
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True, name="cloud-reader").start()

    def _read(self):
        try:
            while True:
                raw = self.channel.recv()
                arrived = time.perf_counter()
                msg = json.loads(raw)
                self.received += 1
                self._stamp(msg, len(raw), arrived)
                if msg.get("type") == REFINEMENT:
                    self.refinements.append(msg)
                    if self.on_refinement:
                        self.on_refinement(msg)
                elif msg.get("type") == FINAL:
                    self.final = msg
                self._inbox.put(msg)
                if msg.get("type") in LAST_OF_REQUEST:
                    return
        except ChannelClosed:
            pass
        finally:
            self.done.set()

    def _stamp(self, msg: dict, nbytes: int, arrived: float):
        """A cloud message as the edge sees it: its downlink (RTT/2 and its bytes at the link's
        bandwidth) and when it is in hand, `edge_t_ms` after the request began (after that
        downlink on the emulated link; a real network has delivered it when it arrived)."""
        msg["downlink_ms"] = to_ms(self.link.rtt_ms / 2000 + self.link.serialisation_s(nbytes))
        msg["edge_t_ms"] = round(to_ms(arrived - self.t0) + (msg["downlink_ms"] if self.link.emulated else 0), 3)

    def send(self, messages: Iterable[str | bytes]):
        """One round of sending: the request's propagation, then the messages (paced by their
        iterator). A reused channel found closed before any reply raises Stale."""
        self._downlink_ms += self._latest_downlink_ms  # the edge acted on what it last waited for
        self._latest_downlink_ms = 0.0
        t, nbytes = time.perf_counter(), 0
        self.link.propagate()
        try:
            for message in messages:
                self.channel.send(message)
                nbytes += len(message)
        except ChannelClosed:
            self.done.wait(1.0)  # the cloud hung up: an error message may say why
            if self.reused and not self.received:
                raise Stale from None
        measured = time.perf_counter() - t
        link = self.link
        self.uplink_s += (min(measured, link.rtt_ms / 2000 + link.serialisation_s(nbytes) + PACING_SLACK_S)
                          if link.emulated else measured)
        self._t_wait = time.perf_counter()

    def end(self):
        try:
            self.channel.send(json.dumps(END))
        except ChannelClosed:
            pass  # the error message, if any, is already in
        self.ended = True

    def cloud_received(self, receive_ms: float):
        """The cloud computed nothing while the bytes arrived: its receive time bounds the uplink."""
        self.uplink_s = max(self.uplink_s, self.link.rtt_ms / 2000 + receive_ms / 1e3)

    def wait_for(self, wanted, within_s: float | None = None, required: bool = True) -> dict | None:
        """The first message `wanted` accepts, as the edge has it (take). An error message is a
        CloudError; so is none (the channel closed, or within_s passed) when `required`."""
        deadline = time.perf_counter() + (self.timeout_s if within_s is None else within_s)
        while True:
            try:
                msg = self._inbox.get(timeout=max(0.0, min(0.05, deadline - time.perf_counter())))
            except queue.Empty:
                if self.done.is_set() and self._inbox.empty():
                    if self.reused and not self.received:
                        raise Stale from None
                    if required:
                        raise CloudError("the cloud closed the stream before answering")
                    return None
                if time.perf_counter() > deadline:
                    if required:
                        raise CloudError(f"no answer from the cloud within {self.timeout_s:g} s")
                    return None
                continue
            if msg.get("type") == ERROR:
                raise CloudError(f"cloud refused the {self.what} ({msg['status']}): {msg['detail']}",
                                 msg["status"])
            if wanted(msg):
                self.take(msg)
                return msg

    def take(self, msg: dict):
        """The edge acts on `msg`: in hand once the link has delivered it (waited for here),
        its downlink counts (on a real network the nominal one, at most what the wait left
        after the cloud's compute)."""
        wait = self.t0 + msg["edge_t_ms"] / 1e3 - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        down = msg["downlink_ms"]
        if not self.link.emulated:
            waited = msg["edge_t_ms"] - to_ms(self._t_wait - self.t0) - sum(msg.get("stage_ms", {}).values())
            down = round(min(down, max(0.0, waited)), 3)
        self._latest_downlink_ms = down

    def exchange(self, reply: dict, wall_s: float | None = None, **fields) -> Exchange:
        """The Exchange of this session's stages (wall: until now, or `wall_s`)."""
        wall_s = time.perf_counter() - self.t0 if wall_s is None else wall_s
        return Exchange(reply, to_ms(self.uplink_s), round(self._downlink_ms + self._latest_downlink_ms, 3),
                        to_ms(wall_s), self.refinements, connect_ms=to_ms(self.connect_s), **fields)


# ---- the schedules ---------------------------------------------------------------------------
def full(image: bytes, s: Session):
    """The camera frame as one body; the cloud runs the whole VLM."""
    final = yield Round(paced_chunks(image, s.link), end=True, wait=is_final)
    s.cloud_received(final.get("receive_ms", 0.0))
    return s.exchange(final)


def progressive(segments: list[bytes], layers_announced: int, cut_after_layer: int | None,
                grace_s: float, refine: bool, s: Session):
    """Every segment (header + layer 1, then a layer each), paced; the cloud answers as layers
    complete (or once, without `refine`). A cut link sends no end: answers already on their
    way down still arrive for `grace_s`, and the answer is the newest of them."""
    sending = paced_segments(segments, s.link)
    if cut_after_layer is None:
        final = yield Round(sending, end=True, wait=is_final, required=False)
    else:
        final = None
        yield Round(sending, wait=answer_to(cut_after_layer), within_s=grace_s, required=False)
    if not s.refinements:
        raise CloudError("the link was cut before layer 1 arrived: no answer" if cut_after_layer is not None
                         else f"no answer from the cloud within {s.timeout_s:g} s")
    last = s.refinements[-1]
    if final is None:
        s.take(last)
    if not refine:  # the cloud computed nothing while layers arrived: its receive time is clean
        s.cloud_received(last.get("received_ms", 0.0))
    reply = ({**final, "stage_ms": last["stage_ms"]} if final else
             final_reply(last, layers_announced, last["layers"] < layers_announced))
    return s.exchange(reply, cut_after_layer=cut_after_layer)


def steered(bitstream: bytes, ends: list[int], send_until: int, more, resume: bool, s: Session):
    """Layers 1..send_until at once; then, while layers remain and `more(answer, elapsed_ms)`
    says so, one more after each answer. With `resume`, first ask for the frame the cloud
    holds: if it holds j layers, their answer comes at once and sending goes on from layer
    j + 1. The exchange ends when the answer is in hand (END sent; the final message only
    frees the channel)."""
    L, held, answer, cloud_waited = len(ends), 0, None, 0.0
    if resume:
        reply = yield Round(wait=lambda m: m["type"] in (RESUMED, MISSING))
        if reply["type"] == RESUMED:
            held = reply["layers"]
            if not 1 <= held <= L or reply["received_bytes"] != ends[held - 1]:
                raise CloudError(f"the cloud holds {reply['received_bytes']} bytes of frame "
                                 f"{reply['frame_id']}, which is no layer boundary of this stream")
            if send_until <= held or more is not None:
                answer = yield Round(wait=answer_to(held))
                cloud_waited += sum(answer["stage_ms"].values())
    sent, target = held, max(send_until, held)
    while True:
        if sent < target:
            layers = bitstream[ends[sent - 1] if sent else 0:ends[target - 1]]
            answer = yield Round(paced_segments([layers], s.link), wait=answer_to(target))
            cloud_waited += sum(answer["stage_ms"].values())
            sent = target
        if more is None or sent >= L or not more(answer, to_ms(time.perf_counter() - s.t0)):
            break
        target = sent + 1
    wall_s = time.perf_counter() - s.t0
    yield Round(end=True)
    cloud_ms = sum(answer["stage_ms"].values())
    return s.exchange(final_reply(answer, L, False, resumed=held > 0), wall_s,
                      bytes_sent=(ends[sent - 1] - (ends[held - 1] if held else 0)) if sent > held else 0,
                      resumed=(held > 0) if resume else None, layers_held=held,
                      cloud_waited_ms=max(0.0, round(cloud_waited - cloud_ms, 3)))
