"""M-RoPE positions of a prompt: text advances the three rows (t, h, w) together, an image run spreads over its
merged grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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


def num_image_tokens(grid: Sequence[int], merge: int) -> int:
    t, h, w = grid
    return t * h * w // (merge * merge)
