import numpy as np
import pytest

from progvlm.toyworld.questions import (NUMBER_WORDS, QUESTION_TYPES, VOCAB, decode_ids, describe,
                               encode_words, make_question, questions_for, unknown_words)
from progvlm.toyworld.scenes import generate_scene


def _scenes(n=300):
    return [generate_scene(1000 + i) for i in range(n)]


def test_every_question_and_answer_is_in_the_vocabulary():
    rng = np.random.default_rng(0)
    for s in _scenes(200):
        for qa in questions_for(s, rng):
            assert not unknown_words(qa.question), qa
            assert not unknown_words(qa.answer), qa
            assert decode_ids(encode_words(qa.answer)) == qa.answer


def test_answers_agree_with_the_ground_truth():
    rng = np.random.default_rng(1)
    for s in _scenes():
        for qtype in QUESTION_TYPES:
            qa = make_question(s, qtype, rng)
            if qa is None:
                continue
            if qa.question == "how many objects are there ?":
                assert qa.answer == NUMBER_WORDS[len(s.objects)]
            if qtype == "exist":
                words = qa.question.split()
                present = any(o.colour == words[3] and o.shape == words[4] for o in s.objects)
                assert qa.answer == ("yes" if present else "no")
            if qtype == "colour":
                assert qa.answer in {o.colour for o in s.objects}
            if qtype == "describe":
                assert len(qa.answer.split(" , ")) == len(s.objects)


def test_describe_lists_objects_left_to_right():
    s = generate_scene(42)
    names = describe(s).split(" , ")
    xs = [next(o.x for o in s.objects if o.name == n) for n in names]
    assert xs == sorted(xs)


def test_referring_expressions_are_unique():
    rng = np.random.default_rng(2)
    for s in _scenes(150):
        qa = make_question(s, "size", rng)
        ref = qa.question[len("is the "):-len(" small or large ?")].split()
        matching = [o for o in s.objects
                    if all(w in ("object", o.shape, o.colour, o.size) for w in ref)]
        assert len(matching) == 1 and matching[0].size == qa.answer


def test_exist_and_spatial_answers_are_balanced():
    rng = np.random.default_rng(3)
    answers = {"exist": [], "spatial": []}
    for s in _scenes(400):
        for t in answers:
            qa = make_question(s, t, rng)
            if qa:
                answers[t].append(qa.answer == "yes")
    for t, a in answers.items():
        assert 0.4 < np.mean(a) < 0.6, t


def test_unknown_words_are_reported():
    assert unknown_words("what colour is the giraffe ?") == ["giraffe"]
    assert "<unk>" in VOCAB
