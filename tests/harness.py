"""Drive our model directly (no engine): allocate a paged cache, build contexts, prefill and decode."""

from __future__ import annotations

import torch

from glm45v_npu.engine.runner import ModelRunner, StepInputs
from glm45v_npu.inputs.mrope import mrope_positions, num_image_tokens
from glm45v_npu.inputs.processor import preprocess_images
from tests.tiny import IMAGE_END, IMAGE_START, IMAGE_TOKEN, TEXT_TOKENS, image_processor


def build_prompt(text_lens: list[int], grids: list[tuple[int, int, int]], seed: int, merge: int = 2) -> list[int]:
    """text, then per image <begin><image>*n<end> followed by more text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TEXT_TOKENS, (text_lens[0],), generator=g).tolist()
    for grid, n in zip(grids, text_lens[1:]):
        ids += [IMAGE_START] + [IMAGE_TOKEN] * num_image_tokens(grid, merge) + [IMAGE_END]
        ids += torch.randint(3, TEXT_TOKENS, (n,), generator=g).tolist()
    return ids


class PagedRunner:
    """One sequence at a time through our model via the engine's ModelRunner, with blocks handed out in a
    shuffled order."""

    def __init__(self, model, block_size: int = 4, num_blocks: int = 256):
        self.model, self.block_size = model, block_size
        dtype = next(model.language_model.parameters()).dtype
        self.runner = ModelRunner(model, num_blocks, block_size, torch.device("cpu"), dtype)
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()

    def blocks_for(self, table: list[int], length: int) -> list[int]:
        while len(table) * self.block_size < length:
            table.append(self.free.pop())
        return table

    def prefill(self, ids: list[int], images=(), chunks: list[int] | None = None, patches=None):
        """Returns logits for every prompt token [T, V], and the state to continue decoding. `patches`:
        (pixel patches, grids) given directly instead of PIL images."""
        m = self.model
        merge = m.cfg.vision.spatial_merge_size if m.cfg.vision else 2
        pixels, grids = patches or preprocess_images(list(images), image_processor())
        positions, delta = mrope_positions(ids, m.cfg.image_token_id, grids, merge)
        encode = [(0, list(pixels.split([t * h * w for t, h, w in grids])), grids)] if grids else []
        image_index = torch.cumsum(torch.tensor([t == m.cfg.image_token_id for t in ids]), 0) - 1  # embeds row
        table: list[int] = []
        out, done = [], 0
        for n in chunks or [len(ids)]:
            self.blocks_for(table, done + n)
            rows = [(0, int(image_index[i]), i - done, 1) for i in range(done, done + n)
                    if ids[i] == m.cfg.image_token_id]
            inputs = StepInputs(ids[done : done + n], positions[:, done : done + n], [n], [done + n], [list(table)],
                                list(range(n)), encode=encode, image_rows=rows)
            out.append(self.runner.execute(inputs))
            encode = []
            done += n
        return torch.cat(out), {"table": table, "len": len(ids), "delta": delta}

    def decode(self, states: list[dict], tokens: list[int]) -> torch.Tensor:
        """One token for each sequence in one batched step; returns logits [B, V]."""
        for s in states:
            self.blocks_for(s["table"], s["len"] + 1)
        pos = torch.tensor([s["len"] + s["delta"] for s in states]).expand(3, -1)
        inputs = StepInputs(list(tokens), pos, [1] * len(states), [s["len"] + 1 for s in states],
                            [list(s["table"]) for s in states], list(range(len(states))))
        logits = self.runner.execute(inputs)
        for s in states:
            s["len"] += 1
        return logits


def reference_logits(ref, ids: list[int], images=()) -> torch.Tensor:
    """transformers' logits for the whole sequence [T, V]."""
    kwargs = {}
    if images:
        px = image_processor()(images=list(images), return_tensors="pt")
        kwargs = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"],
                      mm_token_type_ids=(torch.tensor([ids]) == IMAGE_TOKEN).int())
    elif hasattr(ref, "model") and hasattr(ref.model, "visual"):
        kwargs = dict(mm_token_type_ids=torch.zeros(1, len(ids), dtype=torch.int))
    with torch.inference_mode():
        return ref(input_ids=torch.tensor([ids]), **kwargs).logits[0].float()


def spy_on_reads(monkeypatch, on_read) -> None:
    """Route the loader's safetensors reads through `on_read(name, read) -> tensor`."""
    from glm45v_npu.model import loader

    real_open = loader.safe_open

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            return on_read(name, lambda: self.f.get_tensor(name))

        def get_slice(self, name):
            return on_read(name, lambda: self.f.get_slice(name))

    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: Spy(real_open(*a, **k)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())
