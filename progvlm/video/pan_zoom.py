"""A clip made from still photos: a camera window panning across each photo and zooming in, so
consecutive frames share most of their content as a real camera's do (what the bench measures
temporal coding on for VLMs whose world has no clips of its own)."""
from __future__ import annotations

from PIL import Image

PAN_PX = 6  # window shift per frame, in the window's pixels
ZOOM = 0.985  # window scale per frame (zooming in)


def pan_zoom(photos: list[Image.Image], frames_per_photo: int, size: int = 512) -> list[Image.Image]:
    """`frames_per_photo` frames per photo at size×size: a window of 80 % of the photo's short
    side, starting at its top-left quarter, moving PAN_PX right and down and shrinking by ZOOM
    each frame; the clip cuts from one photo to the next (a scene change)."""
    out = []
    for photo in photos:
        photo = photo.convert("RGB")
        w, h = photo.size
        side = 0.8 * min(w, h)
        x, y = 0.1 * w, 0.1 * h
        for _ in range(frames_per_photo):
            box = (x, y, x + side, y + side)
            out.append(photo.resize((size, size), Image.BILINEAR, box=box))
            x, y = x + PAN_PX * side / size, y + PAN_PX * side / size
            x, y = min(x, w - side), min(y, h - side)
            side *= ZOOM
    return out
