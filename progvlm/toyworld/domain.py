"""Does an image look like one of the bundled VLM's generated scenes?

The bundled VLM (progvlm/toyworld/tiny_vlm.py) only ever saw progvlm/toyworld/scenes.py's scenes: 1-4 flat
shapes in six palette colours over a background that is ONE colour tint plus grey-level
variation (lighting blotches, stripe/checker/speckle texture and noise are added equally to R, G
and B). Given a photograph it still answers, confidently and wrongly. `check_scene_domain` says
when an input is outside that world, so that the caller can warn with every answer.

The signal: a pixel model of the scenes, on the model's own 128 px view
-----------------------------------------------------------------------
In a scene every pixel is
  * background: its chroma (R-G, B-G) is the background's one chroma, within 20 (the median
    chroma of the image: shapes never cover half the frame);
  * shape: within RGB distance 60 of a palette colour (scenes jitter a shape's colour by up to
    ±18 per channel, then add noise);
  * outline: within 2 px of a shape pixel (shape/background blends, JPEG smear);
  * or none of these ("off-scene"), which in a scene is almost only JPEG chroma bleed.
score = the off-scene fraction of the image. Every scene holds at least one shape, so an image
with (almost) no shape pixels (< 0.05 %) is not a scene at all: score 1.0. That catches greyscale
photographs, blank frames and noise, whose pixels are all "background" (chroma constant, 0).
in_domain = score <= THRESHOLD (0.08).

Measured separation (`python -m progvlm.toyworld.domain` prints it; scenes of the evaluation seed stream,
photographs: the images in skimage.data that need no download, each as is and as JPEG q30):
  * off-scene fraction of generated scenes: 0.000..0.048 over 306 scenes (the six
    assets/examples included) x 6 versions (as rendered at 512 px, JPEG q30, resized to 128 px
    and to 1024 px, each of those two JPEG'd); over 1000 more seeds: as rendered and JPEG q30
    <= 0.0003, 256 px JPEG <= 0.007, 128 px JPEG q30 <= 0.050 (the worst case: JPEG's halved
    chroma resolution smears outlines at the model's own size);
  * colour photographs: 0.13 (chelsea as JPEG) .. 0.36 (coffee), colorwheel 0.56, logo 1.0;
    the exception is hubble_deep_field (0.02: mostly black sky), caught by the shape rule;
  * shape fraction: scenes >= 0.0017 (a small triangle in a 128 px JPEG), photographs without
    palette-coloured things (all greyscale ones, chelsea, rocket, hubble, immunohistochemistry,
    logo, ...) <= 0.0001 (one pixel).
So THRESHOLD = 0.08 has a factor ~1.6 to either side, MIN_SHAPE_FRACTION = 0.0005 ~3x to both.
Outside that: a 128 px JPEG at quality 15 reaches 0.095 (~1 % of such scenes flagged), and under
~100 px the smallest shapes fall under the shape floor.
A plain black/white/grey image or random noise has no shape pixel: out of domain ("none of the
coloured shapes"). That is deliberate: the bundled model would still report shapes there.
Known blind spot: an image that IS a few flat palette-coloured things on a plain single-tint
backdrop passes, photograph or not; the bundled model's answers there are at least plausible.

Candidates tried that do NOT separate (range over scenes vs over photographs, same sets):
  * the bundled VLM's visual tokens (TinyVLMBackend.edge_half) against 64k tokens of 1000
    training-stream scenes: token mean [-0.12, 0.00] vs [-0.18, 0.03]; token std [4.65, 5.90]
    vs [3.12, 5.91]; mean per-token Mahalanobis distance [3.9, 9.5] vs [3.7, 19.7]; per-token
    z-score [0.53, 1.08] vs [0.48, 2.26]; Mahalanobis distance of the mean token [2.5, 9.4] vs
    [2.8, 56]. Photographs mostly map to the tokens of an empty background cell (the model was
    trained to ignore all but the shapes); black frames and noise land mid-distribution.
  * single pixel statistics: saturated pixels (max-min > 80) [0.002, 0.18] vs [0, 0.76];
    extreme luma [0, 0.07] vs [0, 0.96]; luma std [10.9, 38.7] vs [9.7, 121]; colours at 8
    levels per channel [14, 149] vs [3, 296]; mean gradient [1.5, 8.7] vs [0.9, 18.2].
  * the off-scene fraction without the outline allowance: scenes up to 0.097 (0.12 over 2000
    seeds) vs colour photographs from 0.13; chroma tolerance 25 instead of 20 lets chelsea
    through (0.057); counting shape/background blend colours anywhere as explained (not only
    next to a shape) explains the retina photograph too.

Cost: ~0.7 ms for a 128 px image (the model's view: pass that when you have it), ~1.5-2 ms for a
512 px one (0.6 ms of it the resize), on one x86 core; a 12 MP photograph costs its resize
(~20 ms, paid anyway to feed the model). NumPy and Pillow only: the edge runtime without PyTorch
can run it too. No stored statistics: the palette comes from progvlm/toyworld/scenes.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .. import ASSETS
from ..images import encode_jpeg, resize_for_model, to_rgb
from .scenes import COLOURS

VIEW_SIZE = 128  # the bundled VLM's input size (assets/tiny_vlm/config.json, image_size)
BACKGROUND_CHROMA_TOL = 20  # |chroma - background chroma|, per component, still background
PALETTE_DIST = 60  # RGB distance to a palette colour that still counts as a shape pixel
OUTLINE_PX = 2  # pixels within this many (128 px view) of a shape pixel count as its outline
MIN_SHAPE_FRACTION = 0.0005  # every scene has a shape: scenes >= 0.0017, others <= 0.0001
THRESHOLD = 0.08  # off-scene fraction: scenes <= 0.050, colour photographs >= 0.13

_PALETTE = [tuple(int(v) for v in c) for c in COLOURS.values()]  # six (r, g, b)


@dataclass(frozen=True)
class DomainCheck:
    in_domain: bool
    score: float  # fraction of the image the scene model does not explain (0 = a perfect scene)
    threshold: float
    reason: str


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)² square, separably, without wrap-around."""
    out = mask.copy()
    for axis in (0, 1):
        m, out = out, out.copy()
        n = m.shape[axis]
        for k in range(1, r + 1):
            lo, hi = [slice(None)] * 2, [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, n - k), slice(k, n)
            out[tuple(lo)] |= m[tuple(hi)]
            out[tuple(hi)] |= m[tuple(lo)]
    return out


