"""Prompt-side preprocessing: images -> pixel patches and grids, token ids -> M-RoPE positions and decode delta."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .engine.sequence import ImageSpan
from .errors import Glm45vError


def mrope_positions(
    token_ids: Sequence[int], image_token_id: int | None, grid_thw: Sequence[Sequence[int]], merge: int
) -> tuple[torch.Tensor, int]:
    """Positions [3, T] and the decode delta (decode position = cache length + delta on all three rows).

    Text advances all rows together; each run of image tokens takes t = start, h = start + row, w = start + col
    over the merged grid, and the text after it starts at start + max(h, w) / merge.
    """
    rows: list[torch.Tensor] = []
    images = iter(grid_thw)
    pos, i, n = 0, 0, len(token_ids)
    while i < n:
        j = i
        is_image = image_token_id is not None and token_ids[i] == image_token_id
        while j < n and (token_ids[j] == image_token_id) == is_image:
            j += 1
        if not is_image:
            rows.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        t, h, w = next(images, (0, 0, 0))
        gh, gw = h // merge, w // merge
        count = t * gh * gw
        if count == 0 or count > j - i:
            raise ValueError(f"image token run of {j - i} does not match the image grids {list(grid_thw)}")
        tt = torch.arange(t).view(-1, 1, 1).expand(t, gh, gw)
        hh = torch.arange(gh).view(1, -1, 1).expand(t, gh, gw)
        ww = torch.arange(gw).view(1, 1, -1).expand(t, gh, gw)
        rows.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos += max(h, w) // merge
        i += count  # consecutive images without text between them are separate runs of the same token
    if next(images, None) is not None:
        raise ValueError(f"more image grids ({len(grid_thw)}) than image token runs in the prompt")
    positions = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - n if n else 0
    return positions, delta


def preprocess_images(images: Sequence, image_processor) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """PIL images -> pixel patches [N, 1176] (merge-window order) and grid (t, h, w) per image, through the
    checkpoint's own transformers image processor, so resizing and normalisation match the reference."""
    if not images:
        return torch.zeros(0), []
    out = image_processor(images=list(images), return_tensors="pt")
    grids = [tuple(int(v) for v in g) for g in out["image_grid_thw"].tolist()]
    return out["pixel_values"], grids


def num_image_tokens(grid: Sequence[int], merge: int) -> int:
    t, h, w = grid
    return t * h * w // (merge * merge)


