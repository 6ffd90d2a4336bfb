"""The refinement probe (progvlm/adaptive_probe.py, issue 20): its table fitted from the edge's
own codes, its JSON in adaptive.json (round trip; a broken one refused naming the file), the
gate it puts on a rule, and the cloud running it after layer 1 only, the same every time."""
import dataclasses
import json
import shutil

import numpy as np
import pytest

from progvlm import adaptive_probe
from progvlm.adaptive import AdaptiveRule
from progvlm.adaptive_probe import RefinementProbe
from progvlm.backends.base import Answer
from progvlm.models.mae import DEFAULT_MAE
from progvlm.split import SplitError, load_split
from progvlm.toyworld.scenes import generate_scene, render_scene


@pytest.fixture(scope="module")
def split():
    return load_split()


def tokens_of(split, seeds):
    return [split.vlm.edge_half(render_scene(generate_scene(s))) for s in seeds]


def uniform(k=4, samples=3):
    return RefinementProbe(samples, tuple(tuple([1.0 / k] * k) for _ in range(k)))


def test_fit_counts_which_layer_2_code_follows_each_layer_1_code(split):
    tokens = tokens_of(split, [1, 2, 3])
    probe = adaptive_probe.fit(split.mae, tokens, samples=5, prior=0.01)
    table = np.array(probe.transitions)
    assert probe.samples == 5 and table.shape == (128, 128)
    assert np.allclose(table.sum(1), 1.0, atol=1e-3)
    pairs = set()
    for t in tokens:
        idx = split.mae.edge_codec().decode_indices(split.mae.compress(t, 2), t.shape[0])
        pairs |= set(zip(idx[0].tolist(), idx[1].tolist()))
    seen_rows = {a for a, _ in pairs}
    # every pair the edge made carries more than the prior; a code never seen at layer 1: uniform
    assert all(table[a, b] > 0.01 / (0.01 * 128 + 1) for a, b in pairs)
    unseen = [a for a in range(128) if a not in seen_rows]
    assert unseen and np.allclose(table[unseen[0]], 1 / 128, atol=1e-6)


def test_json_round_trip_and_refusals():
    probe = uniform()
    back = RefinementProbe.from_json(json.loads(json.dumps(probe.to_json())))
    assert back.samples == 3 and np.allclose(back.transitions, probe.transitions)
    with pytest.raises(ValueError, match="layer"):
        RefinementProbe.from_json({**probe.to_json(), "layer": 2})
    with pytest.raises(ValueError, match="square"):
        RefinementProbe(3, ((0.5, 0.5),))
    with pytest.raises(ValueError, match="sum to 1"):
        RefinementProbe(3, ((0.5, 0.1), (0.5, 0.5)))
    with pytest.raises(ValueError, match="samples"):
        RefinementProbe(0, ((1.0,),))


def test_a_rule_with_a_probe_is_never_sure_of_an_answer_a_refinement_changes():
    sure = Answer("red", [7], token_probs=[0.9999], runner_up_probs=[1e-4])
    plain, gated = AdaptiveRule("mean_prob", 0.99), AdaptiveRule("mean_prob", 0.99, probe=uniform())
    for agreement, expected in ((None, 0.9999), (1.0, 0.9999), (0.75, 0.0)):
        sure.refinement_agreement = agreement
        assert gated.confidence(sure) == pytest.approx(expected)
        assert plain.confidence(sure) == pytest.approx(0.9999)  # no probe: no gate


def test_adaptive_json_carries_the_probe_and_a_broken_one_is_refused(tmp_path, split):
    rule = AdaptiveRule("mean_prob", 0.99, probe=adaptive_probe.fit(split.mae, tokens_of(split, [4])))
    rule.save(tmp_path)
    back = AdaptiveRule.load(tmp_path)
    assert back == rule and back.probe is not None
    folder = tmp_path / "mae"
    shutil.copytree(DEFAULT_MAE, folder)
    meta = json.loads((folder / "adaptive.json").read_text())
    meta["probe"] = {**rule.probe.to_json(), "transitions": [[1.0]]}  # a table of one code
    (folder / "adaptive.json").write_text(json.dumps(meta))
    with pytest.raises(SplitError, match="does not fit this MAE"):
        load_split(mae=folder)
    meta["probe"] = {"layer": 1, "samples": 2}
    (folder / "adaptive.json").write_text(json.dumps(meta))
    with pytest.raises(SplitError, match="adaptive.json"):
        load_split(mae=folder)


