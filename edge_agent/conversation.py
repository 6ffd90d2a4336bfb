"""Conversation memory: per frame (its pixels' hash), the stream the agent made for it and how
many layers the cloud holds of it.

With `conversation=True` (progressive, auto, adaptive) the frame gets an id, a content hash of its
MAE stream (all L layers, the MAE's fingerprint in the header); the cloud keeps what it received
under it (progvlm.net.frame_cache). A follow-up question about the same pixels resumes: no edge
compute, no image bytes unless more layers are needed; a cloud that lost the frame says so and
the frame is sent again (the same answer, more bytes).
"""
from __future__ import annotations

import hashlib

from progvlm.net.frame_cache import FRAME_TTL_S, CachedFrame, FrameCache

# frames this agent remembers (their streams are a few hundred bytes each); the cloud forgets a
# frame after progvlm.net.frame_cache.FRAME_TTL_S, so the agent does too
EDGE_FRAMES = 32
CLOUD = "cloud"  # the agent's memory has one client: the cloud it talks to


def new_memory() -> FrameCache:
    return FrameCache(ttl_s=FRAME_TTL_S, max_frames_per_client=EDGE_FRAMES)


def pixels_key(runtime, image) -> str:
    """Which frame this is: its pixels' hash, under this device's models (another VLM or MAE
    makes another stream of the same pixels)."""
    info = runtime.info()
    h = hashlib.sha256(f"{info.get('vlm_id')}/{info.get('mae_fingerprint')}/{image.mode}/"
                       f"{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def recall(frames: FrameCache, key: str, fresh: bool) -> CachedFrame | None:
    """The stream remembered for this frame; `fresh` (a new conversation) forgets it first."""
    if fresh:
        frames.forget(CLOUD, key)
    return frames.get(CLOUD, key)


def frame_id(data: bytes) -> str:
    """The id the cloud keeps the frame under: a hash of its whole stream."""
    return hashlib.sha256(data).hexdigest()[:32]


def turn(frames: FrameCache, key: str, data: bytes, record: dict, ex, remembered: CachedFrame | None):
    """After an answer: remember the layers the cloud now holds (every complete layer its answer
    used), and say in the record what this turn sent and resumed."""
    used = ex.reply["layers"]
    frames.put(CLOUD, key, CachedFrame("progressive", data, layers=used))
    record.update(conversation=True, frame_id=frame_id(data), resumed=bool(ex.resumed),
                  layers_held_before=ex.layers_held, bytes_sent_this_turn=ex.bytes_sent,
                  edge_stream_reused=remembered is not None)
    if remembered is not None and remembered.layers and not ex.resumed:
        record["note"] = ("the cloud no longer held this frame (expired, evicted or restarted): it "
                          "was sent again from its start")
