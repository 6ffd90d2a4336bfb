"""Batching: many requests in one pass give the answers they get one by one.

* the language half (bundled VLM, tiny random HF VLMs): Split.language_batch == language, for
  questions of different lengths in one batch, token for token;
* the MAE decoder over many frames (Split.decode_batch) == decode one by one;
* MicroBatcher: a lone request runs at once in its own thread; concurrent ones share batches;
  one bad request fails alone;
* BatchingCloudModel: CloudModel's answers and 4xx reasons, concurrent requests batched.
"""
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from progvlm.backends.base import VLMBackend
from progvlm.serve.batching import BatchingCloudModel, Job, MicroBatcher, run_jobs
from progvlm.serve.cloud import CloudModel, RequestError
from progvlm.toyworld.data import training_questions
from progvlm.toyworld.scenes import generate_scene, render_scene
from progvlm.split import Split, load_split


@pytest.fixture(scope="module")
def split():
    return load_split()


def scene_requests(split, scenes=range(12), seed=0):
    """(tokens, question, grid) over many scenes, every question type (lengths 4..10 words)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in scenes:
        scene = generate_scene(3000 + s)
        tokens = split.vlm.edge_half(render_scene(scene))
        out += [(tokens, qa.question, None) for qa in training_questions(scene, rng)]
    return out


def assert_batches_equal_one_by_one(split, requests):
    assert len({len(q.split()) for _, q, _ in requests[:16]}) >= 4  # mixed lengths in a batch
    alone = [split.language(*r) for r in requests]
    batched = []
    for i in range(0, len(requests), 16):
        batched += split.language_batch(requests[i:i + 16])
    assert [a.token_ids for a in batched] == [a.token_ids for a in alone]
    assert [a.text for a in batched] == [a.text for a in alone]
    assert set(batched[0].stage_ms) == {"prefill_ms", "generation_ms"}


def test_bundled_language_batch_equals_one_by_one(split):
    assert_batches_equal_one_by_one(split, scene_requests(split, scenes=range(3)))


@pytest.mark.slow
def test_bundled_language_batch_equals_one_by_one_over_many_scenes(split):
    assert_batches_equal_one_by_one(split, scene_requests(split, scenes=range(3, 40), seed=1))


def test_each_row_stops_where_it_would_alone(split):
    """Rows with different limits (max_new_tokens, the model's max_text_len reached by a long
    question) in one batch: each ends as it does alone."""
    tokens = split.vlm.edge_half(render_scene(generate_scene(3)))
    words = split.vlm.cfg.max_text_len - 4  # the longest question the model reads
    long_q = " ".join(["red"] * words)
    requests = [(tokens, q, None) for q in ("describe the scene .", long_q, "how many objects are there ?")]
    for max_new in (1, 3, 32):
        alone = [split.language(*r, max_new_tokens=max_new).token_ids for r in requests]
        assert [a.token_ids for a in split.language_batch(requests, max_new)] == alone
    assert len(split.language(*requests[0]).token_ids) > 3  # the description is long


def test_a_question_too_long_fails_the_batch_call_with_the_limit(split):
    tokens = split.vlm.edge_half(render_scene(generate_scene(4)))
    too_long = " ".join(["red"] * split.vlm.cfg.max_text_len)
    with pytest.raises(ValueError, match="question too long"):
        split.language_batch([(tokens, "describe the scene .", None), (tokens, too_long, None)])


def test_decode_batch_equals_decode_one_by_one(split):
    frames = []
    for s in range(4):
        frame = split.edge(render_scene(generate_scene(40 + s)))
        frames.append(frame.prefix(1 + s % split.num_layers))  # several k in one batch
    batched = split.decode_batch(frames)
    for frame, tokens in zip(frames, batched):
        assert torch.allclose(tokens, split.decode(frame), atol=1e-5)
    jobs = [Job("describe the scene .", frame=f) for f in frames]
    assert ([a.text for a in run_jobs(split, jobs)]
            == [split.cloud(f, "describe the scene .").text for f in frames])


class LoopOnly(VLMBackend):
    """A backend without a batch path: the base class's loop, calls counted."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.model_id, self.token_dim = inner.model_id, inner.token_dim
        self.tokens_per_block, self.input_size = inner.tokens_per_block, inner.input_size

    def preprocess(self, image):
        return self.inner.preprocess(image)

    def vision(self, model_input):
        return self.inner.vision(model_input)

    def cloud_half(self, tokens, question, max_new_tokens=32, grid=None):
        self.calls += 1
        return self.inner.cloud_half(tokens, question, max_new_tokens, grid)

    def answer(self, image, question, max_new_tokens=32):
        return self.inner.answer(image, question, max_new_tokens)


