"""Prompt-side preprocessing: requests -> token ids, pixel patches and grids, M-RoPE positions and decode delta.

A request is a str (a raw prompt, as vLLM's generate takes it) or a dict with exactly one of `prompt`,
`prompt_token_ids` or `messages`, and optionally `images` / `videos` or vLLM's `multi_modal_data` ({"image": ...,
"video": ...}). In messages, images and videos are content parts (inputs/messages.py).
Every mistake in it is a Glm45vError that names the field, message, part or image at fault.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..errors import Glm45vError
from ..model.hf_config import ModelConfig, read_json_object
from .chat_template import control_pattern, render
from .media import describe_media, load_decoders, open_image
from .messages import REQUEST_KEYS, request_media, split_media
from .mrope import mrope_positions, num_image_tokens

SOURCE_PIXELS_FACTOR = 4  # an image may have 4x the pixels the model sees (it is scaled down),
SOURCE_PIXELS_FLOOR = 32 * 10**6  # and 32 Mpx in any case (a camera photo); beyond, it is refused from its header
REQUEST_PIXELS_FACTOR = 8  # one request may carry 8 such images' worth


@dataclass
class ImageSpan:
    """An image's run of placeholder tokens [start, end) in the prompt, its content hash and model inputs."""

    start: int
    end: int
    digest: bytes
    pixels: torch.Tensor
    grid: tuple[int, int, int]


def preprocess_images(images: Sequence, image_processor, names: Sequence[str] | None = None,
                      ) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """PIL images -> pixel patches [N, 1176] (merge-window order) and grid (t, h, w) per image, through the
    checkpoint's own transformers image processor, so resizing and normalisation match the reference. Each image
    goes through on its own, so an image the processor refuses (aspect ratio over 200, ...) is named."""
    if not images:
        return torch.zeros(0), []
    pixels, grids = [], []
    for k, image in enumerate(images):
        try:
            out = image_processor(images=[image], return_tensors="pt")
        except (ValueError, OSError, TypeError) as e:
            name = names[k] if names else f"image {k + 1}"
            raise Glm45vError(f"{name}: the image processor refuses it ({e})") from None
        pixels.append(out["pixel_values"])
        grids += [tuple(int(v) for v in g) for g in out["image_grid_thw"].tolist()]
    return torch.cat(pixels), grids


@dataclass
class EncodedPrompt:
    token_ids: list[int]
    images: list[ImageSpan]
    positions: torch.Tensor
    delta: int
    prompt: str | None = None  # the text the ids came from, when there was one
    grammar: Any = None  # the engine's compiled structured-output grammar, when the request has one
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) as the user sees each


