"""`transformers` model families, one small class each: what differs between them at the split.

A family knows, for its processor and model: the prompt when the processor has no chat
template, the image kwargs it passes to every processor call, the visual tokens of one block
(image or tile), the frame size the processor works from, the string the processor puts in place
of the `<image>` placeholder for N tokens (the prompt expansion), the image features the model
scatters into the image positions, the tile grid the edge reads off its inputs, and the layouts
the language half takes (check_layout). `HFVLMBackend` (hf.py) delegates all of these to the
family of its model's `config.model_type`.

A new family is one class (usually a subclass of one below) plus its entry in FAMILIES
(tests/test_hf_family.py registers a stand-in from the test file).
"""
from __future__ import annotations

import torch
from PIL import Image

from .base import Grid, check_fixed_layout

# the largest tile grid side the Idefics3 prompt tags name (<row_6_col_6>)
MAX_TILE_SIDE = 6


class HFFamily:
    """The LLaVA-like default: a fixed layout, one image of a fixed number of tokens, no grid."""

    #: backend.family: the name records and the page show
    name: str
    #: how errors name the family's models
    label: str
    #: the prompt when the processor carries no chat template (same shape as the official ones)
    fallback_prompt: str

    def __init__(self, model, processor, image_splitting: bool | None):
        self.model, self.processor = model, processor
        self.image_token = processor.image_token
        #: image kwargs that change pixel_values (and the prompt expansion): for every call
        self.images_kwargs: dict = {}

    @property
    def tokens_per_block(self) -> int:
        raise NotImplementedError

    @property
    def input_size(self) -> int:
        """The longest side of the frame the processor works from."""
        raise NotImplementedError

    def expansion(self, n_tokens: int, grid: Grid) -> str:
        """The string the processor substitutes for the image placeholder, for N tokens."""
        raise NotImplementedError

    def image_features(self, inputs) -> torch.Tensor:
        """Exactly what the forward scatters into the image-token positions, as (N, D)."""
        raise NotImplementedError

    def grid(self, inputs) -> Grid:
        """The layout the cloud needs to rebuild the prompt, read off the processor's inputs."""
        return None

    def check_layout(self, model_id: str, num_tokens: int, grid: Grid) -> None:
        """ValueError unless the language half takes num_tokens laid out as grid (see
        VLMBackend.check_layout): here a fixed layout."""
        check_fixed_layout(model_id, self.tokens_per_block, num_tokens, grid)


def _pooled(out) -> torch.Tensor:
    """get_image_features(...).pooler_output as (N, D), whether a tensor or one per image."""
    feats = out.pooler_output
    if isinstance(feats, (list, tuple)):
        feats = torch.cat(list(feats), dim=0)
    return feats.reshape(-1, feats.shape[-1])


class LlavaFamily(HFFamily):
    """LLaVA: a CLIP-style vision tower, a projector, N fixed by the image processor's crop."""

    name, label = "llava", "LLaVA"
    fallback_prompt = "USER: <image>\n{question} ASSISTANT:"

    def __init__(self, model, processor, image_splitting):
        super().__init__(model, processor, image_splitting)
        self._expansion: str | None = None

    @property
    def tokens_per_block(self) -> int:
        return self.expansion(0, None).count(self.image_token)

    @property
    def input_size(self) -> int:
        ip = self.processor.image_processor
        crop = getattr(ip, "crop_size", None) or getattr(ip, "size", {})
        return int(crop.get("height") or crop.get("shortest_edge"))

    def expansion(self, n_tokens, grid):
        if self._expansion is None:  # N is fixed by the processor's output size: ask it once
            pixels = self.processor.image_processor(images=[Image.new("RGB", (32, 32))],
                                                    return_tensors="pt", **self.images_kwargs)
            self._expansion = self.processor.replace_image_token(pixels, 0)
        return self._expansion

    def image_features(self, inputs):
        extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        return _pooled(self.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                     return_dict=True, **extra))


