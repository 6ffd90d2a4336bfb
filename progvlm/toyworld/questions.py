"""Question templates with exact answers, and the word vocabulary of the bundled VLM.

Every question refers to objects by an expression that is unique in its scene, so each has
exactly one correct answer. Answers come from a small closed vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import COLOURS, MAX_OBJECTS, SHAPES, SIZES, Scene, SceneObject

QUESTION_TYPES = ("colour", "shape", "count", "exist", "spatial", "size", "describe")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
RELATIONS = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}


@dataclass(frozen=True)
class QA:
    qtype: str
    question: str
    answer: str
    # For each answer word, the scene objects it is about: (objects, second objects). Used in
    # training to teach two attention heads where to look; empty where no object is the point.
    # The second set makes comparisons asymmetric: "is A left of B" → (A, B); in a description,
    # the object named just before.
    focus: tuple = ()


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _refer(obj: SceneObject, scene: Scene, use=("shape", "colour", "size")) -> str | None:
    """The shortest expression that picks out obj alone, built from the attributes in use."""
    others = [o for o in scene.objects if o is not obj]
    candidates = []
    if "shape" in use:
        candidates.append((obj.shape,))
        if "size" in use:
            candidates.append((obj.size, obj.shape))
    if "colour" in use:
        candidates.append((obj.colour, "object"))
        if "size" in use:
            candidates.append((obj.size, obj.colour, "object"))
        if "shape" in use:
            candidates.append((obj.colour, obj.shape))
    for words in candidates:
        if not any(_matches(o, words) for o in others):
            return " ".join(words)
    return None


def _matches(o: SceneObject, words: tuple[str, ...]) -> bool:
    return all(w in ("object", o.shape, o.colour, o.size) for w in words)


def describe(scene: Scene) -> str:
    return " , ".join(o.name for o in scene.left_to_right())


def make_question(scene: Scene, qtype: str, rng: np.random.Generator) -> QA | None:
    """One question of this type about the scene, or None where the scene allows none."""
    objs = scene.objects
    i = int(rng.integers(len(objs)))
    pick = objs[i]
    if qtype == "colour":
        ref = _refer(pick, scene, use=("shape", "size"))
        return None if ref is None else QA(qtype, f"what colour is the {ref} ?", pick.colour, (((i,), ()),))
    if qtype == "shape":
        ref = _refer(pick, scene, use=("colour", "size"))
        return None if ref is None else QA(qtype, f"what shape is the {ref} ?", pick.shape, (((i,), ()),))
    if qtype == "size":
        ref = _refer(pick, scene, use=("shape", "colour"))
        return QA(qtype, f"is the {ref} small or large ?", pick.size, (((i,), ()),))
    if qtype == "count":
        kind = rng.integers(3)
        if kind == 0:
            question, hits = "how many objects are there ?", list(range(len(objs)))
        elif kind == 1:
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            question = f"how many {colour} objects are there ?"
            hits = [j for j, o in enumerate(objs) if o.colour == colour]
        else:
            shape = SHAPES[rng.integers(len(SHAPES))]
            question = f"how many {_plural(shape)} are there ?"
            hits = [j for j, o in enumerate(objs) if o.shape == shape]
        return QA(qtype, question, NUMBER_WORDS[len(hits)], ((tuple(hits), ()),))
    if qtype == "exist":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            colour, shape = pick.colour, pick.shape
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            # half the "no" cases share a colour or a shape with an object, so neither
            # attribute alone decides the answer
            near = [(c, s) for c, s in absent if any(c == o.colour or s == o.shape for o in objs)]
            pool = near if near and rng.random() < 0.5 else absent
            colour, shape = pool[rng.integers(len(pool))]
        hits = tuple(j for j, o in enumerate(objs) if (o.colour, o.shape) == (colour, shape))
        return QA(qtype, f"is there a {colour} {shape} ?", "yes" if hits else "no", ((hits, ()),))
    if qtype == "spatial":
        if len(objs) < 2:
            return None
        a_i, b_i = (int(v) for v in rng.choice(len(objs), 2, replace=False))
        a, b = objs[a_i], objs[b_i]
        rel = list(RELATIONS)[rng.integers(len(RELATIONS))]
        axis, sign = RELATIONS[rel]
        delta = (getattr(a, axis) - getattr(b, axis)) * sign
        return QA(qtype, f"is the {_refer(a, scene)} {rel} the {_refer(b, scene)} ?",
                  "yes" if delta > 0 else "no", (((a_i,), (b_i,)),))
    if qtype == "describe":
        order = sorted(range(len(objs)), key=lambda j: objs[j].x)
        focus = []
        for n, j in enumerate(order):
            before = (order[n - 1],) if n else ()
            focus += [((j,), before), ((j,), before)] + ([((), ())] if n < len(order) - 1 else [])
        return QA(qtype, "describe the scene .", describe(scene), tuple(focus))
    raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")


def questions_for(scene: Scene, rng: np.random.Generator, qtypes=QUESTION_TYPES) -> list[QA]:
    """One question of each type the scene allows (a few retries for the picky types)."""
    out = []
    for qtype in qtypes:
        for _ in range(8):
            qa = make_question(scene, qtype, rng)
            if qa is not None:
                out.append(qa)
                break
    return out


def suggested_questions(scene: Scene, seed: int = 0) -> list[QA]:
    return questions_for(scene, np.random.default_rng(seed))


# ---- vocabulary -------------------------------------------------------------------------------
PAD, BOS, SEP, EOS, UNK = "<pad>", "<bos>", "<sep>", "<eos>", "<unk>"
_WORDS = sorted(set(
    "what colour is the shape object how many objects are there is a small or large describe "
    "scene left of right above below yes no ? . ,".split()
    + list(COLOURS) + list(SHAPES) + [_plural(s) for s in SHAPES] + list(SIZES) + list(NUMBER_WORDS)
))
VOCAB = [PAD, BOS, SEP, EOS, UNK] + _WORDS
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
MAX_ANSWER_TOKENS = 3 * MAX_OBJECTS  # "colour shape ," per object; the last comma is <eos>


def normalise(text: str) -> list[str]:
    text = text.lower().replace("color", "colour")
    for p in "?.,":
        text = text.replace(p, f" {p} ")
    return text.split()


def encode_words(text: str) -> list[int]:
    return [WORD_TO_ID.get(w, WORD_TO_ID[UNK]) for w in normalise(text)]


def question_ids(question_words: list[int]) -> list[int]:
    """The bundled model's prompt: <bos> words <sep> (NumPy- and torch-free: the board uses it)."""
    return [WORD_TO_ID[BOS]] + question_words + [WORD_TO_ID[SEP]]


def check_question_length(question: str, max_text_len: int) -> None:
    """ValueError if `question` is longer than the bundled model reads: its prompt and at least
    one answer token in max_text_len positions (the PyTorch model's and the ONNX export's)."""
    words = len(encode_words(question))
    if words + 2 >= max_text_len:
        raise ValueError(f"question too long: {words} words, this model reads at most "
                         f"{max_text_len - 3}")


def unknown_words(text: str) -> list[str]:
    return [w for w in normalise(text) if w not in WORD_TO_ID]


def decode_ids(ids) -> str:
    words = []
    for i in ids:
        w = VOCAB[int(i)]
        if w == EOS:
            break
        if w not in (PAD, BOS, SEP):
            words.append(w)
    return " ".join(words)
