"""Media sources -> bytes and images, with no policy: a path, raw bytes, a base64 data: URI or a PIL image. What a
caller may open is decided before this (the server's media policy); errors name the image and say why."""

from __future__ import annotations

import base64
import binascii
import contextvars
import io
import threading
import warnings
from pathlib import Path
from typing import Any

from ..errors import Glm45vError

# Set by whoever encodes a request for a client that may leave (the server): long media work checks it between
# frames and stops, so no CPU goes on for a request nobody waits for, and a shutdown is not held up by it.
CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("glm45v_cancel", default=None)


def check_cancelled(name: str) -> None:
    event = CANCEL.get()
    if event is not None and event.is_set():
        raise Glm45vError(f"{name}: not finished, the request was cancelled (its client left or the server stops)")


def describe_media(source: Any, index: int, kind: str = "image") -> str:
    """How errors name an image or a video: its path, or its place in the request."""
    if isinstance(source, (str, Path)) and not str(source).startswith("data:"):
        return f"{kind} {source}"
    return f"{kind} {index + 1} of the request"


def data_uri_bytes(uri: str, name: str) -> bytes:
    """The payload of a base64 data: URI (images and videos alike)."""
    head, _, payload = uri.partition(",")
    if ";base64" not in head:
        raise Glm45vError(f"{name}: only base64 data: URIs are supported")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise Glm45vError(f"{name}: invalid base64 in the data: URI ({e})") from None


def load_decoders() -> None:
    """Import every PIL image plugin now. Otherwise the first image a server sees pays ~50 ms of imports holding
    the GIL, and every stream pauses for them."""
    from PIL import Image

    Image.init()


def open_image(image: Any, name: str | None = None, max_pixels: int | None = None):
    """A PIL image, a path, raw bytes or a data: URI -> RGB PIL image (EXIF orientation applied, first frame of
    animations, transparency over white, 16-bit scaled down). An encoded image over `max_pixels` is refused from
    its header, before any pixel is decoded."""
    from PIL import Image, ImageOps

    name = name or describe_media(image, 0)
    if isinstance(image, Image.Image):
        img = image
    else:
        img = _decode(image, name, max_pixels)
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        img = ImageOps.exif_transpose(img) or img
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            background = Image.new("RGB", img.size, (255, 255, 255))
            rgba = img.convert("RGBA")
            background.paste(rgba, mask=rgba.split()[-1])
            return background
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            img = img.point(lambda v: v / 256).convert("L")
        elif img.mode == "F":
            img = img.convert("L")
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise Glm45vError(f"{name}: cannot be decoded ({e})") from None


def _decode(source: Any, name: str, max_pixels: int | None = None):
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, Path)) and str(source).startswith("data:"):
        source = data_uri_bytes(str(source), name)
    elif isinstance(source, (str, Path)) and str(source).startswith(("http://", "https://")):
        raise Glm45vError(f"{name}: remote images are not fetched here; download it, or use `glm45v serve "
                          "--allow-remote-media`")
    elif not isinstance(source, (str, Path, bytes, bytearray)):
        raise Glm45vError(f"{name}: expected a path, bytes, a data: URI or a PIL image, got {type(source).__name__}")
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with warnings.catch_warnings():  # the size is checked here, against a limit of our own
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(stream)
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise Glm45vError(f"{name}: {width}x{height} is over the {max_pixels:,}-pixel limit for one image "
                              "(a few times what the model sees; scale it down first)")
        img.load()
    except FileNotFoundError:
        raise Glm45vError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise Glm45vError(f"{name}: is a folder, not an image") from None
    except PermissionError:
        raise Glm45vError(f"{name}: permission denied") from None
    except Image.DecompressionBombError as e:
        raise Glm45vError(f"{name}: too many pixels ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise Glm45vError(f"{name}: cannot be read as an image ({e})") from None
    return img
