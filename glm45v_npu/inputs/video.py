"""Videos as GLM-4.5V reads them: decoded with PyAV as a stream (only the sampled frames are kept, each resized as
it is decoded), frames sampled, resized, normalised and patched in pairs the way transformers' GLM-4V video
processor does, and each pair of frames presented to the model as one image with its timestamp.

transformers' own video processor needs torchvision (not available here), so this module calls the parts of it
that do not (`sample_frames`, `smart_resize`, `patchify`), reads its defaults, resizes with PIL's bicubic (the
torchvision path uses antialiased bicubic on tensors; the two were not compared) and normalises as its fused
rescale-and-normalise does. GLM-4.6V checkpoints (their own frame-rate rule and timestamp text) are told apart by
the checkpoint's video processor configuration.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import Glm45vError
from .media import check_cancelled, data_uri_bytes

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpeg", ".mpg", ".flv", ".wmv", ".ts"}
MAX_FRAME_PIXELS = 8192 * 8192  # a larger frame is refused, from the header and again at every decoded frame
MAX_FRAMES = 100_000  # frames in one video (the header's count, or counted while decoding where it has none)


@dataclass
class VideoConfig:
    """The checkpoint's video_preprocessor_config.json over transformers' GLM-4V video processor defaults."""

    variant: str = "glm4v"  # or "glm46v"
    fps: float = 2.0
    max_duration: int = 300
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 112 * 112
    max_pixels: int = 28 * 28 * 2 * 30000
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])


def load_video_config(path: Path) -> VideoConfig:
    cfg = VideoConfig()
    file = path / "video_preprocessor_config.json"
    raw: dict[str, Any] = {}
    if file.is_file():
        try:
            raw = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Glm45vError(f"{file}: not valid JSON ({e})") from None
    kind = str(raw.get("video_processor_type") or raw.get("processor_class") or "")
    processor = path / "processor_config.json"
    if not kind and processor.is_file():
        kind = str(json.loads(processor.read_text()).get("processor_class", ""))
    cfg.variant = "glm46v" if "46" in kind else "glm4v"
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor as cls  # noqa: N813

    cfg.fps = float(raw.get("fps", cls.fps))
    cfg.max_duration = int(raw.get("max_duration", cls.max_duration))
    for name in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
        setattr(cfg, name, raw.get(name, getattr(cls, name, getattr(cfg, name))))
    size = raw.get("size") or cls.size
    cfg.min_pixels, cfg.max_pixels = int(size["shortest_edge"]), int(size["longest_edge"])
    return cfg


def _sampler(cfg: VideoConfig):
    """Frame indices for a video's metadata: transformers' GLM-4V sample_frames, bound to this checkpoint's
    settings; for GLM-4.6V our copy of its rule (transformers' GLM-4.6V module cannot load without torchvision)."""
    if cfg.variant == "glm46v":
        return lambda metadata: glm46v_frame_indices(metadata, cfg.temporal_patch_size)
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    owner = SimpleNamespace(fps=cfg.fps, max_duration=cfg.max_duration, temporal_patch_size=cfg.temporal_patch_size)
    return lambda metadata: Glm4vVideoProcessor.sample_frames(owner, metadata)


def glm46v_frame_indices(metadata, temporal_patch_size: int = 2) -> list[int]:
    """GLM-4.6V's rule: a frame rate by duration (3/s up to 30 s, 1/s up to 300 s, else 0.5/s, durations capped at
    2400 s), temporal_patch_size frames per sampled instant, at most 640 frames; walk the frames at that rate,
    fill or thin to the target count evenly, drop repeats, and make the count even."""
    import numpy as np

    total, fps = metadata.total_num_frames, metadata.fps
    duration = metadata.duration or round((total - 1) / fps) + 1
    effective = min(duration, 2400)
    rate = 3 if effective <= 30 else 1 if effective <= 300 else 0.5
    target = min(int(effective * rate * temporal_patch_size), 640)
    if total < target:
        picked = np.linspace(0, total - 1, target, dtype=int).tolist()
    else:
        picked, due, step = [], 0.0, 1 / (temporal_patch_size * rate)
        for i in range(total):
            if i / fps >= due:
                due += step
                picked.append(i)
                if due >= int(duration):
                    break
    if len(picked) < target:
        lo, hi = (picked[0], picked[-1]) if picked else (0, max(total - 1, 0))
        picked = np.linspace(lo, hi, target, dtype=int).tolist()
    elif len(picked) > target:
        picked = np.linspace(0, total - 1, target, dtype=int).tolist()
    unique = list(dict.fromkeys(int(i) for i in picked))
    if len(unique) % 2:
        unique.append(unique[-1])
    return unique


@dataclass
class Video:
    pixels: torch.Tensor  # [grid_t * h * w, C * temporal * patch * patch], transformers' patch order
    grid: tuple[int, int, int]  # (grid_t, h, w) in patches
    timestamps: list[float]  # seconds, one per temporal group (every other sampled frame)
    indices: list[int]  # the sampled frame indices

    def timestamp_text(self, variant: str, k: int) -> str:
        """What follows frame group k's image run in the prompt (transformers' replace_frame_token_id)."""
        t = self.timestamps[k]
        return f"{t:.1f} seconds" if variant == "glm46v" else str(int(t))

    def frames(self) -> list[tuple[torch.Tensor, tuple[int, int, int]]]:
        """Per temporal group: its patches and its grid (1, h, w); the model sees each as one image."""
        t, h, w = self.grid
        return [(self.pixels[k * h * w : (k + 1) * h * w], (1, h, w)) for k in range(t)]


def read_video(source: Any, cfg: VideoConfig, name: str) -> Video:
    """A path, raw bytes or a data: URI -> sampled, resized, normalised and patched frames."""
    import av
    import numpy as np
    from PIL import Image
    from transformers.models.glm4v.video_processing_glm4v import smart_resize
    from transformers.video_utils import VideoMetadata

    stream_source = _open_source(source, name)
    try:
        container = av.open(stream_source)
    except FileNotFoundError:
        raise Glm45vError(f"{name}: no such file") from None
    except Exception as e:  # the demuxer's own error types, or OS errors for this file
        raise Glm45vError(f"{name}: cannot be read as a video ({type(e).__name__}: {e})") from None
    with container:
        if not container.streams.video:
            raise Glm45vError(f"{name}: has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise Glm45vError(f"{name}: its video codec has no decoder here")
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise Glm45vError(f"{name}: the video stream has no frame size")
        if width * height > MAX_FRAME_PIXELS:
            raise Glm45vError(f"{name}: {width}x{height} frames are larger than {MAX_FRAME_PIXELS} pixels")
        fps = float(stream.average_rate or 0) or None
        total = stream.frames or _count_frames(container, name)
        if total > MAX_FRAMES:
            raise Glm45vError(f"{name}: {total} frames, more than {MAX_FRAMES} (the limit)")
        if total < 1 or fps is None:
            raise Glm45vError(f"{name}: no decodable frames (or no frame rate)")
        metadata = VideoMetadata(total_num_frames=int(total), fps=fps, duration=total / fps, video_backend="pyav",
                                 width=width, height=height)
        indices = [int(i) for i in _sampler(cfg)(metadata)]
        try:
            h, w = smart_resize(len(indices), height, width, temporal_factor=cfg.temporal_patch_size,
                                factor=cfg.patch_size * cfg.merge_size, min_pixels=cfg.min_pixels,
                                max_pixels=cfg.max_pixels)
        except ValueError as e:
            raise Glm45vError(f"{name}: the video processor refuses it ({e})") from None
        wanted: dict[int, int] = {}
        for slot, i in enumerate(indices):  # an index may appear twice (the last one, to make the count even)
            wanted.setdefault(i, slot)
        frames: list[np.ndarray | None] = [None] * len(indices)
        try:
            container.seek(0)
            for i, frame in enumerate(container.decode(video=0)):
                check_cancelled(name)
                _check_frame(frame, name, i)  # a stream may change its size mid-way
                if i > indices[-1]:
                    break
                if i in wanted:
                    image = frame.to_image().convert("RGB").resize((w, h), Image.BICUBIC)
                    frames[wanted[i]] = np.asarray(image)
        except Glm45vError:
            raise
        except Exception as e:  # whatever the demuxer or decoder raises for this file is this file's fault
            raise Glm45vError(f"{name}: decoding failed ({type(e).__name__}: {e})") from None
    for slot, i in enumerate(indices):
        if frames[slot] is None:
            first = wanted.get(i)
            frames[slot] = frames[first] if first is not None and frames[first] is not None else None
    decoded = [f for f in frames if f is not None]
    if not decoded:
        raise Glm45vError(f"{name}: no decodable frames")
    while len(decoded) < len(indices):  # frames the container promised but did not deliver: repeat the last
        decoded.append(decoded[-1])
    video = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)[None]  # [1, T, C, H, W] uint8
    pixels, grid = _patches(video, cfg)
    timestamps = [i / fps for i in indices][:: cfg.temporal_patch_size][: grid[0]]
    return Video(pixels, grid, timestamps, indices)


def _patches(video: torch.Tensor, cfg: VideoConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Fused rescale and normalise (as transformers' video processor does it), then its patchify."""
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(1, 1, 3, 1, 1) * 255.0
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(1, 1, 3, 1, 1) * 255.0
    normalised = (video.to(torch.float32) - mean) / std
    patches, t, h, w = Glm4vVideoProcessor.patchify(None, normalised, patch_size=cfg.patch_size,
                                                    merge_size=cfg.merge_size,
                                                    temporal_patch_size=cfg.temporal_patch_size)
    return patches[0], (int(t), int(h), int(w))


def _open_source(source: Any, name: str):
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    if isinstance(source, (str, Path)) and str(source).startswith("data:"):
        return io.BytesIO(data_uri_bytes(str(source), name))
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            raise Glm45vError(f"{name}: is a folder, not a video")
        if not path.exists():
            raise Glm45vError(f"{name}: no such file")
        return str(path)
    raise Glm45vError(f"{name}: expected a path, bytes or a data: URI, got {type(source).__name__}")


def _count_frames(container, name: str) -> int:
    """Containers that do not record a frame count: count by decoding once."""

    count = 0
    try:
        for frame in container.decode(video=0):
            check_cancelled(name)
            _check_frame(frame, name, count)
            count += 1
            if count > MAX_FRAMES:
                raise Glm45vError(f"{name}: more than {MAX_FRAMES} frames (the limit)")
    except Glm45vError:
        raise
    except Exception as e:  # whatever the demuxer or decoder raises for this file is this file's fault
        raise Glm45vError(f"{name}: decoding failed ({type(e).__name__}: {e})") from None
    return count


def _check_frame(frame, name: str, index: int) -> None:
    if frame.width * frame.height > MAX_FRAME_PIXELS:
        raise Glm45vError(f"{name}: frame {index} is {frame.width}x{frame.height}, larger than {MAX_FRAME_PIXELS} "
                          "pixels (the limit; checked on every frame, as a stream may change size)")


def check_video(path: str) -> None:
    """Fail early (before a model loads) on a path that is not a readable video."""
    import av

    name = f"video {path}"
    source = _open_source(path, name)
    try:
        with av.open(source) as container:
            has_video = bool(container.streams.video)
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise Glm45vError(f"{name}: cannot be read as a video ({e})") from None
    if not has_video:
        raise Glm45vError(f"{name}: has no video stream")


def write_test_video(path: str | Path, seconds: float, fps: int = 10, size: tuple[int, int] = (64, 48),
                     seed: int = 0) -> Path:
    """A small video of moving shapes (bench and tests make their inputs with it; nothing is downloaded)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    w, h = size
    color = rng.integers(0, 255, 3, dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(max(1, int(seconds * fps))):
            frame = np.full((h, w, 3), 30, np.uint8)
            x, y = (i * 3) % max(1, w - 8), (i * 2) % max(1, h - 8)
            frame[y : y + 8, x : x + 8] = color
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)