def open_image(image) -> PIL.Image.Image:  # noqa: F821
    """A PIL image or a path -> RGB PIL image (EXIF orientation applied, first frame of animations)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, Image.Image):
        img = image
    else:
        path = str(image)
        try:
            img = Image.open(path)
            img.load()
        except FileNotFoundError:
            raise Glm45vError(f"image {path}: no such file") from None
        except Image.DecompressionBombError as e:
            raise Glm45vError(f"image {path}: too many pixels ({e})") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise Glm45vError(f"image {path}: cannot be read as an image ({e})") from None
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return background
    if img.mode == "I;16" or img.mode == "I":
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


@dataclass
class EncodedPrompt:
    token_ids: list[int]
    images: list[ImageSpan]
    positions: torch.Tensor
    delta: int


class Processor:
    """Chat template + tokenizer + image preprocessing, all from the checkpoint through transformers."""

    def __init__(self, path: str | Path, cfg: ModelConfig, max_pixels: int | None = None):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.tokenizer = None  # a built-in config has none: requests then come as prompt_token_ids
        if any(Path(path).glob("tokenizer*")):
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError) as e:
                raise Glm45vError(f"{path}: cannot load the tokenizer ({e})") from None
        self.image_processor = _load_image_processor(Path(path), max_pixels) if cfg.is_multimodal else None
        self.merge = cfg.vision.spatial_merge_size if cfg.vision else 1
        self.eos_token_ids = _eos_ids(Path(path), cfg, self.tokenizer)

    def encode(self, request, enable_thinking: bool | None = None) -> EncodedPrompt:
        if isinstance(request, str):
            request = {"messages": [{"role": "user", "content": request}]}
        if not isinstance(request, dict):
            raise Glm45vError(f"request must be a str or a dict, got {type(request).__name__}")
        images = list(request.get("images") or [])
        if self.tokenizer is None and "prompt_token_ids" not in request:
            raise Glm45vError(f"{self.cfg.source}: this model has no tokenizer; pass prompt_token_ids")
        if "messages" in request:
            messages, images = _split_images(request["messages"])
            kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif "prompt" in request:
            ids = self.tokenizer.encode(request["prompt"], add_special_tokens=False)
        elif "prompt_token_ids" in request:
            ids = [int(i) for i in request["prompt_token_ids"]]
        else:
            raise Glm45vError("request dict needs one of 'messages', 'prompt' or 'prompt_token_ids'")
        return self.expand(ids, images)

    def expand(self, ids: list[int], images: list) -> EncodedPrompt:
        """Each single image placeholder becomes that image's token run; positions follow."""
        image_id = self.cfg.image_token_id
        placeholders = [i for i, t in enumerate(ids) if t == image_id]
        if len(placeholders) != len(images):
            raise Glm45vError(f"the prompt has {len(placeholders)} image placeholder(s) but {len(images)} image(s)")
        if images and self.image_processor is None:
            raise Glm45vError(f"{self.cfg.source}: this is a text-only checkpoint; it cannot take images")
        opened = [open_image(im) for im in images]
        pixels, grids = preprocess_images(opened, self.image_processor) if opened else (None, [])
        out, spans, patch = [], [], 0
        prev = 0
        for k, where in enumerate(placeholders):
            out.extend(ids[prev:where])
            n = num_image_tokens(grids[k], self.merge)
            count = grids[k][0] * grids[k][1] * grids[k][2]
            px = pixels[patch : patch + count]
            patch += count
            digest = hashlib.sha256(px.numpy().tobytes() + str(grids[k]).encode()).digest()
            spans.append(ImageSpan(len(out), len(out) + n, digest, px, grids[k]))
            out.extend([image_id] * n)
            prev = where + 1
        out.extend(ids[prev:])
        positions, delta = mrope_positions(out, image_id, grids, self.merge)
        return EncodedPrompt(out, spans, positions, delta)


def _split_images(messages: list) -> tuple[list, list]:
    """OpenAI-style messages -> messages with bare image parts (for the template) and the images in order."""
    images, out = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                if kind in ("image", "image_url"):
                    src = part.get("image") or part.get("path") or part.get("url") or part.get("image_url")
                    if isinstance(src, dict):
                        src = src.get("url")
                    if src is None:
                        raise Glm45vError(f"image part without an image: {part!r}")
                    images.append(src)
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            m = {**m, "content": parts}
        out.append(m)
    return out, images


def image_processor_class():
    """transformers' GLM-4V image processor; the PIL backend needs no torchvision (older releases lack it)."""
    import transformers

    return getattr(transformers, "Glm4vImageProcessorPil", None) or transformers.Glm4vImageProcessor


def _load_image_processor(path: Path, max_pixels: int | None):
    Glm4vImageProcessorPil = image_processor_class()

    file = path / "preprocessor_config.json"
    kwargs = {}
    if file.is_file():
        raw = json.loads(file.read_text())
        size = raw.get("size") or {}
        kwargs = {k: raw[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
                  if k in raw}
        if size:
            kwargs["size"] = dict(size)
    if max_pixels is not None:
        size = kwargs.setdefault("size", {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 15000})
        size["longest_edge"] = min(size.get("longest_edge", max_pixels), max_pixels)
        size["shortest_edge"] = min(size.get("shortest_edge", 0), size["longest_edge"])
    return Glm4vImageProcessorPil(**kwargs)


def _eos_ids(path: Path, cfg: ModelConfig, tokenizer) -> list[int]:
    ids = list(cfg.text.eos_token_ids)
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
