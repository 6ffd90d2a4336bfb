"""The full-cloud-as-video baseline: frames sent as a real H.264 stream (libx264 through PyAV).

What a camera without a split VLM would do: encode each frame with a low-latency video codec
at the bitrate the link allows, send the packets, decode them at the cloud and run the whole
VLM on the decoded frame. H264Stream is the edge's encoder (one packet per frame, out at
once: tune=zerolatency, no B-frames, no lookahead), H264Decoder the cloud's, and the bytes
`encode` returns are exactly what crosses the link for that frame (Annex B, SPS/PPS in band
on key frames, so a decoder can join at any key frame).

Rate control: average bitrate `bitrate_bps` with a VBV of one second (vbv-maxrate = bitrate,
vbv-bufsize = one second of it): x264 needs a few frames to settle, key frames cost more
than the frames between them, and over a clip the mean lands near bitrate / fps / 8 bytes
per frame. write_mp4 writes a clip as an H.264 mp4 (quality-targeted, faststart) that a
browser plays: the page's example clips.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from .reader import VideoError

DEFAULT_PRESET = "veryfast"


def _even(v: int) -> int:
    if v < 2:
        raise ValueError(f"a side of at least 2 pixels, not {v}")
    return v - (v % 2)


def _rate(fps: float) -> Fraction:
    if not fps > 0:
        raise ValueError(f"frames per second must be positive, not {fps}")
    return Fraction(fps).limit_denominator(1001)


def _to_frame(image: Image.Image, width: int, height: int):
    import av

    if image.size != (width, height):
        if (image.width - image.width % 2, image.height - image.height % 2) != (width, height):
            raise ValueError(f"frame is {image.width}x{image.height}, the stream is {width}x{height}")
        image = image.crop((0, 0, width, height))  # an odd side: its last pixel row/column
    return av.VideoFrame.from_image(image.convert("RGB")).reformat(format="yuv420p")


class H264Stream:
    """An H.264 encoder for one stream of frames, one packet out per frame in.

    width and height are rounded down to even (yuv420p needs it; a frame with an odd side
    loses its last column or row). keyframe_interval: frames from one key frame to the next
    (default: two seconds' worth); x264 may also start one on a scene cut. `threads` is the
    encoder's thread count (1: the same bytes on every run)."""

    def __init__(self, width: int, height: int, fps: float, bitrate_bps: int,
                 keyframe_interval: int | None = None, preset: str = DEFAULT_PRESET,
                 threads: int = 1):
        import av

        if bitrate_bps < 1000:
            raise ValueError(f"bitrate of at least 1000 bit/s, not {bitrate_bps}")
        self.width, self.height = _even(int(width)), _even(int(height))
        self.fps, self.bitrate_bps = float(fps), int(bitrate_bps)
        self.keyframe_interval = int(keyframe_interval or max(1, round(2 * fps)))
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = self.width, self.height, "yuv420p"
        ctx.time_base = 1 / _rate(fps)
        ctx.framerate = _rate(fps)
        ctx.bit_rate = self.bitrate_bps
        ctx.gop_size = self.keyframe_interval
        ctx.thread_count = threads
        kbps = max(1, self.bitrate_bps // 1000)
        ctx.options = {
            "preset": preset, "tune": "zerolatency",
            "x264-params": (f"keyint={self.keyframe_interval}:min-keyint={self.keyframe_interval}"
                            f":vbv-maxrate={kbps}:vbv-bufsize={kbps}:nal-hrd=none"),
        }
        self._ctx = ctx
        self.frames_encoded = 0
        self.bytes_encoded = 0
        self.last_was_keyframe = False

    def encode(self, frame: Image.Image) -> bytes:
        """The packet bytes of this frame (what the link carries for it; b"" never happens with
        zerolatency, but a caller should not rely on one packet per frame elsewhere)."""
        vf = _to_frame(frame, self.width, self.height)
        vf.pts = self.frames_encoded
        packets = self._ctx.encode(vf)
        self.frames_encoded += 1
        self.last_was_keyframe = any(p.is_keyframe for p in packets)
        data = b"".join(bytes(p) for p in packets)
        self.bytes_encoded += len(data)
        return data

    def flush(self) -> bytes:
        """Whatever the encoder still holds at the end of the stream (nothing with zerolatency)."""
        data = b"".join(bytes(p) for p in self._ctx.encode(None))
        self.bytes_encoded += len(data)
        return data


class H264Decoder:
    """The cloud's side: packets in, RGB frames out, at once (low delay, one thread).

    A packet it cannot decode is a VideoError; a packet that yields no picture (garbage with
    no start code, or a frame before the first key frame) gives None. The decoder stays
    usable after either: the next key frame resynchronises it."""

    def __init__(self):
        import av
        from av.codec.context import Flags

        self._ctx = av.CodecContext.create("h264", "r")
        self._ctx.thread_count = 1
        self._ctx.flags |= int(Flags.low_delay)
        self.frames_decoded = 0

    def decode(self, packet: bytes) -> Image.Image | None:
        """The frame this packet completes, or None; VideoError for data it rejects."""
        import av

        if not packet:
            return None
        try:
            frames = self._ctx.decode(av.Packet(bytes(packet)))
            if not frames:
                return None
            image = frames[-1].to_image()
        except av.FFmpegError as e:
            raise VideoError(f"corrupt H.264 packet: {e}") from None
        except (ValueError, OSError) as e:
            raise VideoError(f"undecodable H.264 packet: {e}") from None
        self.frames_decoded += len(frames)
        return image


def write_mp4(frames, path: str | Path, fps: float, crf: int = 23,
              preset: str = DEFAULT_PRESET) -> Path:
    """Write frames (PIL images of one size; any iterable) as an H.264 mp4 a browser plays
    (yuv420p, faststart, quality `crf`); odd sides lose their last pixel column or row."""
    import av

    path = Path(path)
    it = iter(frames)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("write_mp4 needs at least one frame") from None
    width, height = _even(first.width), _even(first.height)
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("libx264", rate=_rate(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(int(crf)), "preset": preset}
        for image in _chain(first, it):
            for packet in stream.encode(_to_frame(image, width, height)):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def _chain(first, rest):
    yield first
    yield from rest


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB between two RGB images of one size (inf if equal)."""
    x = np.asarray(a.convert("RGB"), np.float64)
    y = np.asarray(b.convert("RGB"), np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images of different sizes: {a.size} and {b.size}")
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
