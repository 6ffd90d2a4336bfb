"""Adaptive refinement's confidence and stopping rule (progvlm/adaptive.py).

* every answer's token probabilities are the softmax of the LM's logits, checked by hand
  (teacher-forced logits) for the bundled VLM and a tiny random transformers VLM, and the
  batched path gives what the single path gives;
* the rules and the stop decision; adaptive.json round trip and what Split makes of it;
* the policy, calibration and evaluation on a made-up ladder (exact figures) and on a small
  slice of the training stream (slow);
* reliability bins and ECE by hand; the plot is a PNG.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from progvlm import adaptive
from progvlm.eval.calibration import calibrate_on_scenes, rule_of
from progvlm.adaptive import AdaptiveRule, Ladder
from progvlm.backends.base import Answer
from progvlm.toyworld.data import training_questions
from progvlm.models.mae import DEFAULT_MAE
from progvlm.toyworld.questions import EOS, WORD_TO_ID
from progvlm.toyworld.scenes import generate_scene, render_scene
from progvlm.split import SplitError, load_split


def by_hand(logits: torch.Tensor, ids: list[int]) -> tuple[list[float], list[float]]:
    """Softmax of each row of teacher-forced logits: p(ids[j]) and the best other token's p."""
    probs = logits.detach().double().softmax(-1)
    chosen = [float(probs[j, t]) for j, t in enumerate(ids)]
    others = probs.clone()
    others[torch.arange(len(ids)), torch.tensor(ids)] = -1
    return chosen, [float(p) for p in others.max(-1).values]