def test_a_backend_without_a_batch_path_runs_one_by_one(split):
    backend = LoopOnly(split.vlm)
    loop_split = Split(backend, split.mae)
    requests = scene_requests(split, scenes=[0])[:5]
    answers = loop_split.language_batch(requests)
    assert backend.calls == 5
    assert [a.text for a in answers] == [split.language(*r).text for r in requests]
    assert BatchingCloudModel(loop_split).info()["batching"]["backend_batches"] is False


# ---- tiny random transformers VLMs -------------------------------------------------------
HF_QUESTIONS = ["what color is the cube?", "how many spheres are there?", "describe the scene.",
                "is there a red object left of the cylinder?", "gray?"]


@pytest.mark.parametrize("preset", ["tiny-idefics3", "tiny-idefics3-split", "tiny-llava"])
def test_hf_batch_generates_the_tokens_of_one_by_one(tmp_path, preset):
    """Left padding and masks: every row's greedy tokens are its unbatched ones (the split
    preset mixes tile grids, so visual token counts differ within the batch)."""
    pytest.importorskip("transformers")
    from progvlm.backends import load_vlm
    from progvlm.backends.random_hf import write_random_vlm
    backend = load_vlm(write_random_vlm(tmp_path / preset, preset))
    assert backend.batches_language
    tokens, questions, grids = [], [], []
    for seed in range(4):
        size = (48, 64) if seed % 2 else (64, 20)  # 2x2 and 2x1 tiles for the split preset
        pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
        t, g = backend.edge_half_with_grid(Image.fromarray(pixels, "RGB"))
        for q in HF_QUESTIONS[seed % 2::2]:
            tokens.append(t), questions.append(q), grids.append(g)
    alone = [backend.cloud_half(t, q, 6, grid=g) for t, q, g in zip(tokens, questions, grids)]
    batched = backend.cloud_half_batch(tokens, questions, 6, grids)
    assert [a.token_ids for a in batched] == [a.token_ids for a in alone]
    assert [a.text for a in batched] == [a.text for a in alone]
    if preset == "tiny-idefics3-split":
        assert len({t.shape[0] for t in tokens}) == 2


@pytest.mark.parametrize("preset", ["tiny-idefics3", "tiny-idefics3-split", "tiny-llava"])
def test_hf_tells_whether_tokens_give_an_answer_as_generating_would(tmp_path, preset, monkeypatch):
    """HFVLMBackend.gives_answers (one teacher-forced pass) says what generating and comparing
    says, for each request's own answer (confirmed by the pass, nothing generated) and another
    request's (not confirmed: answered and compared); mixed tile grids in one batch."""
    pytest.importorskip("transformers")
    from progvlm.backends import load_vlm
    from progvlm.backends.random_hf import write_random_vlm
    backend = load_vlm(write_random_vlm(tmp_path / preset, preset))
    tokens, questions, grids = [], [], []
    for seed in range(4):
        size = (48, 64) if seed % 2 else (64, 20)
        pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
        t, g = backend.edge_half_with_grid(Image.fromarray(pixels, "RGB"))
        tokens.append(t), questions.append(HF_QUESTIONS[seed % len(HF_QUESTIONS)]), grids.append(g)
    own = backend.cloud_half_batch(tokens, questions, 6, grids)
    others = own[1:] + own[:1]
    want = VLMBackend.gives_answers(backend, tokens * 2, questions * 2, own + others, 6, grids * 2)
    generated = []
    default = VLMBackend.gives_answers
    monkeypatch.setattr(VLMBackend, "gives_answers",
                        lambda self, t, *a, **kw: generated.append(len(t)) or default(self, t, *a, **kw))
    assert backend.gives_answers(tokens * 2, questions * 2, own + others, 6, grids * 2) == want
    assert want[:4] == [True] * 4
    assert sum(generated) == 4 - sum(want[4:])  # only what the pass did not confirm


# ---- MicroBatcher ----------------------------------------------------------------------
def test_a_lone_request_runs_at_once_in_its_own_thread():
    ran_in = []

    def run(items):
        ran_in.append(threading.current_thread())
        return [i * 2 for i in items]
    batcher = MicroBatcher(run, max_batch=4, max_wait_ms=1000)
    for i in range(3):
        done = batcher.submit(i)
        assert (done.result, done.batch_size) == (i * 2, 1)
    assert ran_in == [threading.current_thread()] * 3


def test_requests_queued_while_a_batch_runs_share_the_next_one():
    release, started = threading.Event(), threading.Event()
    batches = []

    def run(items):
        batches.append(list(items))
        if items == ["first"]:
            started.set()
            assert release.wait(10)
        return [f"{i}!" for i in items]
    batcher = MicroBatcher(run, max_batch=4, max_wait_ms=0)
    results = {}

    def client(item):
        results[item] = batcher.submit(item)
    first = threading.Thread(target=client, args=("first",))
    first.start()
    assert started.wait(10)
    others = [threading.Thread(target=client, args=(f"r{i}",)) for i in range(6)]
    for t in others:
        t.start()
    while batcher.queued < 6:  # all six queued behind the running batch
        threading.Event().wait(0.001)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert [len(b) for b in batches] == [1, 4, 2]  # max_batch caps the second batch
    assert {k: v.result for k, v in results.items()} == {k: f"{k}!" for k in results}
    assert sorted(v.batch_size for v in results.values()) == [1, 2, 2, 4, 4, 4, 4]


