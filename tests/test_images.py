import io

import numpy as np
import pytest
from PIL import Image

from progvlm.images import ImageInputError, load_image


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
