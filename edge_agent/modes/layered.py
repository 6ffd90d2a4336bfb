"""What the layered modes (progressive, auto, adaptive) share: the frame's MAE layers, made on the
device or recalled from a conversation, and the two exchanges that send them.

    send   layers 1..k in one stream, the cloud answering as they arrive (CloudLink.progressive),
           or, in a conversation, `steer`
    steer  CloudLink.steered: every layer in the stream's header, so that the cloud's copy is a
           prefix of any later turn's; layers go while `more` says so (adaptive)
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import conversation
from .base import Mode


@dataclass
class Layers:
    """The frame's layers on the device: made now, or the stream a conversation remembered."""
    layers: list[bytes]
    num_tokens: int
    grid: object
    frame_key: str | None = None  # in a conversation: the frame's pixels' hash
    remembered: object = None  # the CachedFrame a conversation remembered for it
    stream: object = None  # the remembered stream, read once (codec.bitstream.Packed)


class Layered(Mode):
    converses = True
    refines = True

    def coded(self, context) -> int:
        """How many layers the device encodes (each mode says; L where any may be sent)."""
        return context.runtime.num_layers

    def on_device(self, context) -> Layers:
        ask, runtime = context.ask, context.runtime
        key = remembered = None
        if ask.request.conversation:  # a follow-up about these pixels reuses the stream made for them
            key = context.timed("frame_hash", conversation.pixels_key, runtime, ask.image)
            remembered = conversation.recall(context.agent.frames, key, ask.request.new_conversation)
        if remembered is not None:
            stream = runtime.read(remembered.data)
            return Layers(stream.layers, stream.num_tokens, stream.grid, key, remembered,
                          stream.packed())
        tokens, grid = context.see()
        return Layers(context.encode(tokens, self.coded(context)), tokens.shape[0], grid, key)


def send(context, seen: Layers, k: int):
    """Layers 1..k to the cloud, its answer in the record; a conversation's go by `steer`."""
    if context.request.conversation:
        return steer(context, seen, k)
    ask, record = context.ask, context.record
    packed = context.runtime.pack(seen.layers[:k], seen.num_tokens, seen.grid)
    # a cut at or after the last layer sent cuts nothing: the whole frame goes
    asked_cut = context.request.cut_after_layer
    cut = asked_cut if asked_cut is not None and asked_cut < k else None
    context.check_link_time(len(packed.data))
    # a caller that watches the refinements gets one per layer; otherwise the cloud answers
    # once, when the layers are in (the final answer comes sooner)
    watched = context.on_refinement is not None
    ex = context.agent.cloud.progressive(packed.data, context.request.question, ask.link, cut,
                                         context.on_refinement, refine=watched)
    context.exchanged(ex)
    reply = ex.reply
    record.update(answer=reply["answer"], k=k, layers_used=reply["layers"], partial=reply["partial"],
                  payload_bytes=len(packed.data), layer_bytes=packed.layer_bytes,
                  header_bytes=packed.header_bytes,
                  refinements=[{"layers": r["layers"], "answer": r["answer"], "edge_t_ms": r["edge_t_ms"]}
                               for r in ex.refinements])
    if cut is not None:
        record["link_cut_after_layer"] = cut
        record["note"] = (f"the link was cut after layer {cut}: the answer is from layers "
                          f"1..{reply['layers']} of {k}")
        return
    if asked_cut is not None:
        record["note"] = (f"a cut was asked after layer {asked_cut}, at or after the last layer sent "
                          f"({k}): nothing was cut, the answer is the full one from layers "
                          f"1..{reply['layers']}")
    # only clean answers teach auto: a cut one's overhead holds its wait for the layers that
    # never came
    stages = context.stages
    context.agent.estimates.add(ask.client, ask.link, watched,
                                sum(v for n, v in stages.items() if n.startswith("cloud_")),
                                stages["overhead"])


def whole_stream(context, seen: Layers):
    """The stream of every layer the device holds for the frame (codec.bitstream.Packed)."""
    return seen.stream or context.runtime.pack(seen.layers, seen.num_tokens, seen.grid)


def steer(context, seen: Layers, k: int, more=None, packed=None):
    """CloudLink.steered with every layer in the stream's header (`packed`: whole_stream):
    layers 1..k at once, then one more while `more(answer, elapsed_ms)` says so. Fills the
    record."""
    ask, record = context.ask, context.record
    packed = packed or whole_stream(context, seen)
    data = packed.data
    held = seen.remembered.layers if seen.remembered else 0
    context.check_link_time(len(data))
    ex = context.agent.cloud.steered(
        data, context.request.question, ask.link, min(k, len(packed.layer_ends)), more,
        conversation.frame_id(data) if context.request.conversation else None, resume=held > 0,
        on_refinement=context.on_refinement)
    context.exchanged(ex)
    reply = ex.reply
    used = reply["layers"]
    record.update(answer=reply["answer"], k=k, layers_used=used, partial=False,
                  payload_bytes=ex.bytes_sent, confidence=reply["confidence"],
                  confidences=[{"layers": r["layers"], "confidence": r.get("confidence")}
                               for r in ex.refinements],
                  layer_bytes=packed.layer_bytes[:used], header_bytes=packed.header_bytes,
                  refinements=[{"layers": r["layers"], "answer": r["answer"],
                                "confidence": r.get("confidence"), "edge_t_ms": r["edge_t_ms"]}
                               for r in ex.refinements])
    if context.request.conversation:
        conversation.turn(context.agent.frames, seen.frame_key, data, record, ex, seen.remembered)
