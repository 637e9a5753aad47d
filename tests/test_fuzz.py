"""Fuzz and soak: odd image files, malformed requests and sampling parameters, and 500 random requests with
aborts and failing steps on a cache small enough to preempt. Each prints its counts."""

import io
import math
import os
import random
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from glm45v_npu import LLM, SamplingParams
from glm45v_npu.errors import FieldError, Glm45vError
from glm45v_npu.inputs.processor import Processor
from tests.tiny import IMAGE_TOKEN, TEXT_TOKENS, make_vl_checkpoint, random_image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz")
    make_vl_checkpoint(path, "gqa2-hd32-half-rope", seed=41)
    return path


def _png_bomb(path: Path, side: int = 100_000) -> None:
    """A tiny PNG whose header claims side x side pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def _image_zoo(d: Path) -> dict[str, Path]:
    """At least 20 kinds of image file, good and bad."""
    rng = random.Random(0)
    base = random_image(64, 48, 1)
    zoo: dict[str, Path] = {}
    for ext in ("png", "jpg", "webp", "gif"):
        (d / f"random.{ext}").write_bytes(bytes(rng.randrange(256) for _ in range(500)))
        zoo[f"random bytes .{ext}"] = d / f"random.{ext}"
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"),
                     ("TIFF", "tiff")):
        full = io.BytesIO()
        base.save(full, fmt)
        data = full.getvalue()
        (d / f"truncated.{ext}").write_bytes(data[: len(data) // 2])
        zoo[f"truncated {fmt}"] = d / f"truncated.{ext}"
    zoo["16-bit PNG"] = _save(Image.fromarray((torch.rand(40, 50) * 65535).to(torch.int32).numpy().astype("uint16")),
                              d / "16bit.png", "PNG")
    zoo["palette PNG"] = _save(base.convert("P"), d / "palette.png", "PNG")
    pal = base.convert("P")
    pal.info["transparency"] = 0
    zoo["palette PNG with transparency"] = _save(pal, d / "palette_t.png", "PNG", transparency=0)
    zoo["RGBA PNG"] = _save(base.convert("RGBA"), d / "rgba.png", "PNG")
    zoo["grayscale+alpha PNG"] = _save(base.convert("LA"), d / "la.png", "PNG")
    zoo["CMYK JPEG"] = _save(base.convert("CMYK"), d / "cmyk.jpg", "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    zoo["EXIF-rotated JPEG"] = _save(base, d / "exif.jpg", "JPEG", exif=exif)
    frames = [random_image(32, 32, i) for i in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    zoo["animated GIF"] = d / "animated.gif"
    frames[0].save(d / "animated.webp", save_all=True, append_images=frames[1:], duration=50)
    zoo["animated WebP"] = d / "animated.webp"
    zoo["1x1"] = _save(Image.new("RGB", (1, 1), (9, 9, 9)), d / "one.png", "PNG")
    zoo["1x10000"] = _save(Image.new("RGB", (1, 10000), (9, 9, 9)), d / "tall.png", "PNG")
    zoo["3x900 (aspect over 200)"] = _save(Image.new("RGB", (3, 900), (9, 9, 9)), d / "thin.png", "PNG")
    zoo["float TIFF"] = _save(Image.fromarray(torch.rand(20, 30).numpy()), d / "float.tiff", "TIFF")
    zoo["decompression bomb"] = d / "bomb.png"
    _png_bomb(zoo["decompression bomb"])
    (d / "folder.png").mkdir()
    zoo["directory named like an image"] = d / "folder.png"
    os.symlink(d / "nowhere.png", d / "dangling.png")
    zoo["unreadable (dangling link)"] = d / "dangling.png"
    (d / "empty.jpg").write_bytes(b"")
    zoo["empty file"] = d / "empty.jpg"
    (d / "text.jpg").write_text("not an image")
    zoo["text named .jpg"] = d / "text.jpg"
    zoo["large 3000x2000 JPEG"] = _save(random_image(3000, 2000, 5), d / "large.jpg", "JPEG")
    return zoo


def test_image_zoo_gives_answers_or_one_line_errors(ckpt, tmp_path, capsys):
    zoo = _image_zoo(tmp_path)
    assert len(zoo) >= 20
    proc = Processor(ckpt, __import__("glm45v_npu.model.hf_config", fromlist=["load_config"]).load_config(ckpt))
    ok, errors = [], []
    for kind, path in zoo.items():
        try:
            enc = proc.encode({"prompt_token_ids": [5, IMAGE_TOKEN, 6], "images": [str(path)]})
            assert enc.images and torch.isfinite(enc.images[0].pixels).all()
            ok.append(kind)
        except Glm45vError as e:
            message = str(e)
            assert "\n" not in message and str(path) in message, (kind, message)
            errors.append(kind)
    expected_errors = {k for k in zoo if k.startswith(("random bytes", "truncated")) or k in {
        "3x900 (aspect over 200)", "decompression bomb", "directory named like an image",
        "unreadable (dangling link)", "empty file", "text named .jpg", "1x10000"}}
    assert set(errors) == expected_errors, set(errors) ^ expected_errors
    with capsys.disabled():
        print(f"\nimage fuzz: {len(zoo)} kinds, {len(ok)} read, {len(errors)} one-line errors")


def test_caption_run_over_the_zoo_writes_one_line_per_file(ckpt, tmp_path):
    import json

    from rich.console import Console

    from glm45v_npu.apps.caption import collect_inputs, run_caption

    _image_zoo(tmp_path)
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.002)
    out = tmp_path / "out.jsonl"
    paths = collect_inputs([str(tmp_path)], recursive=False)
    code = run_caption(llm, paths, out, "describe", SamplingParams(max_tokens=2, temperature=0), 4, False, False,
                       Console(file=io.StringIO()))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and sorted(x["path"] for x in lines) == sorted(paths)
    assert all(("answer" in x) != ("error" in x) for x in lines)
    assert llm.stats().requests == 0


def _random_value(rng: random.Random):
    return rng.choice([-1, 0, 1, 2**40, -(2**40), 0.5, -0.5, float("nan"), float("inf"), 1e30, "3", None, True,
                       [], {}, [1, 2], "text", b"x"])


SAMPLING_FIELDS = ["n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos",
                   "min_tokens", "logprobs", "skip_special_tokens", "include_stop_str_in_output", "output_kind"]


def test_sampling_params_fuzz_names_the_field(capsys):
    rng = random.Random(1)
    accepted = rejected = 0
    for _ in range(600):
        name = rng.choice(SAMPLING_FIELDS)
        value = _random_value(rng)
        try:
            SamplingParams(**{name: value})
            accepted += 1
        except FieldError as e:
            assert e.field == name and name in str(e)
            rejected += 1
    assert accepted and rejected > 300
    with capsys.disabled():
        print(f"\nsampling fuzz: 600 cases, {accepted} accepted, {rejected} rejected naming the field")


def _random_content(rng: random.Random, image: Image.Image):
    kind = rng.randrange(8)
    if kind == 0:
        return "hello"
    if kind == 1:
        return None
    if kind == 2:
        return 42
    parts = []
    for _ in range(rng.randrange(4)):
        parts.append(rng.choice([
            {"type": "text", "text": "hi"}, {"type": "text", "text": 7}, {"type": "image", "image": image},
            {"type": "image"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}},
            {"type": "audio", "audio": "x"}, "just a string", {"text": "no type"}, {"type": "image_url"},
            {"type": "image", "image": "/no/such/file.png"}, {"type": "image", "image": 12},
        ]))
    return parts


def test_request_fuzz_gives_validation_errors_only(ckpt, capsys):
    from glm45v_npu.model.hf_config import load_config

    proc = Processor(ckpt, load_config(ckpt))
    rng = random.Random(2)
    image = random_image(30, 30, 0)
    ok = bad = 0
    for _ in range(400):
        shape = rng.randrange(6)
        if shape == 0:
            request = {"messages": [{"role": rng.choice(["user", "assistant", "system", "robot", None, 3]),
                                     "content": _random_content(rng, image)} for _ in range(rng.randrange(0, 3))]}
        elif shape == 1:
            request = {rng.choice(["prompt", "prompt_token_ids", "messages", "promt"]): _random_value(rng)}
        elif shape == 2:
            request = {"prompt_token_ids": [rng.randrange(-5, 400) for _ in range(rng.randrange(0, 5))],
                       "images": rng.choice([[], [image], "x", None, [image, image]])}
        elif shape == 3:
            request = {"prompt": "a", "multi_modal_data": rng.choice([{"image": image}, {"video": 1}, [], None])}
        elif shape == 4:
            request = rng.choice([None, 3, ["a"], b"x", {"messages": "hi"}, {}])
        else:
            request = {"prompt": "a", "prompt_token_ids": [1]}
        try:
            proc.encode(request)
            ok += 1
        except Glm45vError as e:
            assert "\n" not in str(e)
            bad += 1
    assert ok and bad > 250
    with capsys.disabled():
        print(f"\nrequest fuzz: 400 requests, {ok} encoded, {bad} rejected with a validation error")


@pytest.mark.slow
def test_soak_500_requests_with_aborts_and_failing_steps(ckpt, monkeypatch, capsys):
    """500 random requests (text, 1-3 images, stop strings, seeded sampling) on a cache that forces preemption,
    with aborts at random moments and a few injected step failures: every block ends free, every structure empty,
    and each request that was not aborted equals its result in a run with no aborts and no failures."""
    rng = random.Random(3)
    requests, params = [], []
    for i in range(500):
        ids = [rng.randrange(3, TEXT_TOKENS) for _ in range(rng.randrange(1, 24))]
        images = []
        for _ in range(rng.choice([0, 0, 0, 1, 2, 3])):
            ids.insert(rng.randrange(len(ids) + 1), IMAGE_TOKEN)
            images.append(random_image(rng.randrange(20, 60), rng.randrange(20, 60), i * 7 + len(images)))
        requests.append({"prompt_token_ids": ids, "images": images})
        params.append(SamplingParams(max_tokens=rng.randrange(1, 14), temperature=rng.choice([0, 0, 0.8]), seed=i,
                                     stop=[rng.choice(["a", "e", "\n"])] if rng.random() < 0.3 else [],
                                     ignore_eos=rng.random() < 0.5, logprobs=0))

    def run(chaos: bool):
        llm = LLM(ckpt, block_size=4, kv_cache_gib=0.0002, max_num_seqs=12, max_num_batched_tokens=48)
        engine = llm.engine
        real = engine.runner.execute
        failures = {"n": 0}
        if chaos:
            def flaky(inputs):
                if inputs.token_ids and rng.random() < 0.01:
                    failures["n"] += 1
                    raise RuntimeError("injected step failure")
                return real(inputs)

            monkeypatch.setattr(engine.runner, "execute", flaky)
        pending = list(range(len(requests)))
        ids, finals, aborted = {}, {}, set()
        while pending or llm.has_unfinished():
            for _ in range(rng.randrange(0, 6) if chaos else 8):
                if pending:
                    i = pending.pop(0)
                    ids[llm.add_request(requests[i], params[i])] = i
            try:
                outs = llm.step()
            except RuntimeError:
                continue
            for o in outs:
                if o.finished:
                    finals[ids[o.request_id]] = o.outputs[0]
            if chaos and rng.random() < 0.08:
                live = [r for r, i in ids.items() if i not in finals]
                if live:
                    victim = rng.choice(live)
                    aborted.add(ids[victim])
                    llm.abort(victim)
        stats = llm.stats()
        assert stats.free_blocks == stats.num_blocks and stats.requests == 0 and stats.running == stats.waiting == 0
        assert all(r == 0 for r in engine.blocks.ref)
        assert engine.runner.image_embeds == {} and not engine.runner.encoded and not engine.runner.pending_drops
        return finals, aborted, stats.preemptions, failures["n"]

    calm, _, _, _ = run(chaos=False)
    chaos, aborted, preemptions, failures = run(chaos=True)
    assert len(calm) == len(chaos) == 500 and preemptions > 0 and failures > 0 and aborted
    compared = 0
    for i, c in chaos.items():
        if i in aborted:
            # cut short or finished before the abort arrived: either way what it produced is the calm run's start
            assert c.token_ids == calm[i].token_ids[: len(c.token_ids)]
            assert c.finish_reason in ("abort", calm[i].finish_reason)
            continue
        assert c.token_ids == calm[i].token_ids and c.text == calm[i].text and c.finish_reason == calm[i].finish_reason
        lp = [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]
        want = [d[t].logprob for d, t in zip(calm[i].logprobs, calm[i].token_ids)]
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(lp, want))
        compared += 1
    with capsys.disabled():
        print(f"\nsoak: 500 requests, {len(aborted)} aborted, {failures} injected step failures, {preemptions} "
              f"preemptions, {compared} compared equal to the calm run")