class Processor:
    """Chat template + tokenizer + image preprocessing, all from the checkpoint through transformers."""

    def __init__(self, path: str | Path, cfg: ModelConfig, max_pixels: int | None = None,
                 limits: dict[str, int] | None = None, image_kwargs: dict[str, Any] | None = None):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.tokenizer = None  # a built-in config has none: requests then come as prompt_token_ids
        if any(Path(path).glob("tokenizer*")):
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError) as e:
                raise Glm45vError(f"{path}: cannot load the tokenizer ({e})") from None
        self.image_processor, self.budget_pixels = (_load_image_processor(Path(path), max_pixels, image_kwargs or {})
                                                    if cfg.is_multimodal else (None, 0))
        self.max_images = (limits or {}).get("image")
        self.max_videos = (limits or {}).get("video")
        self.video_cfg = None
        if cfg.is_multimodal:
            from .video import load_video_config

            self.video_cfg = load_video_config(Path(path))
        self.merge = cfg.vision.spatial_merge_size if cfg.vision else 1
        self.eos_token_ids = checkpoint_eos_ids(Path(path), cfg, self.tokenizer)
        self.control = control_pattern(self.tokenizer) if self.tokenizer is not None else None

    @property
    def max_source_pixels(self) -> int:
        """The largest image taken at all: a few times the checkpoint's pixel budget (an image is resized down to
        it) and at least 32 Mpx, refused from its header beyond; --max-pixels lowers what the model sees, not what
        it may be given."""
        return max(SOURCE_PIXELS_FACTOR * self.budget_pixels, SOURCE_PIXELS_FLOOR)

    @property
    def max_request_pixels(self) -> int:
        return REQUEST_PIXELS_FACTOR * self.max_source_pixels

    @property
    def max_image_patches(self) -> int:
        """Patches of the largest image the image processor produces (its pixel budget over the patch area)."""
        if self.image_processor is None:
            return 0
        return int(self.image_processor.size.longest_edge) // self.image_processor.patch_size**2

    @cached_property
    def max_token_bytes(self) -> int:
        """The most text one token stands for (UTF-8 bytes of the longest vocabulary entry, added tokens aside:
        a client's text never becomes one): a text of B bytes is at least B / this many tokens."""
        if self.tokenizer is None:
            return 1
        added = set(self.tokenizer.get_added_vocab())
        return max((len(t.encode("utf-8", "replace")) for t in self.tokenizer.get_vocab() if t not in added),
                   default=1)

    def warm(self) -> None:
        """Import the image decoders and compile the chat template now: a server's first chat otherwise pays for
        both (about 70 ms holding the GIL) while other requests stream."""
        load_decoders()
        if self.tokenizer is not None:
            self.max_token_bytes  # noqa: B018  the vocabulary scan, once, before any request waits on it
            try:
                self.encode({"messages": [{"role": "user", "content": "hi"}]})
            except Glm45vError:  # no chat template: prompts only, nothing to compile
                pass

    def encode(self, request: str | dict, enable_thinking: bool | None = None) -> EncodedPrompt:
        if isinstance(request, str):
            request = {"prompt": request}
        if not isinstance(request, dict):
            raise Glm45vError(f"a request must be a str or a dict, got {type(request).__name__}")
        unknown = sorted(set(request) - REQUEST_KEYS)
        if unknown:
            raise Glm45vError(f"request: unknown key(s) {', '.join(map(repr, unknown))}; expected one of "
                              "'prompt', 'prompt_token_ids' or 'messages', with 'images' or 'multi_modal_data'")
        forms = [k for k in ("prompt", "prompt_token_ids", "messages") if k in request]
        if len(forms) != 1:
            raise Glm45vError("request: needs exactly one of 'prompt', 'prompt_token_ids' or 'messages'"
                              + (f", got {' and '.join(forms)}" if forms else ""))
        images, videos = request_media(request)
        form = forms[0]
        if form != "prompt_token_ids" and self.tokenizer is None:
            raise Glm45vError(f"{self.cfg.source}: this model has no tokenizer; pass prompt_token_ids")
        text = None
        if form == "messages":
            if images or videos:
                raise Glm45vError("request: with 'messages', put images and videos in the messages' content parts")
            messages, images, videos = split_media(request["messages"])
            kwargs = dict(request.get("chat_template_kwargs") or {})
            if enable_thinking is not None:
                kwargs["enable_thinking"] = enable_thinking
            if request.get("tools"):
                kwargs["tools"] = request["tools"]
            try:
                ids, text = render(self.tokenizer, self.control, messages, **kwargs)
            except Exception as e:  # jinja raises its own types for a message the template cannot render
                raise Glm45vError(f"messages: the chat template cannot render them ({type(e).__name__}: {e})") from None
        elif form == "prompt":
            text = request["prompt"]
            if not isinstance(text, str):
                raise Glm45vError(f"request: 'prompt' must be a string, got {type(text).__name__}")
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = request["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                             for i in ids):
                raise Glm45vError("request: 'prompt_token_ids' must be a list of integers")
            vocab = self.cfg.text.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise Glm45vError(f"request: prompt_token_ids holds {bad[0]}, outside the vocabulary (0..{vocab - 1})")
            ids = list(ids)
        if not ids:
            raise Glm45vError("request: the prompt is empty")
        enc = self.expand(ids, images, videos)
        enc.prompt = text
        return enc

    def expand(self, ids: list[int], images: list, videos: list = ()) -> EncodedPrompt:
        """Each single image placeholder becomes that image's token run; each video placeholder becomes, per
        pair of sampled frames, an image run and its timestamp text. Positions follow."""
        image_id, video_id = self.cfg.image_token_id, self.cfg.video_token_id
        image_at = [i for i, t in enumerate(ids) if t == image_id]
        video_at = [i for i, t in enumerate(ids) if t == video_id] if video_id is not None else []
        if len(image_at) != len(images):
            raise Glm45vError(f"the prompt has {len(image_at)} image placeholder(s) but {len(images)} image(s)")
        if len(video_at) != len(videos):
            raise Glm45vError(f"the prompt has {len(video_at)} video placeholder(s) but {len(videos)} video(s)")
        if (images or videos) and self.image_processor is None:
            raise Glm45vError(f"{self.cfg.source}: this is a text-only checkpoint; it cannot take images or videos")
        if self.max_images is not None and len(images) > self.max_images:
            raise Glm45vError(f"the request has {len(images)} images; limit_mm_per_prompt allows {self.max_images}")
        if self.max_videos is not None and len(videos) > self.max_videos:
            raise Glm45vError(f"the request has {len(videos)} videos; limit_mm_per_prompt allows {self.max_videos}")
        if videos and self.tokenizer is None:
            raise Glm45vError(f"{self.cfg.source}: videos need the checkpoint's tokenizer (for frame timestamps)")
        image_parts, sizes, budget = [], [], self.max_request_pixels
        for k, source in enumerate(images):  # one at a time: one decoded image in memory at once
            name = describe_media(source, k)
            image = open_image(source, name, self.max_source_pixels)
            budget -= image.width * image.height
            sizes.append(image.size)
            if budget < 0:
                raise Glm45vError(f"{name}: the request's images are over {self.max_request_pixels:,} pixels in all")
            pixels, grids = preprocess_images([image], self.image_processor, [name])
            image_parts.append((pixels, grids[0]))
        read = [self._video(v, k) for k, v in enumerate(videos)]
        out, spans, all_grids, prev = [], [], [], 0
        pending_images, pending_videos = iter(image_parts), iter(read)

        def run(px: torch.Tensor, grid: tuple[int, int, int]) -> None:
            n = num_image_tokens(grid, self.merge)
            digest = hashlib.sha256(px.numpy().tobytes() + str(grid).encode()).digest()
            spans.append(ImageSpan(len(out), len(out) + n, digest, px, grid))
            all_grids.append(grid)
            out.extend([image_id] * n)

        for where in sorted(image_at + video_at):
            out.extend(ids[prev:where])
            if ids[where] == image_id:
                run(*next(pending_images))
            else:
                video = next(pending_videos)
                for k, (px, grid) in enumerate(video.frames()):
                    out.append(self.cfg.image_start_token_id)
                    run(px, grid)
                    out.append(self.cfg.image_end_token_id)
                    out.extend(self.tokenizer.encode(video.timestamp_text(self.video_cfg.variant, k),
                                                     add_special_tokens=False))
            prev = where + 1
        out.extend(ids[prev:])
        positions, delta = mrope_positions(out, image_id, all_grids, self.merge)
        return EncodedPrompt(out, spans, positions, delta, image_sizes=sizes)

    def _video(self, source, index: int):
        from .video import read_video

        return read_video(source, self.video_cfg, describe_media(source, index, "video"))


def image_processor_class():
    """transformers' GLM-4V image processor; the PIL backend needs no torchvision (older releases lack it)."""
    import transformers

    return getattr(transformers, "Glm4vImageProcessorPil", None) or transformers.Glm4vImageProcessor


def _load_image_processor(path: Path, max_pixels: int | None, extra: dict[str, Any]):
    """-> (the image processor with the user's budget applied, the larger of its budget and the checkpoint's)."""
    cls = image_processor_class()
    file = path / "preprocessor_config.json"
    kwargs: dict[str, Any] = {}
    if file.is_file():
        raw = read_json_object(file)
        size = raw.get("size") or {}
        kwargs = {k: raw[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
                  if k in raw}
        if size:
            kwargs["size"] = dict(size)
    size = kwargs.setdefault("size", dict(cls.size))
    checkpoint_pixels = int(size.get("longest_edge") or cls.size["longest_edge"])
    for ours, theirs in (("max_pixels", "longest_edge"), ("min_pixels", "shortest_edge")):
        if ours in extra:
            size[theirs] = int(extra[ours])
    if max_pixels is not None:
        size["longest_edge"] = min(size.get("longest_edge", max_pixels), max_pixels)
    size["shortest_edge"] = min(size.get("shortest_edge", 0), size["longest_edge"])
    try:
        processor = cls(**kwargs, **{k: v for k, v in extra.items() if k not in ("max_pixels", "min_pixels")})
        return processor, max(checkpoint_pixels, int(processor.size.longest_edge))
    except (TypeError, ValueError, KeyError) as e:
        raise Glm45vError(f"mm_processor_kwargs {extra!r}: the image processor refuses them ({e})") from None


GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_config(path: Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json ({} when it has none)."""
    file = path / "generation_config.json"
    return read_json_object(file) if file.is_file() else {}


def generation_defaults(path: Path) -> dict[str, Any]:
    """Sampling defaults from the checkpoint's generation_config.json, under SamplingParams' names."""
    raw = generation_config(path)
    return {ours: raw[theirs] for theirs, ours in GENERATION_DEFAULTS.items() if raw.get(theirs) is not None}


def checkpoint_eos_ids(path: Path, cfg: ModelConfig, tokenizer) -> list[int]:
    """Every id that ends an answer: config.json's eos ids, generation_config.json's, else the tokenizer's."""
    ids = list(cfg.text.eos_token_ids)
    eos = generation_config(path).get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        raise Glm45vError(f"{path / 'generation_config.json'}: eos_token_id must be an integer or a list of them, "
                          f"got {eos!r}")
    ids += eos
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
