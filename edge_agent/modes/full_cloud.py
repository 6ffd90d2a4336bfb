"""full-cloud: the frame as JPEG (the camera frame as it is, by default; or at the model's input
size) → link → the cloud runs the whole VLM."""
from __future__ import annotations

from progvlm.images import JPEG_MAX_SIDE, encode_jpeg, fit_jpeg, resize_for_model

from .base import Mode


def frame_jpeg(image, frame: str, quality: int, model_size: int) -> tuple[bytes, tuple[int, int]]:
    """Full-cloud's payload and the size it was encoded at: the camera frame (downscaled where
    a side is over JPEG's limit, images.fit_jpeg) or the model's input size ("model")."""
    image = resize_for_model(image, model_size) if frame == "model" else fit_jpeg(image)
    return encode_jpeg(image, quality), image.size


class FullCloud(Mode):
    name = "full-cloud"

    def on_device(self, context):
        request = context.request
        return context.timed("serialize", frame_jpeg, context.ask.image, request.frame,
                             request.jpeg_quality, context.runtime.image_size)

    def run(self, context):
        request, record = context.request, context.record
        payload, (w, h) = context.seen
        cw, ch = context.ask.image.size
        what = "the model input size" if request.frame == "model" else "the camera frame" + (
            f" of {cw}×{ch} downscaled to fit JPEG's {JPEG_MAX_SIDE:,} px sides"
            if (w, h) != (cw, ch) else "")
        record["payload"] = f"JPEG q{request.jpeg_quality} at {w}×{h} ({what})"
        context.check_link_time(len(payload))
        ex = context.agent.cloud.full(payload, request.question, context.ask.link)
        record.update(answer=ex.reply["answer"], payload_bytes=len(payload))
        context.exchanged(ex)
