"""Clips of the bundled world (progvlm/toyworld/clips.py): deterministic sequences of scenes
with fresh sensor noise per frame, one object moving per frame, events (appear, disappear,
colour change), and the exact ground truth of every templated question on every frame."""
import itertools
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from progvlm.toyworld.clips import (CLIP_KINDS, EVENT_GAP, STEP_RANGE, changes, example_clip,
                                    load_example_clips, make_clip, truth, truths)
from progvlm.toyworld.examples import load_examples
from progvlm.toyworld.questions import questions_for
from progvlm.toyworld.scenes import (CAMERA_SIZE, COLOURS, MAX_OBJECTS, MIN_AXIS_GAP, RADIUS_RANGE,
                                     SHAPES, SIZES, Scene, SceneObject, _cell, _EDGE_MARGIN,
                                     generate_scene, layout_ok, render_scene)


def _old_generate_scene(seed: int) -> Scene:
    """generate_scene as it was before its layout rules moved into scenes.fits (a verbatim
    copy): the refactor must give the same scene for every seed."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    while True:
        pairs = set()
        objs = []
        for _ in range(200):
            if len(objs) == n:
                break
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            if (colour, shape) in pairs:
                continue
            size = SIZES[rng.integers(2)]
            r = float(rng.uniform(*RADIUS_RANGE[size]))
            lo, hi = r + _EDGE_MARGIN, CAMERA_SIZE - r - _EDGE_MARGIN
            x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
            ok = all(
                abs(x - o.x) >= MIN_AXIS_GAP and abs(y - o.y) >= MIN_AXIS_GAP
                and np.hypot(x - o.x, y - o.y) >= (r + o.radius) * 1.15 + 6
                and _cell(x) != _cell(o.x) and _cell(y) != _cell(o.y)
                for o in objs)
            if ok:
                objs.append(SceneObject(shape, colour, size, x, y, r))
                pairs.add((colour, shape))
        if len(objs) == n:
            break
    background = {
        "tint": [float(v) for v in rng.uniform(95, 165) + rng.uniform(-18, 18, 3)],
        "blob_amp": float(rng.uniform(10, 30)),
        "texture": ["stripes", "checker", "speckle"][rng.integers(3)],
        "tex_amp": float(rng.uniform(8, 22)),
        "tex_freq": float(rng.uniform(0.02, 0.12)),
        "tex_angle": float(rng.uniform(0, np.pi)),
        "noise_sigma": float(rng.uniform(3, 9)),
        "pixel_seed": int(rng.integers(2**31)),
    }
    return Scene(seed=seed, objects=objs, background=background)


def test_generate_scene_is_unchanged_by_the_shared_layout_check():
    for seed in range(301):
        scene = generate_scene(seed)
        assert scene.to_dict() == _old_generate_scene(seed).to_dict(), seed
        assert layout_ok(scene.objects)


def test_layout_ok_rejects_each_broken_rule():
    scene = next(s for s in map(generate_scene, range(100)) if len(s.objects) >= 2)
    a, b = scene.objects[:2]
    assert layout_ok(scene.objects) and layout_ok([a]) and layout_ok([b])
    assert not layout_ok([])  # no object
    assert not layout_ok([a, replace(b, colour=a.colour, shape=a.shape)])  # a repeated pair
    assert not layout_ok([a, replace(b, x=a.x + MIN_AXIS_GAP / 2)])  # too close in x
    assert not layout_ok([a, replace(b, y=a.y + MIN_AXIS_GAP / 2)])  # too close in y
    assert not layout_ok([replace(a, x=a.radius)])  # past the frame's margin


def test_render_without_noise_seed_is_byte_identical_to_the_bundled_examples():
    for item in load_examples()[:2]:
        stored = np.asarray(Image.open(item["path"]).convert("RGB"))
        assert np.array_equal(np.asarray(render_scene(item["scene"])), stored)


def test_noise_seed_changes_the_noise_only():
    scene = generate_scene(7)
    base = np.asarray(render_scene(scene), np.float32)
    a = np.asarray(render_scene(scene, noise_seed=1), np.float32)
    b = np.asarray(render_scene(scene, noise_seed=2), np.float32)
    assert np.array_equal(a, np.asarray(render_scene(scene, noise_seed=1), np.float32))
    assert not np.array_equal(a, b) and not np.array_equal(a, base)
    sigma = scene.background["noise_sigma"]
    # the difference of two independent noises: std ≈ sigma·√2, mean ≈ 0; content identical
    assert abs(float((a - b).std()) - sigma * np.sqrt(2)) < 0.25 * sigma * np.sqrt(2)
    assert abs(float((a - b).mean())) < 0.5


@pytest.mark.parametrize("kind", CLIP_KINDS)
def test_a_clip_is_a_function_of_its_seed(kind):
    a, b = make_clip(11, 30, kind), make_clip(11, 30, kind)
    assert len(a) == 30 and a.kind == kind
    assert [s.to_dict() for s in a.scenes] == [s.to_dict() for s in b.scenes]
    assert a.events == b.events
    assert np.array_equal(np.asarray(a.frame(5, 64)), np.asarray(b.frame(5, 64)))
    other = make_clip(12, 30, kind)
    assert [s.to_dict() for s in other.scenes] != [s.to_dict() for s in a.scenes]
    assert a.scenes[0].to_dict() != generate_scene(11).to_dict()  # not a training-seed scene


def test_static_clip_frames_share_content_but_never_pixels():
    clip = make_clip(4, 6, "static")
    assert all(s.to_dict() == clip.scenes[0].to_dict() for s in clip.scenes)
    frames = [np.asarray(f, np.float32) for f in clip.frames()]
    assert frames[0].shape == (CAMERA_SIZE, CAMERA_SIZE, 3)
    sigma = clip.scenes[0].background["noise_sigma"]
    for x, y in itertools.combinations(frames, 2):
        assert not np.array_equal(x, y)
        assert float(np.abs(x - y).mean()) < 2.5 * sigma  # noise, not content
    small = list(clip.frames(64))
    assert small[0].size == (64, 64) and not np.array_equal(np.asarray(small[0]), np.asarray(small[1]))
    with pytest.raises(IndexError):
        clip.frame(6)


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_moving_clip_moves_exactly_one_object_a_bounded_step_per_frame(seed):
    clip = make_clip(seed, 60, "moving")
    assert clip.events == []
    for t, (prev, cur) in enumerate(zip(clip.scenes, clip.scenes[1:]), 1):
        assert layout_ok(cur.objects), t
        assert cur.background == prev.background
        assert len(cur.objects) == len(prev.objects)
        moved = [(p, c) for p, c in zip(prev.objects, cur.objects) if (p.x, p.y) != (c.x, c.y)]
        assert len(moved) == 1, t
        p, c = moved[0]
        assert (p.shape, p.colour, p.size, p.radius) == (c.shape, c.colour, c.size, c.radius)
        assert STEP_RANGE[0] - 1e-9 <= np.hypot(c.x - p.x, c.y - p.y) <= STEP_RANGE[1] + 1e-9
    # valid moves never change any answer (no object can pass another's row or column)
    qs = [qa.question for qa in questions_for(clip.scenes[0], np.random.default_rng(seed))]
    assert all(changes(clip, q) == [] for q in qs)


def _event_check(clip):
    kinds = []
    for t, kind in clip.events:
        prev, cur = clip.scenes[t - 1].objects, clip.scenes[t].objects
        n0, n1 = len(prev), len(cur)
        if kind == "appear":
            assert n1 == n0 + 1 and cur[:-1] == prev
        elif kind == "disappear":
            assert n1 == n0 - 1 >= 1 and cur == prev[:-1]
        else:
            assert kind == "colour" and n1 == n0
            diff = [(p, c) for p, c in zip(prev, cur) if p != c]
            assert len(diff) == 1 and diff[0][0].colour != diff[0][1].colour
            assert (diff[0][0].x, diff[0][0].shape) == (diff[0][1].x, diff[0][1].shape)
        kinds.append(kind)
    return kinds


@pytest.mark.parametrize("moving", [False, True])
def test_events_clip_has_every_kind_of_event_and_changes_finds_them(moving):
    seen = set()
    for seed in range(12):
        clip = make_clip(seed, 40, "events", moving=moving)
        frames = [t for t, _ in clip.events]
        assert frames and EVENT_GAP[0] <= frames[0] <= EVENT_GAP[1]
        assert all(EVENT_GAP[0] <= b - a <= EVENT_GAP[1] for a, b in zip(frames, frames[1:]))
        assert all(layout_ok(s.objects) for s in clip.scenes)
        seen.update(_event_check(clip))
        count_changes = [t for t, k in clip.events if k in ("appear", "disappear")]
        assert changes(clip, "how many objects are there ?") == count_changes
        if moving:  # between events exactly one object moves
            for t in range(1, len(clip)):
                if t not in frames:
                    a, b = clip.scenes[t - 1].objects, clip.scenes[t].objects
                    assert sum((p.x, p.y) != (q.x, q.y) for p, q in zip(a, b)) == 1
        else:
            assert changes(clip, "describe the scene .") == frames
            for t in range(1, len(clip)):
                if t not in frames:
                    assert clip.scenes[t].objects == clip.scenes[t - 1].objects
    assert seen == {"appear", "disappear", "colour"}


def test_events_keep_other_objects_pixels():
    """A disappearing object is the last one drawn, so the others keep their colour jitter."""
    clip = make_clip(0, 36, "events")
    t = next(t for t, k in clip.events if k == "disappear")
    before, after = (np.asarray(clip.frame(u), np.int16) for u in (t - 1, t))
    gone = clip.scenes[t - 1].objects[-1]
    mask = np.ones(before.shape[:2], bool)
    r = int(gone.radius) + 4
    mask[max(0, int(gone.y) - r):int(gone.y) + r, max(0, int(gone.x) - r):int(gone.x) + r] = False
    sigma = clip.scenes[0].background["noise_sigma"]
    assert np.abs(before - after)[mask].mean() < 2.5 * sigma
    assert np.abs(before - after)[~mask].mean() > 3 * sigma


def test_truth_answers_every_templated_question():
    asked = 0
    for seed in range(200):
        scene = generate_scene(seed)
        rng = np.random.default_rng(seed)
        for _ in range(3):
            for qa in questions_for(scene, rng):
                assert truth(scene, qa.question) == qa.answer, (seed, qa)
                asked += 1
    assert asked > 3000


def test_truth_of_forms_and_refusals():
    scene = Scene(seed=0, objects=[
        SceneObject("square", "red", "large", 100, 100, 60),
        SceneObject("circle", "blue", "small", 300, 400, 30),
        SceneObject("circle", "red", "small", 420, 250, 30)], background={})
    assert truth(scene, "How many objects are there?") == "three"
    assert truth(scene, "how many red objects are there ?") == "two"
    assert truth(scene, "how many circles are there ?") == "two"
    assert truth(scene, "how many crosses are there ?") == "zero"
    assert truth(scene, "is there a red square ?") == "yes"
    assert truth(scene, "is there a blue square ?") == "no"
    assert truth(scene, "what colour is the square ?") == "red"
    assert truth(scene, "what color is the large object ?") == "red"
    assert truth(scene, "what shape is the blue object ?") == "circle"
    assert truth(scene, "is the red circle small or large ?") == "small"
    assert truth(scene, "is the square left of the blue circle ?") == "yes"
    assert truth(scene, "is the square below the blue circle ?") == "no"
    assert truth(scene, "is the red circle above the blue circle ?") == "yes"
    assert truth(scene, "describe the scene .") == "red square , blue circle , red circle"
    # refusals: ambiguous, absent, not a template
    assert truth(scene, "what colour is the circle ?") is None  # two circles
    assert truth(scene, "what colour is the triangle ?") is None  # none
    assert truth(scene, "is the cross left of the square ?") is None
    assert truth(scene, "what colour is the red blue circle ?") is None
    assert truth(scene, "what is the meaning of life ?") is None
    assert truth(scene, "") is None


def test_truths_and_changes_follow_a_standing_question():
    clip = make_clip(0, 36, "events")
    values = truths(clip, "how many objects are there ?")
    assert len(values) == 36 and all(v is not None for v in values)
    events = changes(clip, "how many objects are there ?")
    assert events and all(values[t] != values[t - 1] for t in events)
    assert all(values[t] == values[t - 1] for t in range(1, 36) if t not in events)


def test_example_clips_render_on_demand_and_have_events():
    entries = load_example_clips()
    assert 3 <= len(entries) <= 4
    assert {e["kind"] for e in entries} == set(CLIP_KINDS)
    for e in entries:
        clip = example_clip(e["name"])
        assert len(clip) == e["frames"] and clip.kind == e["kind"]
        assert 2 <= len(e["questions"]) <= 3
        assert all(v is not None for q in e["questions"] for v in truths(clip, q))
        if e["kind"] == "events":
            assert all(changes(clip, q) for q in e["questions"]), e["name"]
    assert example_clip(entries[0]["name"]).frame(0, 64).size == (64, 64)
    with pytest.raises(KeyError):
        example_clip("no such clip")
    with pytest.raises(ValueError):
        make_clip(0, 10, "exploding")
    with pytest.raises(ValueError):
        make_clip(0, 0, "static")