def test_the_cloud_probes_layer_1_answers_only_and_always_the_same(tmp_path, split):
    """Layer 1 of a stream that announced more layers (adaptive's: the edge may send layer 2)
    is probed; a frame whose layers are all in (progressive k = 1) is not: nothing waits on
    its confidence, and the probe's time would only delay the answer."""
    folder = tmp_path / "mae"
    shutil.copytree(DEFAULT_MAE, folder)
    probe = adaptive_probe.fit(split.mae, tokens_of(split, range(10, 14)), samples=4)
    base = AdaptiveRule.load(DEFAULT_MAE)
    AdaptiveRule(base.rule, base.threshold, base.model, probe).save(folder)
    probed = load_split(mae=folder)
    questions = ["describe the scene .", "how many circles are there ?", "is there a red square ?"]
    rule = probed.adaptive_rule()[0]
    probed_answers = unsure = 0
    for seed in range(20, 26):
        frame = probed.edge(render_scene(generate_scene(seed)))
        first = dataclasses.replace(frame.prefix(1), layers_announced=frame.k)  # more to come
        for q in questions:
            one = probed.cloud(first, q)
            again = probed.cloud(first, q)
            final = probed.cloud(frame.prefix(1), q)  # layer 1 of 1: nothing more will come
            assert final.refinement_agreement is None and "probe_ms" not in final.stage_ms
            assert final.text == one.text
            unprobed = rule.confidence(one if one.refinement_agreement is None else
                                       dataclasses.replace(one, refinement_agreement=None), q)
            if not rule.sure(unprobed):  # unsure already: the probe is not run (it only lowers)
                assert one.refinement_agreement is None and "probe_ms" not in one.stage_ms
                unsure += 1
                continue
            probed_answers += 1
            assert one.refinement_agreement is not None and 0.0 <= one.refinement_agreement <= 1.0
            assert one.refinement_agreement == again.refinement_agreement  # drawn from the bytes
            assert "probe_ms" in one.stage_ms
            assert (one.confidence == 0.0) or one.refinement_agreement == 1.0
            two = probed.cloud(frame.prefix(2), q)
            assert two.refinement_agreement is None and "probe_ms" not in two.stage_ms
    assert probed_answers >= 6 and unsure >= 1  # both cases seen
    # the same answers as without the probe: it only adds a confidence
    plain = load_split()
    frame = plain.edge(render_scene(generate_scene(20)), 1)
    assert plain.cloud(frame, questions[0]).text == probed.cloud(frame, questions[0]).text


def test_the_served_cloud_probes_adaptive_streams_but_not_progressive_k1(split):
    """Through the served cloud's progressive path (bytes on the wire): a stream whose header
    announced every layer, cut after layer 1 (adaptive's first answer), gets the probe where its
    answer is sure without it; the same layer 1 packed as a complete k = 1 stream never does."""
    from progvlm.codec.bitstream import parse_header
    from progvlm.serve.cloud import CloudModel
    from progvlm.split import Frame
    cloud = CloudModel(split)
    probed = 0
    for seed in range(30, 36):
        frame = split.edge(render_scene(generate_scene(seed)))
        whole = split.pack(frame)
        first_of_all = whole[:parse_header(whole, split.fingerprint).layer_ends()[0]]
        only_one = split.pack(Frame(frame.layers[:1], frame.num_tokens, frame.grid))
        for q in ("describe the scene .", "how many circles are there ?"):
            adaptive_first = cloud.progressive(first_of_all, q)
            k1 = cloud.progressive(only_one, q)
            assert adaptive_first["partial"] and not k1["partial"]
            assert "probe_ms" not in k1["stage_ms"]
            assert adaptive_first["answer"] == k1["answer"]
            probed += "probe_ms" in adaptive_first["stage_ms"]
    assert probed >= 3


def test_the_bundled_vlm_tells_whether_tokens_give_an_answer_without_generating_it(split):
    """TinyVLMBackend.gives_answers (one teacher-forced pass) says what generating and comparing
    (VLMBackend's default) says, on the probe's own refinements, on answers from other
    questions, and on answers cut at max_new_tokens (no <eos>: the limit ends them)."""
    import torch
    from progvlm.backends.base import VLMBackend
    vlm, probe = split.vlm, adaptive_probe.fit(split.mae, tokens_of(split, range(40, 44)), samples=4)
    questions = ["describe the scene .", "how many circles are there ?", "is there a red square ?"]
    tokens, asked, said = [], [], []
    for seed in range(50, 58):
        frame = split.edge(render_scene(generate_scene(seed)), 1)
        drawn = split.mae.decode_latent(probe.refinements(
            split.mae, torch.from_numpy(split.mae.edge_codec().decode_indices(
                frame.layers, frame.num_tokens))[0], seed), 2)
        answers = [split.cloud(frame, q) for q in questions]
        for t in drawn:
            for j, q in enumerate(questions):
                tokens.append(t)
                asked.append(q)
                said.append(answers[j] if seed % 2 else answers[(j + 1) % 3])  # odd: its own
    for limit in (32, 2):
        want = VLMBackend.gives_answers(vlm, tokens, asked, said, limit)
        assert vlm.gives_answers(tokens, asked, said, limit) == want
        assert 0 < sum(want) < len(want)
    # refinements asked different numbers of questions (their prefix passes grouped by count)
    some = [i for i in range(len(tokens)) if i % 7 != 0]
    pick = lambda xs: [xs[i] for i in some]  # noqa: E731
    assert vlm.gives_answers(pick(tokens), pick(asked), pick(said)) == \
        VLMBackend.gives_answers(vlm, pick(tokens), pick(asked), pick(said))
    # an answer cut at the limit is given at that limit and not at a longer one
    cut = vlm.cloud_half(tokens[0], questions[0], max_new_tokens=2)
    assert len(cut.token_ids) == 2
    assert vlm.gives_answers([tokens[0]], questions[:1], [cut], 2) == [True]
    assert vlm.gives_answers([tokens[0]], questions[:1], [cut], 32) == [False]
