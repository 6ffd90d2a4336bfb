import io

import numpy as np
import pytest
from PIL import Image

from progvlm.images import ImageInputError, load_image, raw_frame


def _bytes(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgba_is_composited_over_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = load_image(_bytes(img))
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (255, 255, 255)  # fully transparent → white, not red
    assert out.getpixel((0, 0)) == (0, 0, 255)


def test_palette_with_transparency_and_greyscale():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.info["transparency"] = 0
    assert load_image(_bytes(p)).getpixel((0, 0)) == (10, 200, 30)
    grey = Image.new("L", (4, 4), 77)
    assert load_image(_bytes(grey)).getpixel((2, 2)) == (77, 77, 77)


def test_16_bit_greyscale_is_rescaled_not_clipped():
    a = np.full((4, 4), 32768, np.uint16)
    img = Image.fromarray(a)  # mode I;16
    out = load_image(_bytes(img))
    assert out.getpixel((0, 0))[0] in (127, 128)  # half range, not 255


def test_cmyk_jpeg_becomes_rgb():
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    r, g, b = load_image(_bytes(img, "JPEG", quality=95)).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    out = load_image(_bytes(img, "JPEG", exif=exif, quality=95))
    assert out.size == (10, 20)
    assert out.getpixel((5, 2))[0] > 200  # red now on top


def test_non_image_and_empty_input_errors_name_the_problem():
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(b"%PDF-1.4 definitely not pixels")
    with pytest.raises(ImageInputError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageInputError, match="no such image file"):
        load_image("/nonexistent/x.png")


def test_over_the_pixel_limit_is_refused_before_decoding():
    data = _bytes(Image.new("RGB", (300, 200)))
    with pytest.raises(ImageInputError, match=r"too large: 300×200 = 60,000 pixels.*50,000"):
        load_image(data, max_pixels=50_000)
    assert load_image(data, max_pixels=60_000).size == (300, 200)


def test_truncated_image_is_a_clear_error():
    data = _bytes(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(ImageInputError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


# ---- raw camera frames: pixels, no container -------------------------------------------------

def test_a_raw_frame_is_the_same_image_as_its_decoded_file():
    camera = Image.effect_noise((40, 30), 60).convert("RGB")  # 40 wide, 30 high
    pixels = np.asarray(camera)
    for frame in (raw_frame(pixels), raw_frame(pixels.tobytes(), 40, 30),
                  raw_frame(bytearray(pixels.tobytes()), width=40, height=30),
                  raw_frame(memoryview(pixels.tobytes()), 40, 30)):
        assert frame.mode == "RGB" and frame.size == (40, 30)
        assert np.array_equal(np.asarray(frame), np.asarray(load_image(_bytes(camera))))


def test_a_non_contiguous_array_is_read_in_display_order():
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 3), np.uint8)
    flipped = pixels[:, ::-1]  # a view with a negative stride, as a mirrored sensor gives
    assert np.array_equal(np.asarray(raw_frame(flipped)), flipped)


@pytest.mark.parametrize("pixels,kw,reason", [
    (b"\x00" * 100, dict(width=8, height=4), r"RGB24 frame of 8×4 is 96 bytes \(3 per pixel\); got 100"),
    (b"\x00" * 95, dict(width=8, height=4), "is 96 bytes.*got 95"),
    (b"", dict(width=0, height=4), r"no pixels \(0×4\)"),
    (b"\x00" * 12, dict(width=4, height=-1), r"no pixels \(4×-1\)"),
    (b"\x00" * 12, {}, "need the frame's width and height"),
    (b"\x00" * 12, dict(width=2.0, height=2), "width must be an integer, got 2.0"),
    (b"\x00" * 12, dict(width=True, height=4), "width must be an integer"),
    (np.zeros((4, 8), np.uint8), {}, r"H×W×3 RGB array; got shape \(4, 8\)"),
    (np.zeros((4, 8, 4), np.uint8), {}, r"got shape \(4, 8, 4\)"),
    (np.zeros((4, 8, 3), np.float32), {}, r"uint8 RGB values \(0..255\); got float32"),
    (np.zeros((0, 8, 3), np.uint8), {}, r"no pixels \(8×0\)"),
    (np.zeros((4, 8, 3), np.uint8), dict(width=4), "width 4 does not match the array's 8"),
    ([[[0, 0, 0]]], {}, "RGB24 bytes or an H×W×3 uint8 array; got list"),
])
def test_bad_raw_frames_say_what_is_wrong(pixels, kw, reason):
    with pytest.raises(ImageInputError, match=reason):
        raw_frame(pixels, **kw)


def test_an_oversized_raw_frame_is_refused_before_its_bytes_are_read():
    # the dimensions alone are refused: 100000×100000 would be 30 GB of RGB24
    with pytest.raises(ImageInputError, match=r"too large: 100000×100000 = 10,000,000,000 pixels"):
        raw_frame(b"short", 100_000, 100_000)
    with pytest.raises(ImageInputError, match=r"too large: 8×4 = 32 pixels.*limit of 31"):
        raw_frame(np.zeros((4, 8, 3), np.uint8), max_pixels=31)
    assert raw_frame(np.zeros((4, 8, 3), np.uint8), max_pixels=32).size == (8, 4)