def scene_fractions(image: Image.Image) -> tuple[float, float]:
    """(off-scene fraction, shape fraction) of the image's 128 px model view."""
    px = np.asarray(resize_for_model(to_rgb(image), VIEW_SIZE), np.int32)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    rg, bg_ = r - g, b - g  # chroma; the background's is one constant (its tint)
    tol = BACKGROUND_CHROMA_TOL
    background = ((np.abs(rg - np.median(rg)) <= tol) & (np.abs(bg_ - np.median(bg_)) <= tol))
    near_palette = np.zeros_like(background)
    for pr, pg, pb in _PALETTE:
        near_palette |= (r - pr) ** 2 + (g - pg) ** 2 + (b - pb) ** 2 <= PALETTE_DIST ** 2
    shape = near_palette & ~background
    # outline blends and JPEG smear sit next to a shape: explained too
    off = ~background & ~_dilate(shape, OUTLINE_PX)
    n = background.size
    return float(np.count_nonzero(off) / n), float(np.count_nonzero(shape) / n)


def check_scene_domain(image: Image.Image) -> DomainCheck:
    """Whether `image` looks like a scene the bundled VLM was trained on (see the module doc)."""
    off, shapes = scene_fractions(image)
    if shapes < MIN_SHAPE_FRACTION:
        score = 1.0
        reason = ("does not look like one of the bundled model's generated scenes: it has none "
                  "of their flat coloured shapes (red, green, blue, yellow, purple or cyan), like "
                  "a photograph, a greyscale or a blank image, so the bundled model's answers "
                  "about it are guesses")
    else:
        score = off
        if score <= THRESHOLD:
            reason = (f"looks like one of the bundled model's generated scenes ({score:.0%} of "
                      f"its pixels off the scenes' background and palette, limit {THRESHOLD:.0%})")
        else:
            reason = (f"looks like a photograph, not one of the bundled model's generated scenes: "
                      f"{score:.0%} of its pixels are neither a plain tinted background nor one of "
                      f"the scenes' six shape colours (scenes: under {THRESHOLD:.0%}), so the "
                      f"bundled model's answers about it are guesses")
    return DomainCheck(score <= THRESHOLD, float(score), THRESHOLD, reason)


def _measure(seeds: int = 300) -> None:
    """Print the class ranges behind THRESHOLD and MIN_SHAPE_FRACTION (run after changing
    progvlm/toyworld/scenes.py): generated scenes and their JPEG'd/resized copies vs scikit-image's
    photographs (skipped without scikit-image)."""
    import io

    from .data import EVAL_STREAM, scene_seed
    from .scenes import generate_scene, render_scene

    def jpeg(im):
        return Image.open(io.BytesIO(encode_jpeg(im, 30))).convert("RGB")

    def variants(im):
        small, big = im.resize((128, 128), Image.BILINEAR), im.resize((1024, 1024), Image.BICUBIC)
        return [im, jpeg(im), small, big, jpeg(small), jpeg(big)]

    scenes = [render_scene(generate_scene(scene_seed(EVAL_STREAM, 7, i))) for i in range(seeds)]
    examples = ASSETS / "examples"
    scenes += [Image.open(p).convert("RGB") for p in sorted(examples.glob("scene_*.png"))]
    s = np.array([scene_fractions(v) for im in scenes for v in variants(im)])
    print(f"scenes ({len(s)}): off-scene {s[:, 0].min():.4f}..{s[:, 0].max():.4f}, "
          f"shape fraction {s[:, 1].min():.4f}..{s[:, 1].max():.4f}")
    try:
        photos = _skimage_photos()
    except ImportError:
        print("scikit-image not installed: no photographs")
        return
    for name, im in photos:
        for tag, v in (("", im), ("@jpeg30", jpeg(im))):
            off, shape = scene_fractions(v)
            c = check_scene_domain(v)
            print(f"{name + tag:28s} off-scene {off:.4f} shapes {shape:.4f} score {c.score:.3f} "
                  f"{'IN' if c.in_domain else 'out'}")


def _skimage_photos() -> list[tuple[str, Image.Image]]:
    """scikit-image's sample images that need no download, as RGB PIL images."""
    import skimage.data

    out = []
    for name in ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee",
                 "coins", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
                 "microaneurysms", "moon", "page", "retina", "rocket", "text", "colorwheel",
                 "logo", "horse", "binary_blobs", "checkerboard", "shepp_logan_phantom",
                 "stereo_motorcycle"):
        try:
            a = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - the ones that need pooch or the network
            continue
        if isinstance(a, tuple):  # stereo_motorcycle: (left, right, disparity)
            a = a[0]
        a = np.asarray(a)
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif a.dtype != np.uint8:
            a = (255 * (a - a.min()) / (np.ptp(a) or 1)).astype(np.uint8)
        out.append((name, to_rgb(Image.fromarray(a))))
    return out


if __name__ == "__main__":
    _measure()
