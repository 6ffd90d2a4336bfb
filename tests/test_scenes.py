import io
import itertools

import numpy as np
import pytest

from progvlm.toyworld.scenes import (CAMERA_SIZE, GRID, MIN_AXIS_GAP, cell_targets, generate_scene,
                            render_scene)


def test_same_seed_same_scene_and_pixels():
    a, b = generate_scene(123), generate_scene(123)
    assert a.to_dict() == b.to_dict()
    assert np.array_equal(np.asarray(render_scene(a)), np.asarray(render_scene(b)))
    assert generate_scene(124).to_dict() != a.to_dict()


@pytest.mark.parametrize("seed", range(0, 400, 7))
def test_layout_rules_make_questions_unambiguous(seed):
    s = generate_scene(seed)
    assert 1 <= len(s.objects) <= 4
    assert len({(o.colour, o.shape) for o in s.objects}) == len(s.objects)
    cell = lambda v: int(v * GRID / CAMERA_SIZE)
    for a, b in itertools.combinations(s.objects, 2):
        assert abs(a.x - b.x) >= MIN_AXIS_GAP and abs(a.y - b.y) >= MIN_AXIS_GAP
        assert cell(a.x) != cell(b.x) and cell(a.y) != cell(b.y)
        assert np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius  # no overlap
    for o in s.objects:
        assert o.radius <= o.x <= CAMERA_SIZE - o.radius and o.radius <= o.y <= CAMERA_SIZE - o.radius


def test_frame_is_camera_sized_textured_and_not_trivially_compressible():
    img = render_scene(generate_scene(5))
    assert img.size == (CAMERA_SIZE, CAMERA_SIZE) and img.mode == "RGB"
    arr = np.asarray(img, np.float32)
    assert arr.std() > 10  # not flat
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    assert len(buf.getvalue()) > 40_000  # texture and noise survive: a real camera-like frame


def test_model_size_frame_matches_resized_camera_frame():
    s = generate_scene(9)
    small = render_scene(s, 128)
    assert small.size == (128, 128)
    from progvlm.images import resize_for_model
    assert np.array_equal(np.asarray(small), np.asarray(resize_for_model(render_scene(s), 128)))


def test_cell_targets_mark_each_object_once():
    s = generate_scene(31)
    t = cell_targets(s)
    assert (t["colour"] > 0).sum() == len(s.objects)
    assert (t["shape"] > 0).sum() == len(s.objects) == (t["size"] > 0).sum()
