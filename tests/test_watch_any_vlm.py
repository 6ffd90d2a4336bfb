"""A watched stream on `transformers` VLMs (random weights, an untrained MAE: bytes and protocol,
not answers): key then delta frames, the cloud's reference equal to the edge's, and a frame
whose tile grid changes (Idefics3 image splitting) sent as a key frame, never a corrupt delta."""
import numpy as np
import pytest
from PIL import Image

from cloud_server import serving
from edge_agent.runtime import PyTorchRuntime
from edge_agent.watch import WatchSettings, Watcher
from progvlm.backends.random_hf import write_random_vlm
from progvlm.net.link import LinkProfile
from progvlm.serve.cloud import create_app
from progvlm.split import load_split
from progvlm.video.pan_zoom import pan_zoom
from test_measure_any_vlm import untrained_mae

FAST = LinkProfile.checked(1000.0, 0.0)


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-idefics3-split"])
def split(request, tmp_path_factory):
    """A random-weight preset's split; `.preset` names it."""
    root = tmp_path_factory.mktemp(request.param)
    rng = np.random.default_rng(1)
    photos = []
    for i, (h, w) in enumerate([(96, 128), (120, 90)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        photos.append(root / f"im{i}.png")
    vlm = write_random_vlm(root / "vlm", request.param)
    split = load_split(vlm, untrained_mae(vlm, photos, root / "mae"))
    split.preset = request.param
    return split


def test_a_stream_of_frames_goes_as_key_then_deltas_and_a_new_grid_is_a_key(split):
    rng = np.random.default_rng(2)
    photo = Image.fromarray(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8))
    frames = pan_zoom([photo], 4, size=128)
    with serving(create_app(split), log_level="warning") as url:
        watcher = Watcher(PyTorchRuntime(split), url, WatchSettings(questions=["what is it ?"], k=2),
                          link=FAST)
        try:
            records = [watcher.frame(f) for f in frames]
            # another aspect ratio: Idefics3 splits it into another tile grid (another N)
            wide_image = Image.fromarray(rng.integers(0, 256, (64, 256, 3), dtype=np.uint8))
            wide = watcher.frame(wide_image)
            again = watcher.frame(frames[0])
        finally:
            watcher.close()
    assert records[0]["kind"] == "key" and [r["cloud_index"] for r in records] == [0, 1, 2, 3]
    assert all(r["kind"] in ("delta", "key") for r in records[1:])
    assert sum(r["bytes"] for r in records[1:]) < 3 * records[0]["bytes"]  # deltas are smaller
    assert all(r["resync"] is None for r in records + [wide, again])
    def layout(image):
        tokens, grid = split.vlm.vision(split.vlm.preprocess(image))
        return len(tokens), grid
    if layout(wide_image) != layout(frames[0]):  # Idefics3: 2×2 tiles, then 1×2
        assert wide["kind"] == "key" and wide["key_reason"] == "shape"
        assert again["kind"] == "key" and again["key_reason"] == "shape"
    else:  # LLaVA: one block whatever the shape
        assert wide["kind"] in ("key", "delta") and wide["key_reason"] != "shape"
    assert again["cloud_index"] == 5  # every frame decoded, none refused



def test_the_tile_grid_case_is_exercised(split):
    """The test above checks the grid change where the layout changes: Idefics3's image
    splitting does change it for these two shapes, LLaVA's one block does not."""
    rng = np.random.default_rng(2)
    grids = {split.vlm.vision(split.vlm.preprocess(Image.fromarray(
        rng.integers(0, 256, shape, dtype=np.uint8))))[1] for shape in [(160, 200, 3), (64, 256, 3)]}
    assert len(grids) == (2 if split.preset == "tiny-idefics3-split" else 1)