class Idefics3Family(HFFamily):
    """Idefics3 / SmolVLM: a SigLIP-style encoder, a pixel-shuffle connector, image_seq_len
    tokens per image or tile; with image splitting, rows × cols tiles plus the global image,
    the grid named by <row_r_col_c> tags in the prompt."""

    name, label = "idefics3", "Idefics3/SmolVLM"
    fallback_prompt = "User:<image>{question}<end_of_utterance>\nAssistant:"

    def __init__(self, model, processor, image_splitting):
        super().__init__(model, processor, image_splitting)
        if image_splitting is not None:
            self.images_kwargs["do_image_splitting"] = bool(image_splitting)

    @property
    def splitting(self) -> bool:
        return bool(self.images_kwargs.get("do_image_splitting", getattr(
            self.processor.image_processor, "do_image_splitting", False)))

    @property
    def tokens_per_block(self) -> int:
        return int(self.processor.image_seq_len)

    @property
    def input_size(self) -> int:
        """The whole image (tiled when splitting is on): the smallest frame that loses
        nothing the model sees."""
        ip = self.processor.image_processor
        return int((ip.size if self.splitting else ip.max_image_size)["longest_edge"])

    def check_layout(self, model_id, num_tokens, grid):
        """One global image, no grid or (0, 0); with splitting, rows × cols tiles (at most the
        processor's own side of tiles) plus the global image, tokens_per_block tokens each."""
        rows, cols = grid if grid is not None else (0, 0)
        ip = self.processor.image_processor
        side = -(-int(ip.size["longest_edge"]) // int(ip.max_image_size["longest_edge"]))
        most = min(side, MAX_TILE_SIDE) if self.splitting else 0
        if (rows == 0) != (cols == 0) or not (rows <= most and cols <= most):
            raise ValueError(f"{model_id} takes tile grids of at most {most} × {most}, "
                             f"not {rows} × {cols}")
        expected = self.tokens_per_block * (rows * cols + 1 if rows else 1)
        if num_tokens != expected:
            raise ValueError(f"{model_id} takes {expected} visual tokens for a {rows} × {cols} "
                             f"grid, not {num_tokens}")

    def expansion(self, n_tokens, grid):
        per_image = self.processor.image_seq_len
        if grid is None:
            if n_tokens != per_image:
                raise ValueError(
                    f"idefics3: {n_tokens} visual tokens = {n_tokens // max(per_image, 1)} images of "
                    f"{per_image} tokens: the image was split into tiles, so pass grid=(rows, cols) "
                    "as returned by edge_half_with_grid")
            grid = (0, 0)
        rows, cols = grid
        return self.processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)

    def image_features(self, inputs):
        return _pooled(self.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            pixel_attention_mask=inputs.get("pixel_attention_mask"), return_dict=True))

    def grid(self, inputs):
        """The tile grid, read off the `<row_r_col_c>` tags the processor put in the prompt."""
        tokenizer = self.processor.tokenizer
        present = set(inputs["input_ids"].flatten().tolist())
        rows = cols = 0
        for r in range(1, MAX_TILE_SIDE + 1):
            for c in range(1, MAX_TILE_SIDE + 1):
                tid = tokenizer.convert_tokens_to_ids(f"<row_{r}_col_{c}>")
                if tid is not None and tid != tokenizer.unk_token_id and tid in present:
                    rows, cols = max(rows, r), max(cols, c)
        return rows, cols


#: config.model_type → its family
FAMILIES: dict[str, type[HFFamily]] = {"idefics3": Idefics3Family, "smolvlm": Idefics3Family,
                                       "llava": LlavaFamily}


def family_class(config) -> type[HFFamily]:
    """The family of a model config; a ValueError naming the supported ones for anything else."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        labels = list(dict.fromkeys(f.label for f in FAMILIES.values()))
        names = " and ".join([", ".join(labels[:-1]), labels[-1]] if len(labels) > 1 else labels)
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        raise ValueError(
            f"HFVLMBackend supports only the {names} families (model_type in "
            f"{sorted(FAMILIES)}); got model_type={model_type!r} ({', '.join(archs)})")
    return FAMILIES[model_type]