def test_one_bad_request_fails_alone():
    def run(items):
        if any(i < 0 for i in items):
            raise ValueError(f"negative: {[i for i in items if i < 0]}")
        return [i + 1 for i in items]
    batcher = MicroBatcher(run, max_batch=8, max_wait_ms=0)
    outcomes = {}

    def client(i):
        try:
            outcomes[i] = batcher.submit(i).result
        except ValueError as e:
            outcomes[i] = str(e)
    threads = [threading.Thread(target=client, args=(i,)) for i in (1, -5, 2)]
    with batcher.paused():  # all three in one batch
        for t in threads:
            t.start()
        while batcher.queued < 3:
            threading.Event().wait(0.001)
    for t in threads:
        t.join(10)
    assert outcomes == {1: 2, -5: "negative: [-5]", 2: 3}


def test_batcher_parameters_are_checked():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(list, max_batch=0)
    with pytest.raises(ValueError, match="0..1000"):
        MicroBatcher(list, max_wait_ms=-1)


# ---- BatchingCloudModel ------------------------------------------------------------------
def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def models(split):
    return CloudModel(split), BatchingCloudModel(split)


def test_batching_model_answers_as_the_locked_one(split, models):
    locked, batching = models
    rng = np.random.default_rng(2)
    for s in range(3):
        scene = generate_scene(700 + s)
        image = render_scene(scene)
        data = split.pack(split.edge(image, 2))
        for qa in training_questions(scene, rng)[:3]:
            want, got = locked.progressive(data, qa.question), batching.progressive(data, qa.question)
            assert got["answer"] == want["answer"]
            # adaptive mode stops on it: the batched path must report it as the locked one does
            assert got["confidence"] is not None
            assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
            assert {k: got[k] for k in ("layers_used", "layers_announced", "partial")} == \
                   {k: want[k] for k in ("layers_used", "layers_announced", "partial")}
            assert got["batch_size"] == 1 and "queue_ms" in got["stage_ms"]
            assert {"mae_decode_ms", "prefill_ms", "generation_ms"} <= set(got["stage_ms"])
        assert (batching.full(png(image), "describe the scene .")["answer"]
                == locked.full(png(image), "describe the scene .")["answer"])
    info = batching.info()
    assert info["batching"] == {"max_batch": 16, "max_wait_ms": 5.0, "backend_batches": True}
    assert info["mae_fingerprint"] == locked.info()["mae_fingerprint"]


def test_batching_model_gives_the_same_4xx_reasons(split, models):
    _, batching = models
    data = split.pack(split.edge(render_scene(generate_scene(1))))
    with pytest.raises(RequestError) as e:
        batching.progressive(b"XX" + data[2:], "describe the scene .")
    assert e.value.status == 400 and "bad bitstream" in e.value.detail
    with pytest.raises(RequestError) as e:
        batching.progressive(data, " ".join(["red"] * 40))
    assert e.value.status == 400 and "question too long" in e.value.detail
    with pytest.raises(RequestError) as e:
        batching.full(b"not an image", "describe the scene .")
    assert e.value.status == 400 and "bad image" in e.value.detail


def test_concurrent_requests_are_batched_and_answered_as_alone(split, models):
    locked, _ = models
    batching = BatchingCloudModel(split, max_batch=8)
    rng = np.random.default_rng(3)
    requests = []
    for s in range(4):
        scene = generate_scene(800 + s)
        data = split.pack(split.edge(render_scene(scene)))
        requests += [(data, qa.question) for qa in training_questions(scene, rng)[:3]]
    requests.append((requests[0][0], " ".join(["red"] * 40)))  # fails alone, not its batch
    want = [locked.progressive(*r)["answer"] for r in requests[:-1]]
    got = [None] * len(requests)

    def client(i):
        try:
            got[i] = batching.progressive(*requests[i])
        except RequestError as e:
            got[i] = e
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    with batching.batcher.paused():  # every request queued before the first batch
        for t in threads:
            t.start()
        while batching.batcher.queued < len(requests):
            threading.Event().wait(0.001)
    for t in threads:
        t.join(60)
    assert [g["answer"] for g in got[:-1]] == want
    assert isinstance(got[-1], RequestError) and got[-1].status == 400
    assert max(g["batch_size"] for g in got[:-1]) == 8
