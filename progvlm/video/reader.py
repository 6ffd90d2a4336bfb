"""Reading a user's video: GIF/APNG/WebP animations (Pillow) and any container and codec that
PyAV's FFmpeg decodes (mp4, webm, mkv, mov, a raw .h264 stream...), into RGB PIL frames.

Everything that comes in is bounded before it is decoded: the bytes (MAX_VIDEO_BYTES, checked
on a file's size before it is read), the frame count (decoding stops at the first frame past
`max_frames`), each frame's side (MAX_SIDE, checked on the header before any pixel is
decoded) and the decoded pixels held in memory (MAX_DECODED_BYTES). Every failure is a
VideoError (a ValueError: a service answers it as a 4xx) with a message that says what was
wrong: empty, not a video, corrupt, over a limit, or a frame size that changes mid-stream.

Truncated input: a file cut short whose first frames decode is returned with those frames and
`truncated=True` (a camera's last upload cut by a lost link still plays); read_video(...,
allow_truncated=False) raises instead. A file cut before any frame decodes (an mp4 whose index
is gone, a GIF cut in its header) is always a VideoError. "Truncated" is what the decoder
reports (a decode error after the first frame) or, for containers that declare their frame
count (mp4, mov), fewer frames than declared.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

MAX_VIDEO_BYTES = 50 * 1024 * 1024  # an upload's size on the link
MAX_FRAMES = 600  # two minutes at 5 frames per second
MAX_SIDE = 4096  # pixels, width or height of a frame
MAX_DECODED_BYTES = 1024 * 1024 * 1024  # RGB bytes of all decoded frames held at once
DEFAULT_FPS = 5.0  # a clip that states no frame rate (an animation without durations), and a
# stream's rate by default (edge_agent/watch.py, eval-video): a camera's few frames per second
_PILLOW_MAGIC = (b"GIF87a", b"GIF89a", b"\x89PNG\r\n\x1a\n")  # and RIFF....WEBP


class VideoError(ValueError):
    """A video that cannot be read, with the reason in words."""


class VideoTooLarge(VideoError):
    """A clip over a limit: its bytes, frames or decoded size (a 413 where a service says so)."""


@dataclass
class Video:
    """A decoded clip: RGB frames of one size (width, height), the frame rate, and whether the
    input ended before its last frame (see the module's text on truncation)."""
    frames: list[Image.Image]
    fps: float
    size: tuple[int, int]
    truncated: bool = False
    format: str = ""  # the container ("gif", "png", "webp", "mov,mp4,m4a,3gp,3g2,mj2", ...)

    @property
    def duration(self) -> float:
        """Seconds the clip lasts at its frame rate."""
        return len(self.frames) / self.fps if self.fps > 0 else 0.0


def _load_bytes(source, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise VideoTooLarge(f"video too large: {len(data)} bytes, the limit is {max_bytes}")
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise VideoError(f"no video file at {path}")
        size = path.stat().st_size
        if size > max_bytes:  # refused before a byte is read
            raise VideoTooLarge(f"video too large: {size} bytes, the limit is {max_bytes}")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # the file grew while we looked
            raise VideoTooLarge(f"video too large: over {max_bytes} bytes")
    else:
        raise VideoError(f"a video is bytes or a file path, not {type(source).__name__}")
    if not data:
        raise VideoError("empty video: 0 bytes")
    return data


class _Collector:
    """The checks every decoded frame passes before it is kept: count, side, size, memory."""

    def __init__(self, max_frames: int, max_side: int, max_decoded_bytes: int):
        self.max_frames, self.max_side, self.max_decoded = max_frames, max_side, max_decoded_bytes
        self.frames: list[Image.Image] = []
        self.size: tuple[int, int] | None = None

    def check(self, width: int, height: int) -> None:
        """Raise before decoding a frame of this size that must not be kept."""
        index = len(self.frames)
        if index >= self.max_frames:
            raise VideoTooLarge(f"video too long: more than {self.max_frames} frames "
                             f"(the limit; decoding stopped at frame {index})")
        if width > self.max_side or height > self.max_side or width < 1 or height < 1:
            raise VideoError(f"frame {index} is {width}x{height}: each side must be 1.."
                             f"{self.max_side} pixels")
        if self.size is not None and (width, height) != self.size:
            raise VideoError(f"frame size changes mid-stream at frame {index}: "
                             f"{self.size[0]}x{self.size[1]} → {width}x{height}")
        if (index + 1) * width * height * 3 > self.max_decoded:
            raise VideoTooLarge(f"video too large decoded: {index + 1} frames of {width}x{height} "
                             f"exceed {self.max_decoded} bytes")

    def add(self, image: Image.Image) -> None:
        self.check(*image.size)
        self.size = image.size
        self.frames.append(image if image.mode == "RGB" else image.convert("RGB"))


def _is_pillow_animation(data: bytes) -> bool:
    return data.startswith(_PILLOW_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _read_pillow(data: bytes, keep: _Collector) -> tuple[float, bool, str]:
    try:
        im = Image.open(io.BytesIO(data))
        fmt = (im.format or "").lower()
    except Exception as e:  # UnidentifiedImageError, DecompressionBombError, SyntaxError...
        raise VideoError(f"corrupt or truncated animation ({type(e).__name__})") from None
    keep.check(*im.size)  # the canvas, before any pixel is decoded
    durations, truncated = [], False
    index = 0
    while True:
        try:
            im.seek(index)
        except EOFError:
            break
        except Exception as e:
            if not keep.frames:
                raise VideoError(f"corrupt animation at frame {index}: {e}") from None
            truncated = True
            break
        keep.check(*im.size)
        try:
            frame = im.convert("RGB")  # decodes this frame (composited on the canvas)
        except Exception as e:
            if not keep.frames:
                raise VideoError(f"corrupt or truncated animation at frame {index}: {e}") from None
            truncated = True
            break
        keep.add(frame)
        durations.append(im.info.get("duration") or 0)
        index += 1
    if not keep.frames:
        raise VideoError("animation without a frame")
    timed = sorted(d for d in durations if d and d > 0)
    fps = 1000.0 / timed[len(timed) // 2] if timed else DEFAULT_FPS
    return fps, truncated, fmt


def _read_av(data: bytes, keep: _Collector) -> tuple[float, bool, str]:
    import av  # PyAV: imported when a non-animation arrives (the board may read GIFs only)

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as e:
        raise VideoError(f"not a video, or corrupt or truncated: {e}") from None
    except Exception as e:
        raise VideoError(f"not a video: {e}") from None
    with container:
        if not container.streams.video:
            raise VideoError("not a video: no video stream in this file")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else DEFAULT_FPS
        declared = int(stream.frames or 0)
        if stream.codec_context.width and stream.codec_context.height:
            keep.check(stream.codec_context.width, stream.codec_context.height)
        truncated = False
        try:
            for packet in container.demux(stream):  # ends with an empty packet: the flush
                try:
                    decoded = packet.decode()
                except av.FFmpegError:
                    truncated = True  # a damaged or cut packet: the decoder carries on
                    continue
                for frame in decoded:
                    keep.check(frame.width, frame.height)  # before converting its pixels
                    keep.add(frame.to_image())
        except (av.FFmpegError, OSError, EOFError) as e:  # the container itself ends badly
            if not keep.frames:
                raise VideoError(f"corrupt or truncated video: {e}") from None
            truncated = True
        if not keep.frames:
            raise VideoError("corrupt or truncated video: no frame decodes"
                             + (" (damaged packets)" if truncated else ""))
        if declared and len(keep.frames) < declared:
            truncated = True
        return (fps if 0 < fps < 1000 else DEFAULT_FPS), truncated, container.format.name


def read_video(source: bytes | str | Path, max_frames: int = MAX_FRAMES,
               max_bytes: int = MAX_VIDEO_BYTES, *, max_side: int = MAX_SIDE,
               max_decoded_bytes: int = MAX_DECODED_BYTES,
               allow_truncated: bool = True) -> Video:
    """Decode a clip (bytes or a file path) into RGB frames, within the limits.

    GIF, APNG and WebP go through Pillow (a still PNG/GIF/WebP is a one-frame clip); anything
    else through PyAV (a still JPEG too: FFmpeg reads it as one frame). Raises VideoError:
    empty input, not a video, corrupt data, over `max_bytes` (checked first), more than
    `max_frames` frames (decoding stops at the first frame over), a side over `max_side`, over
    `max_decoded_bytes` of RGB, a frame size that changes (naming the frame), or a truncated
    file when `allow_truncated` is False (see the module's text)."""
    data = _load_bytes(source, max_bytes)
    keep = _Collector(max_frames, max_side, max_decoded_bytes)
    if _is_pillow_animation(data):
        fps, truncated, fmt = _read_pillow(data, keep)
    else:
        fps, truncated, fmt = _read_av(data, keep)
    if truncated and not allow_truncated:
        raise VideoError(f"truncated video: the data ends after frame {len(keep.frames) - 1}")
    return Video(frames=keep.frames, fps=fps, size=keep.size, truncated=truncated, format=fmt)
