"""The MAE's ladder on any VLM's own images (eval-mae --images): no ground truth, so every
figure is against the VLM's answer from uncompressed tokens."""
from __future__ import annotations

from pathlib import Path

from ..images import ImageInputError, load_image
from .codecs import Plan, Unit, codecs_for, mean_or_nan
from .ladder import Item, run_ladder

NOTE = ("no ground truth: agreement and consistency are against the answer from uncompressed "
        "tokens; bytes are wire bytes (header included) for k, payload bytes for the baselines")


def image_files(folder) -> list[Path]:
    """The files directly in `folder` (hidden ones left out), in name order: the images to
    evaluate or profile (unreadable ones are skipped, and reported, where they are read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--images {folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def read_questions(path) -> list[str]:
    """One question per line; blank lines and lines starting with # are skipped."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    questions = [q for q in lines if q and not q.startswith("#")]
    if not questions:
        raise ValueError(f"{path} holds no questions (one per line; # starts a comment)")
    return questions


class ImageSet:
    """The ladder's ground for any VLM: every question about every readable image in
    `image_paths`, one image and one answer at a time (greedy, so "agreement" is what the
    compression changes, not sampling noise); unreadable images are listed in "skipped"."""
    unit, truth = "image", None

    def __init__(self, split, image_paths, questions, max_new_tokens: int = 32):
        self.split, self.paths = split, list(image_paths)
        self.questions, self.max_new_tokens = list(questions), max_new_tokens
        if not self.questions:
            raise ValueError("at least one question is needed")
        self.total = len(self.paths)
        self.items: list[Item] = []
        self.skipped: list[str] = []
        self.used = 0

    def units(self):
        for path in self.paths:
            try:
                image = load_image(path)
            except ImageInputError as e:
                self.skipped.append(f"{path}: {e}")
                continue
            tokens, grid = self.split.vlm.edge_half_with_grid(image)
            unit = Unit(self.used, image, tokens.float(), grid)
            self.used += 1
            self.items += [Item(unit.index, q) for q in self.questions]
            yield [unit]
        if not self.used:
            raise ValueError("no readable images: " + "; ".join(self.skipped[:3]))

    def see(self, images):
        return [self.split.vlm.edge_half_with_grid(im) for im in images]

    def answer(self, requests):
        return [self.split.vlm.cloud_half(t, q, self.max_new_tokens, grid=g) for t, g, q in requests]

    def exactness(self, texts, reference) -> dict:
        return {"agreement": mean_or_nan([a == r for a, r in zip(texts, reference)])}

    def head(self, reference) -> dict:
        vlm = self.split.vlm
        return {"vlm_id": vlm.model_id, "mae_fingerprint": self.split.fingerprint.hex(),
                "L": self.split.num_layers, "images": self.used, "questions": self.questions,
                "answers_per_method": len(self.items), "input_size": vlm.input_size}

    def tail(self) -> dict:
        return {"skipped": self.skipped, "note": NOTE}


def evaluate_mae_on_images(split, image_paths, questions, progress=None, camera_jpeg_quality=90,
                           model_jpeg_quality=90, max_new_tokens: int = 32,
                           adaptive_rule=None, codecs=None) -> dict:
    """Per k = 1..L on your own images, without ground truth: wire bytes (mean, max; what
    `split.pack` puts on the link, header included), exact agreement with the answer from
    uncompressed tokens and semantic consistency with it; and the same for the registry's
    baselines (codecs.codecs_for): `raw_fp16` (the tokens as fp16, no header),
    `jpeg_camera_q{q}` (the image as given) and `jpeg_q{q}` (resized to the model's input size
    first). `codecs`: these rows instead. "adaptive": the adaptive policy under
    `adaptive_rule` (default: the split's calibrated one), agreement in place of accuracy
    (progvlm.adaptive.evaluate)."""
    plan = Plan(split.num_layers, (model_jpeg_quality,), (camera_jpeg_quality,))
    ground = ImageSet(split, image_paths, questions, max_new_tokens)
    return run_ladder(split, ground, codecs or codecs_for(plan), adaptive_rule, progress)[0]
