"""Prompt side: chat template and ids against transformers' Glm4vProcessor; image modes; answer parsing."""

import io

import pytest
import torch
from PIL import Image

from glm45v_npu.engine.answer import StreamSplitter, parse_answer
from glm45v_npu.errors import Glm45vError
from glm45v_npu.inputs.media import open_image
from glm45v_npu.inputs.processor import Processor
from glm45v_npu.model.hf_config import load_config
from glm45v_npu.testing.tiny_random import write_vl_checkpoint
from tests.tiny import random_image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("proc")
    write_vl_checkpoint(path)
    return path


def _hf_processor(path, monkeypatch):
    """transformers' processor built from the checkpoint folder alone (nothing of ours): the PIL GLM-4V image
    processor and AutoTokenizer. AutoProcessor and AutoImageProcessor need torchvision (the video processor, the
    fast image processor), which images do not use."""
    from transformers import AutoTokenizer, Glm4vImageProcessorPil, Glm4vProcessor

    check = Glm4vProcessor.check_argument_for_proper_class
    monkeypatch.setattr(Glm4vProcessor, "check_argument_for_proper_class",
                        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))
    tok = AutoTokenizer.from_pretrained(path)
    return Glm4vProcessor(image_processor=Glm4vImageProcessorPil.from_pretrained(path), tokenizer=tok,
                          video_processor=None, chat_template=tok.chat_template)


def _conversation():
    a, b = random_image(90, 60, 1), random_image(30, 120, 2)
    return [
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": [{"type": "text", "text": "and this?"}, {"type": "image", "image": b}]},
    ], [a, b]


@pytest.mark.parametrize("thinking", [None, False])
def test_two_turn_prompt_with_images_matches_transformers(ckpt, thinking, monkeypatch):
    messages, images = _conversation()
    ours = Processor(ckpt, load_config(ckpt))
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    hf = _hf_processor(ckpt, monkeypatch)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert text.startswith("[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>what is this?")
    assert text.endswith("<|assistant|>\n<think></think>\n" if thinking is False else "<|assistant|>\n")
    expected = hf(text=[text], images=images, return_tensors="pt")
    enc = ours.encode({"messages": messages}, enable_thinking=thinking)
    assert enc.token_ids == expected["input_ids"][0].tolist()
    assert torch.equal(torch.cat([s.pixels for s in enc.images]), expected["pixel_values"])
    assert [s.grid for s in enc.images] == [tuple(g) for g in expected["image_grid_thw"].tolist()]


def test_request_forms_agree(ckpt):
    ours = Processor(ckpt, load_config(ckpt))
    img = random_image(64, 64, 3)
    chat = ours.encode({"messages": [{"role": "user", "content": [{"type": "image", "image": img},
                                                                  {"type": "text", "text": "hi"}]}]})
    text = ours.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], tokenize=False,
        add_generation_prompt=True)
    raw = ours.encode({"prompt": text, "images": [img]})
    ids = ours.encode({"prompt_token_ids": ours.tokenizer.encode(text, add_special_tokens=False), "images": [img]})
    assert chat.token_ids == raw.token_ids == ids.token_ids
    # a bare string is one raw prompt, as vLLM's generate takes it (the chat template is for messages)
    assert ours.encode("hi").token_ids == ours.encode({"prompt": "hi"}).token_ids == ours.tokenizer.encode("hi")
    mm = ours.encode({"prompt": text, "multi_modal_data": {"image": img}})
    assert mm.token_ids == raw.token_ids and torch.equal(mm.images[0].pixels, raw.images[0].pixels)
    with pytest.raises(Glm45vError, match="1 image placeholder"):
        ours.encode({"prompt": text, "images": []})


def _encoded(img: Image.Image, fmt: str, **kwargs) -> io.BytesIO:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    buf.seek(0)
    return buf


def test_image_modes_become_rgb(tmp_path):
    base = random_image(40, 20, 0)
    cases = {
        "rgba.png": base.convert("RGBA"),
        "palette.png": base.convert("P"),
        "gray.png": base.convert("L"),
        "cmyk.jpg": base.convert("CMYK"),
        "sixteen.png": base.convert("I;16"),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = open_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (40, 20), name
    frames = [random_image(30, 30, i) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert open_image(tmp_path / "anim.gif").size == (30, 30)


def test_exif_orientation_is_applied(tmp_path):
    img = random_image(40, 20, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert open_image(tmp_path / "rot.jpg").size == (20, 40)


def test_bad_images_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(Glm45vError, match="bad.png: cannot be read"):
        open_image(tmp_path / "bad.png")
    with pytest.raises(Glm45vError, match="gone.png: no such file"):
        open_image(tmp_path / "gone.png")


def test_parse_answer_unwraps_think_and_box():
    p = parse_answer("<think>look at it</think>It is <|begin_of_box|>[10,20,30,40]<|end_of_box|>.")
    assert (p.reasoning, p.answer) == ("look at it", "It is [10,20,30,40].")
    assert parse_answer("pre-filled think</think> B").reasoning == "pre-filled think"
    assert parse_answer("plain").answer == "plain" and parse_answer("plain").reasoning == ""


def test_stream_splitter_holds_split_markers():
    s = StreamSplitter()
    pieces = []
    for chunk in ["<thi", "nk>r1", "</th", "ink>a<|begin_of", "_box|>B<|end_of_box|>", "!"]:
        pieces += s.feed(chunk)
    pieces += s.flush()
    joined = {}
    for kind, text in pieces:
        joined[kind] = joined.get(kind, "") + text
    assert joined == {"reasoning": "r1", "answer": "a!", "box": "B"}
