"""Grounding boxes drawn on the image they refer to (chat --draw, /draw, caption --draw): an outline and its
index label per box, a ring and a cross per point, sized to the image so they read at any size."""

from __future__ import annotations

from pathlib import Path

from ..engine.answer import Box
from ..errors import Glm45vError
from ..inputs.media import open_image

COLORS = [(255, 48, 48), (40, 200, 255), (255, 200, 0), (80, 230, 80), (255, 80, 220), (255, 140, 0)]


def draw_boxes(image, boxes: list[Box], out: str | Path) -> Path:
    """Writes `image` (a path or a PIL image; EXIF orientation applied, as the coordinates assume) with `boxes`
    drawn to `out` (format from its suffix). Each box's outline lies inside its pixel rectangle."""
    from PIL import ImageDraw, ImageFont

    img = open_image(image).copy()
    w, h = img.size
    line = max(2, round(min(w, h) / 200))
    font = ImageFont.load_default(size=max(12, round(min(w, h) / 30)))
    draw = ImageDraw.Draw(img)
    for k, box in enumerate(boxes):
        color = COLORS[k % len(COLORS)]
        px = box.pixels or tuple(round(f * (w if i % 2 == 0 else h)) for i, f in enumerate(box.norm))
        if box.kind == "box":
            x1, y1, x2, y2 = px
            x2, y2 = max(x1, min(x2, w) - 1), max(y1, min(y2, h) - 1)
            draw.rectangle([x1, y1, x2, y2], outline=color, width=line)
            anchor = (x1, y1)
        else:
            x, y = min(px[0], w - 1), min(px[1], h - 1)
            r = 3 * line
            draw.ellipse([x - r, y - r, x + r, y + r], outline=color, width=line)
            draw.line([x - 2 * r, y, x + 2 * r, y], fill=color, width=max(1, line // 2))
            draw.line([x, y - 2 * r, x, y + 2 * r], fill=color, width=max(1, line // 2))
            anchor = (x + r, y + r)
        _label(draw, str(k + 1), anchor, color, font, (w, h))
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out)
    except (OSError, ValueError, KeyError) as e:
        raise Glm45vError(f"--draw {out}: cannot write the image ({e})") from None
    return out


def _label(draw, text: str, at: tuple[int, int], color, font, size: tuple[int, int]) -> None:
    """The index on a filled tab above the box's corner (inside it when there is no room above)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 6, bottom - top + 6
    x = min(max(0, at[0]), max(0, size[0] - tw))
    y = at[1] - th if at[1] >= th else at[1]
    y = min(y, max(0, size[1] - th))
    draw.rectangle([x, y, x + tw, y + th], fill=color)
    draw.text((x + 3 - left, y + 3 - top), text, fill=(0, 0, 0), font=font)
