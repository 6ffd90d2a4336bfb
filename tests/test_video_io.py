"""Video in and out (progvlm/video): read_video on animations and FFmpeg containers with every
bad input refused clearly, and the H.264 baseline (H264Stream / H264Decoder / write_mp4)."""
import io
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from progvlm.video import MAX_FRAMES, MAX_SIDE, MAX_VIDEO_BYTES, VideoError, read_video
from progvlm.video.h264 import H264Decoder, H264Stream, psnr, write_mp4


def synthetic(n=12, w=96, h=64, seed=0):
    """A small clip: a smooth gradient with a square moving across, plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for t in range(n):
        img = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, 90.0)], -1)
        x0 = 4 + 3 * t
        img[20:40, x0:x0 + 20] = (230, 40, 40)
        img += rng.normal(0, 3, img.shape)
        out.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"))
    return out


def animation(frames, fmt, duration=200) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=duration, loop=0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip():
    return synthetic()


@pytest.fixture(scope="module")
def mp4(clip, tmp_path_factory) -> Path:
    return write_mp4(clip, tmp_path_factory.mktemp("v") / "clip.mp4", fps=5)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_reads_animations(clip, fmt):
    video = read_video(animation(clip, fmt, duration=200))
    assert len(video.frames) == len(clip) and video.size == (96, 64)
    assert video.fps == pytest.approx(5.0) and not video.truncated
    assert all(f.mode == "RGB" and f.size == (96, 64) for f in video.frames)
    if fmt != "GIF":  # lossless (the WebP default is lossy, but close); GIF is palettised
        assert psnr(video.frames[3], clip[3]) > 30
    assert psnr(video.frames[3], clip[3]) > 20
    assert video.duration == pytest.approx(len(clip) / 5)


def test_reads_the_mp4_write_mp4_writes_from_a_path_and_from_bytes(clip, mp4):
    assert mp4.read_bytes()[4:8] == b"ftyp"
    for source in (mp4, str(mp4), mp4.read_bytes()):
        video = read_video(source)
        assert len(video.frames) == len(clip) and video.size == (96, 64)
        assert video.fps == pytest.approx(5.0) and not video.truncated
        assert "mp4" in video.format
        assert np.mean([psnr(a, b) for a, b in zip(video.frames, clip)]) > 30


def test_reads_a_bundled_world_clip_through_mp4(tmp_path):
    from progvlm.toyworld.clips import make_clip
    frames = list(make_clip(2, 4, "moving").frames(64))
    video = read_video(write_mp4(frames, tmp_path / "w.mp4", fps=5))
    assert len(video.frames) == 4 and video.size == (64, 64)


def test_write_mp4_crops_odd_sides_and_refuses_no_frames(tmp_path):
    frames = [f.crop((0, 0, 95, 63)) for f in synthetic(3)]
    assert read_video(write_mp4(frames, tmp_path / "odd.mp4", fps=2.5)).size == (94, 62)
    with pytest.raises(ValueError):
        write_mp4([], tmp_path / "none.mp4", fps=5)


def test_reads_a_raw_h264_stream(clip):
    enc = H264Stream(96, 64, 5, 300_000)
    video = read_video(b"".join(enc.encode(f) for f in clip))
    assert len(video.frames) == len(clip) and video.size == (96, 64)


@pytest.mark.parametrize("bad,words", [
    (b"", "empty"),
    (b"hello, this is plain text and not a video at all", "not a video"),
    (np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes(), "not a video"),
    (b"GIF89a" + bytes(64), "corrupt"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "corrupt"),
    (b"RIFF\x00\x01\x00\x00WEBPVP8 " + bytes(64), "corrupt"),
])
def test_refuses_what_is_no_video(bad, words):
    with pytest.raises(VideoError, match=words):
        read_video(bad)


def test_refuses_audio_only_and_odd_sources(tmp_path):
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    with pytest.raises(VideoError, match="no video stream"):
        read_video(buf.getvalue())
    with pytest.raises(VideoError, match="no video file"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.gif").write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        read_video(tmp_path / "empty.gif")
    with pytest.raises(VideoError, match="bytes or a file path"):
        read_video(12345)
    assert issubclass(VideoError, ValueError)


def test_truncated_animation_returns_its_first_frames_flagged_or_raises(clip):
    data = animation(clip, "GIF")
    video = read_video(data[:len(data) // 2])
    assert video.truncated and 1 <= len(video.frames) < len(clip)
    with pytest.raises(VideoError, match="truncated"):
        read_video(data[:len(data) // 2], allow_truncated=False)
    with pytest.raises(VideoError, match="corrupt or truncated"):
        read_video(data[:40])  # cut inside the first frame


def test_truncated_mp4_decodes_partially_flagged_or_raises(mp4):
    data = mp4.read_bytes()
    with av.open(io.BytesIO(data)) as container:  # cut inside the 8th packet of 12
        cut = [p.pos for p in container.demux(container.streams.video[0]) if p.size][7] + 5
    video = read_video(data[:cut])
    assert video.truncated and 1 <= len(video.frames) < 12
    with pytest.raises(VideoError, match="truncated"):
        read_video(data[:cut], allow_truncated=False)
    with pytest.raises(VideoError):
        read_video(data[:200])  # the index (moov) is cut: nothing decodes


def test_refuses_over_the_byte_limit_before_reading(mp4, monkeypatch):
    size = mp4.stat().st_size
    with pytest.raises(VideoError, match="too large"):
        read_video(mp4.read_bytes(), max_bytes=size - 1)
    opened = []
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: opened.append(self))
    with pytest.raises(VideoError, match="too large"):
        read_video(mp4, max_bytes=size - 1)
    assert opened == []  # the file's size was enough to refuse it
    assert MAX_VIDEO_BYTES >= 10 * 1024 * 1024 and MAX_FRAMES >= 100 and MAX_SIDE >= 1920


@pytest.mark.parametrize("kind", ["gif", "mp4"])
def test_refuses_over_the_frame_limit_and_stops_decoding(clip, mp4, kind, monkeypatch):
    from progvlm.video import reader
    data = animation(clip, "GIF") if kind == "gif" else mp4.read_bytes()
    kept = []
    original = reader._Collector.add
    monkeypatch.setattr(reader._Collector, "add", lambda self, im: (kept.append(1), original(self, im)))
    with pytest.raises(VideoError, match="more than 5 frames"):
        read_video(data, max_frames=5)
    assert len(kept) == 5  # the 6th frame was refused before it was kept, and decoding stopped
    kept.clear()
    assert len(read_video(data, max_frames=len(clip)).frames) == len(clip) == len(kept)


def test_refuses_frames_over_the_side_limit(mp4):
    wide = io.BytesIO()
    Image.new("RGB", (MAX_SIDE + 4, 8), "red").save(wide, "GIF")
    with pytest.raises(VideoError, match=f"{MAX_SIDE + 4}x8"):
        read_video(wide.getvalue())
    with pytest.raises(VideoError, match="96x64"):
        read_video(mp4, max_side=64)
    with pytest.raises(VideoError, match="decoded"):
        read_video(mp4, max_decoded_bytes=96 * 64 * 3 * 4)


def test_refuses_a_frame_size_change_mid_stream_naming_the_frame(clip):
    small, large = H264Stream(96, 64, 5, 300_000), H264Stream(128, 96, 5, 300_000)
    data = (b"".join(small.encode(f) for f in clip[:3])
            + b"".join(large.encode(f.resize((128, 96))) for f in clip[3:6]))
    with pytest.raises(VideoError, match="frame 3.*96x64.*128x96"):
        read_video(data)


def _run(frames, bitrate, fps=5):
    enc, dec = H264Stream(frames[0].width, frames[0].height, fps, bitrate), H264Decoder()
    sizes, quality = [], []
    for f in frames:
        packet = enc.encode(f)
        assert packet  # zerolatency: each frame's packet comes out at once
        out = dec.decode(packet)
        assert out is not None and out.size == f.size
        sizes.append(len(packet))
        quality.append(psnr(out, f))
    assert enc.bytes_encoded == sum(sizes) and enc.frames_encoded == len(frames)
    assert enc.flush() == b""
    return np.array(sizes), float(np.mean(quality))


def test_h264_hits_its_bitrate_and_quality_rises_with_it():
    from progvlm.toyworld.clips import make_clip
    frames = list(make_clip(3, 15, "moving").frames(256))
    low, q_low = _run(frames, 200_000)
    high, q_high = _run(frames, 1_000_000)
    for sizes, bitrate in ((low, 200_000), (high, 1_000_000)):
        target = bitrate / 5 / 8
        assert 0.5 * target < sizes[5:].mean() < 1.5 * target, (sizes, target)
    assert q_high > q_low + 1.0, (q_low, q_high)


def test_h264_key_frames_on_the_interval_and_odd_sizes():
    frames = synthetic(9)
    enc = H264Stream(96, 64, 5, 300_000, keyframe_interval=4)
    keys = []
    for f in frames:
        enc.encode(f)
        keys.append(enc.last_was_keyframe)
    assert keys[0] and keys[4] and keys[8] and not any(keys[1:4])
    odd = H264Stream(95, 63, 5, 300_000)
    assert (odd.width, odd.height) == (94, 62)
    assert H264Decoder().decode(odd.encode(frames[0].crop((0, 0, 95, 63)))).size == (94, 62)
    with pytest.raises(ValueError, match="the stream is"):
        odd.encode(frames[0])
    with pytest.raises(ValueError):
        H264Stream(96, 64, 0, 300_000)


def test_h264_decoder_survives_corrupt_packets():
    frames = synthetic(6)
    enc, dec = H264Stream(96, 64, 5, 300_000, keyframe_interval=3), H264Decoder()
    packets = [enc.encode(f) for f in frames]
    rng = np.random.default_rng(0)
    junk = [b"\x00\x00\x00\x01\x65" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes(),
            rng.integers(0, 256, 300, dtype=np.uint8).tobytes(), b"", packets[1][:10]]
    for packet in junk:
        try:
            assert dec.decode(packet) is None
        except VideoError:
            pass
    assert dec.decode(packets[3]).size == (96, 64)  # the next key frame resynchronises
    assert dec.decode(packets[4]).size == (96, 64)