def scene_requests(split, scenes=range(3), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for s in scenes:
        scene = generate_scene(7000 + s)
        tokens = split.vlm.edge_half(render_scene(scene))
        out += [(tokens, qa.question, None) for qa in training_questions(scene, rng)]
    return out


# ---- confidence from the logits ------------------------------------------------------------
def test_bundled_token_probabilities_are_the_softmax_of_the_logits(split):
    for tokens, question, _ in scene_requests(split, scenes=range(2)):
        answer = split.language(tokens, question)
        ids = answer.token_ids + [WORD_TO_ID[EOS]]  # the stop decision counts too
        logits = split.vlm.answer_logits(tokens, question, ids)
        chosen, runner_up = by_hand(logits, ids)
        assert answer.token_probs == pytest.approx(chosen, abs=1e-4)
        assert answer.runner_up_probs == pytest.approx(runner_up, abs=1e-4)
        assert all(p >= r for p, r in zip(answer.token_probs, answer.runner_up_probs))
        rule = split.adaptive_rule()[0]  # the shipped one (learned: it reads the question too)
        by_hand_answer = Answer(answer.text, answer.token_ids, token_probs=chosen,
                                runner_up_probs=runner_up)
        assert answer.confidence == pytest.approx(rule.confidence(by_hand_answer, question), abs=1e-4)


def test_bundled_batched_confidence_is_the_single_one(split):
    requests = scene_requests(split, scenes=range(3), seed=1)
    assert len({len(q.split()) for _, q, _ in requests}) >= 4  # padded rows in the batch
    alone = [split.language(*r) for r in requests]
    batched = split.language_batch(requests)
    for a, b in zip(alone, batched):
        assert b.token_ids == a.token_ids
        assert b.token_probs == pytest.approx(a.token_probs, abs=1e-5)
        assert b.runner_up_probs == pytest.approx(a.runner_up_probs, abs=1e-5)
        assert b.confidence == pytest.approx(a.confidence, abs=1e-5)
    # the whole model (unsplit) is as sure as its halves
    scene = generate_scene(7000)
    whole = split.whole(render_scene(scene), requests[0][1])
    assert whole.token_probs == pytest.approx(alone[0].token_probs, abs=1e-4)


@pytest.mark.slow  # ~8 s, mostly importing transformers
def test_hf_token_probabilities_are_the_softmax_of_the_logits(tmp_path):
    pytest.importorskip("transformers")
    from PIL import Image
    from progvlm.backends import load_vlm
    from progvlm.backends.random_hf import write_random_vlm
    backend = load_vlm(write_random_vlm(tmp_path / "vlm", "tiny-idefics3"))
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    tokens, grid = backend.edge_half_with_grid(Image.fromarray(pixels, "RGB"))
    questions = ["what color is the cube?", "gray?", "describe the scene."]
    alone = [backend.cloud_half(tokens, q, 5, grid=grid) for q in questions]
    for q, answer in zip(questions, alone):
        assert len(answer.token_probs) == 5 and answer.token_ids  # 5 tokens, no stop reached
        chosen, runner_up = by_hand(backend.answer_logits(tokens, q, answer.token_ids, grid),
                                    answer.token_ids)
        assert answer.token_probs == pytest.approx(chosen, abs=1e-4)
        assert answer.runner_up_probs == pytest.approx(runner_up, abs=1e-4)
        assert 0.0 <= answer.confidence <= 1.0
    batched = backend.cloud_half_batch([tokens] * 3, questions, 5, [grid] * 3)
    for a, b in zip(alone, batched):
        assert b.token_ids == a.token_ids
        assert b.token_probs == pytest.approx(a.token_probs, abs=1e-4)


# ---- rules and decisions --------------------------------------------------------------------
def answer(chosen, runner_up=None, text="x") -> Answer:
    runner_up = runner_up if runner_up is not None else [0.0] * len(chosen)
    return Answer(text, token_probs=list(chosen), runner_up_probs=list(runner_up))


def test_rules_combine_token_probabilities_as_named():
    a = answer([0.9, 0.5, 1.0], [0.05, 0.4, 0.0])
    assert AdaptiveRule("min_prob", 0.5).confidence(a) == pytest.approx(0.5)
    assert AdaptiveRule("mean_prob", 0.5).confidence(a) == pytest.approx(0.8)
    assert AdaptiveRule("geo_mean_prob", 0.5).confidence(a) == pytest.approx((0.45) ** (1 / 3))
    assert AdaptiveRule("min_margin", 0.5).confidence(a) == pytest.approx(0.1)
    assert AdaptiveRule("min_prob", 0.5).confidence(Answer("no probabilities")) is None


def test_sure_is_confidence_at_or_above_the_threshold_and_never_for_unknown():
    rule = AdaptiveRule("min_prob", 0.9)
    assert rule.sure(0.95) and rule.sure(0.9)
    assert not rule.sure(0.8999) and not rule.sure(None)


@pytest.mark.parametrize("rule, threshold, says", [("median", 0.5, "unknown confidence rule"),
                                                   ("min_prob", 1.5, "in 0..1"),
                                                   ("min_prob", -0.1, "in 0..1")])
def test_bad_rules_are_refused_with_the_reason(rule, threshold, says):
    with pytest.raises(ValueError, match=says):
        AdaptiveRule(rule, threshold)


# ---- adaptive.json ---------------------------------------------------------------------------
@pytest.fixture
def mae_copy(tmp_path) -> Path:
    folder = tmp_path / "mae"
    folder.mkdir()
    for name in ("config.json", "mae.safetensors"):
        shutil.copy(DEFAULT_MAE / name, folder / name)
    return folder


def test_adaptive_json_round_trip(tmp_path):
    path = AdaptiveRule("min_margin", 0.8125).save(tmp_path, calibrated_on="a test", ece=0.01)
    assert path == tmp_path / "adaptive.json"
    assert AdaptiveRule.load(tmp_path) == AdaptiveRule("min_margin", 0.8125)
    assert json.loads(path.read_text())["calibrated_on"] == "a test"


def test_split_reads_the_mae_folders_rule_and_scores_answers_with_it(split, mae_copy):
    other = load_split(split.vlm, mae_copy)
    assert other.adaptive_threshold()[1].startswith("default")
    assert other.adaptive_rule()[0] == adaptive.DEFAULT_RULE
    AdaptiveRule("mean_prob", 0.75).save(mae_copy)
    calibrated = load_split(split.vlm, mae_copy)
    assert calibrated.adaptive_threshold() == (0.75, str(mae_copy / "adaptive.json"))
    tokens, question, _ = scene_requests(split, scenes=[0])[0]
    a = calibrated.language(tokens, question)
    assert a.confidence == pytest.approx(np.mean(a.token_probs))
    [b] = calibrated.language_batch([(tokens, question, None)])
    assert b.confidence == pytest.approx(a.confidence, abs=1e-6)


def test_a_broken_adaptive_json_fails_at_load_naming_the_file(split, mae_copy):
    (mae_copy / "adaptive.json").write_text(json.dumps({"rule": "min_prob", "threshold": 7}))
    with pytest.raises(SplitError, match="adaptive.json"):
        load_split(split.vlm, mae_copy)


def test_the_bundled_mae_carries_its_calibrated_rule(split):
    threshold, source = split.adaptive_threshold()
    assert source == str(DEFAULT_MAE / "adaptive.json")
    meta = json.loads((DEFAULT_MAE / "adaptive.json").read_text())
    assert meta["mae_fingerprint"] == split.fingerprint.hex()
    assert meta["vlm_id"] == split.vlm.model_id
    # issue 20: the learned rule, gated by the refinement probe, won the calibration (every rule
    # there is gated by the probe); the default (no adaptive.json, no probe) is the best fixed
    # rule of the calibration without a probe, so it must be stricter than the same rule gated
    rule = split.adaptive_rule()[0]
    assert meta["rule"] == "learned" and rule.model is not None and rule.probe is not None
    fixed = {p["rule"]: p for p in meta["per_rule"]}
    assert adaptive.DEFAULT_RULE.probe is None
    assert adaptive.DEFAULT_RULE.threshold > fixed[adaptive.DEFAULT_RULE.rule]["threshold"]
    assert 0.0 <= threshold <= 1.0


# ---- policy, calibration, evaluation on a made-up ladder ---------------------------------------
def made_up_ladder() -> Ladder:
    """4 questions, L = 3. k = 1 is wrong (and unsure) on question 1 and unsure but right on
    question 2; k = 2 is right everywhere; question 3 is sure only at k = 3."""
    truth = ["a", "b", "c", "d"]
    texts = [["a", "a", "a"], ["x", "b", "b"], ["c", "c", "c"], ["d", "d", "d"]]
    confs = [[0.99, 0.99, 0.99], [0.50, 0.95, 0.99], [0.70, 0.97, 0.99], [0.60, 0.60, 0.99]]
    answers = [[answer([c], text=t) for t, c in zip(ts, cs)] for ts, cs in zip(texts, confs)]
    bytes_ = np.array([[10, 20, 40]] * 4)
    return Ladder(answers, bytes_, reference=list(truth), truth=truth)


def test_the_policy_stops_at_the_first_sure_answer_else_at_L():
    ladder = made_up_ladder()
    conf = ladder.confidence("min_prob")
    assert list(adaptive.stopping_layers(conf, 0.9)) == [1, 2, 2, 3]
    assert list(adaptive.stopping_layers(conf, 0.0)) == [1, 1, 1, 1]
    assert list(adaptive.stopping_layers(conf, 1.0)) == [3, 3, 3, 3]  # never sure: all L
    conf[0, 0] = np.nan  # a backend that could not tell: never sure there
    assert adaptive.stopping_layers(conf, 0.5)[0] == 2


def test_calibration_picks_the_cheapest_threshold_that_catches_the_mistake():
    ladder = made_up_ladder()
    choice = adaptive.calibrate(ladder, budget=1.5, rules=["min_prob"])
    # 0.5 < τ ≤ 0.6 sends question 1 on (k=1 wrong) and keeps 3 of 4 at k=1: 12.5 bytes,
    # 1.25× k=1, all correct. Higher τ costs more for nothing.
    assert choice["rule"] == "min_prob" and 0.5 < choice["threshold"] <= 0.6
    assert choice["chosen"]["accuracy"] == 1.0 and choice["goal_met"]
    assert choice["chosen"]["bytes_ratio"] == pytest.approx(1.25)
    # a budget of k = 1's bytes leaves no room: the best is k = 1 everywhere, 3 of 4 right
    tight = adaptive.calibrate(ladder, budget=1.0, rules=["min_prob"])
    assert tight["chosen"]["accuracy"] == 0.75 and not tight["goal_met"]


def test_goal_rate_is_how_often_an_evaluation_of_that_size_meets_the_goal():
    ladder = made_up_ladder()
    conf = ladder.confidence("min_prob")
    # τ = 0.55 sends question 1 on: every answer right, 1 + (share of question 1) × k = 1's bytes.
    # Within 1.5× on every draw of 2000; at 1.25×, the ladder's own mean, about half the draws
    # hold more than a quarter of question 1; τ = 1.0 (all L, 4×) is within neither
    rates = adaptive.goal_rates(ladder, conf, [0.55, 1.0], budget=1.5)
    assert rates.tolist() == [1.0, 0.0]
    edge = adaptive.goal_rates(ladder, conf, [0.55], budget=1.25)[0]
    assert 0.35 < edge < 0.65
    # correctness counts too: τ = 0 keeps question 1's wrong k = 1 answer (0.75 < 1.0 - slack)
    assert adaptive.goal_rates(ladder, conf, [0.0], budget=10.0).tolist() == [0.0]


def test_calibration_keeps_clear_of_the_budgets_edge():
    """Accuracy that creeps up with every byte: the most accurate threshold within the budget
    sits at its edge and would miss it on about half the evaluations; the choice is the one
    likeliest to meet the goal, well inside it, for a creep smaller than the slack."""
    rng = np.random.default_rng(5)
    n = 4000
    conf = rng.uniform(0.0, 1.0, n)
    wrong_at_1 = rng.uniform(0.0, 1.0, n) < 0.002 * (1.0 - conf) + 0.2 * (conf < 0.1)
    answers = [[answer([c], text="b" if w else "a"), answer([1.0], text="a")]
               for c, w in zip(conf, wrong_at_1)]
    ladder = Ladder(answers, np.array([[10, 20]] * n), reference=["a"] * n, truth=["a"] * n)
    choice = adaptive.calibrate(ladder, budget=1.3, rules=["min_prob"])
    points = [p for p in adaptive.sweep(ladder, ["min_prob"], budget=1.3) if p["bytes_ratio"] <= 1.3]
    most_accurate = max(points, key=lambda p: (p["accuracy"], -p["bytes_ratio"]))
    assert most_accurate["bytes_ratio"] > 1.29 and most_accurate["goal_rate"] < 0.7
    chosen = choice["chosen"]
    assert chosen["goal_rate"] == max(p["goal_rate"] for p in points) > 0.95
    assert chosen["bytes_ratio"] < 1.27 and choice["goal_met"]


def test_evaluation_figures_are_consistent():
    ladder = made_up_ladder()
    rep = adaptive.evaluate(ladder, AdaptiveRule("min_prob", 0.9))
    assert rep["layers_histogram"] == {1: 1, 2: 2, 3: 1}
    assert rep["bytes_mean"] == pytest.approx((10 + 20 + 20 + 40) / 4)
    assert rep["k1_bytes_mean"] <= rep["bytes_mean"] <= rep["k3_bytes_mean"]
    assert rep["accuracy"] == 1.0 and rep["k3_accuracy"] == 1.0
    assert rep["mean_layers"] == pytest.approx(2.0)
    assert not rep["goal_met"]  # 2.25× the bytes of k = 1


def test_without_ground_truth_agreement_is_the_target():
    ladder = made_up_ladder()
    ladder.truth = None
    ladder.reference = ["a", "b", "c", "zzz"]  # question 3's uncompressed answer differs
    assert ladder.target == "agreement"
    assert ladder.correct()[:, 0].tolist() == [True, False, True, False]
    rep = adaptive.evaluate(ladder, AdaptiveRule("min_prob", 0.9))
    assert rep["agreement"] == 0.75 and "accuracy" not in rep


# ---- reliability ------------------------------------------------------------------------------
def test_reliability_bins_and_ece_by_hand(tmp_path):
    conf = np.array([0.95, 0.95, 0.85, 0.15, np.nan])
    correct = np.array([True, False, True, False, True])
    rep = adaptive.reliability(conf, correct, bins=10)
    assert rep["answers"] == 4  # the unknown confidence is left out
    assert [(b["low"], b["count"]) for b in rep["bins"]] == [(0.1, 1), (0.8, 1), (0.9, 2)]
    # |0 - .15|·1 + |1 - .85|·1 + |.5 - .95|·2, over 4
    assert rep["ece"] == pytest.approx((0.15 + 0.15 + 0.9) / 4)
    png = adaptive.plot_reliability(rep, tmp_path / "plots" / "reliability.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the real model, a small slice of the calibration scenes ---------------------------------------
@pytest.mark.slow
def test_calibration_on_held_out_scenes_and_evaluation_on_the_eval_stream(split):
    choice, ladder = calibrate_on_scenes(split, count=60)
    assert choice["rule"] in [*adaptive.RULES, "learned"] and 0.0 <= choice["threshold"] <= 1.0
    assert "evaluation stream" in choice["calibrated_on"] and "from scene 50000" in choice["calibrated_on"]
    assert rule_of(choice).probe is not None  # the probe's table, fitted on the same scenes
    # the layer-1 answers carry the probe's agreement; the others do not
    assert all(row[0].refinement_agreement is not None for row in ladder.answers)
    assert all(a.refinement_agreement is None for row in ladder.answers for a in row[1:])
    assert choice["chosen"]["bytes_ratio"] <= adaptive.BYTES_BUDGET
    k1 = choice["fixed_k"][0]
    assert choice["chosen"]["accuracy"] >= k1["accuracy"]  # τ = 0 is k = 1: never worse
    from progvlm.eval.evaluate import evaluate_mae
    rep = evaluate_mae(split, seed=3, count=30, jpeg_qualities=(),
                       adaptive_rule=rule_of(choice))
    ad = rep["adaptive"]
    assert ad["questions"] == 30
    assert ad["k1_bytes_mean"] <= ad["bytes_mean"] <= ad["k4_bytes_mean"]
    assert 1.0 <= ad["mean_layers"] <= 4.0 and sum(ad["layers_histogram"].values()) == 30
    assert 0.0 <= ad["reliability"]["ece"] <= 1.0


@pytest.mark.slow
def test_any_vlm_calibrates_and_reports_the_adaptive_row_on_its_images(tmp_path, capsys):
    """No ground truth: calibrate-adaptive --images writes adaptive.json with agreement as the
    target; eval-mae --images then reports the adaptive row under that rule, and its plot."""
    pytest.importorskip("transformers")
    from PIL import Image
    from progvlm.backends.random_hf import write_random_vlm
    from progvlm.cli.main import main
    from test_measure_any_vlm import untrained_mae
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / f"{i}.png")
    vlm = write_random_vlm(tmp_path / "vlm", "tiny-llava")
    mae = untrained_mae(vlm, sorted(images.glob("*.png")), tmp_path / "mae")
    questions = tmp_path / "questions.txt"
    questions.write_text("Describe the image.\nWhat is it?\n")
    common = ["--vlm", str(vlm), "--mae", str(mae), "--images", str(images),
              "--questions", str(questions), "--max-new-tokens", "3", "--json"]
    assert main(["calibrate-adaptive", *common]) == 0
    choice = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert choice["target"] == "agreement" and choice["questions"] == 6
    saved = json.loads((mae / "adaptive.json").read_text())
    assert saved["rule"] == choice["rule"] and saved["threshold"] == choice["threshold"]
    assert saved["probe"]["transitions"] == choice["probe"]["transitions"]  # fitted on its images
    plot = tmp_path / "reliability.png"
    assert main(["eval-mae", *common, "--reliability-plot", str(plot)]) == 0
    out = capsys.readouterr().out
    rep = json.loads(out.strip().splitlines()[-1])
    ad = rep["adaptive"]
    assert (ad["rule"], ad["threshold"]) == (choice["rule"], choice["threshold"])
    assert ad["k1_bytes_mean"] <= ad["bytes_mean"] <= ad["k4_bytes_mean"]
    assert 0.0 <= ad["agreement"] <= 1.0 and "accuracy" not in ad
    assert "adaptive" in out and plot.read_bytes()[:4] == b"\x89PNG"


def test_calibrate_adaptive_refuses_bad_options_with_the_reason(capsys):
    from progvlm.cli.main import main
    assert main(["calibrate-adaptive", "--budget", "0.5", "--dry-run"]) == 2
    assert "--budget must be in 1..100" in capsys.readouterr().err
    assert main(["calibrate-adaptive", "--questions", "0", "--dry-run"]) == 2
    assert "--questions must be" in capsys.readouterr().err
