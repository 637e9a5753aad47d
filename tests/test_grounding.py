"""Grounding as data: the parser (engine/answer.parse_boxes), boxes on CompletionOutput, in the HTTP API (the
message and the last streamed chunk), drawn by the CLI (chat --draw, /draw, caption --draw), all in the pixels of
the image as the user sees it (EXIF orientation applied, before any resize)."""

import json

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from glm45v_npu import LLM, SamplingParams
from glm45v_npu.engine.answer import parse_boxes
from tests.serving import Server, data_uri, script
from tests.tiny import make_vl_checkpoint, random_image

OPEN, CLOSE = "<|begin_of_box|>", "<|end_of_box|>"


def norms(text, sizes=None):
    return [(b.kind, b.norm) for b in parse_boxes(text, sizes)]


def test_every_bracket_style_and_several_boxes():
    want = [("box", (0.1, 0.2, 0.3, 0.4))]
    for inner in ("[100,200,300,400]", "[[100,200,300,400]]", "(100,200,300,400)", "<100,200,300,400>",
                  "[[ 100 , 200, 300 ,400 ]]", "((100,200,300,400))", "[\n100,\n200,300,400]"):
        assert norms(f"A {OPEN}{inner}{CLOSE}.") == want, inner
    two = parse_boxes(f"x {OPEN}[[100,200,300,400],[500,600,700,800]]{CLOSE} y {OPEN}(0,0,1000,1000){CLOSE}")
    assert [b.norm for b in two] == [(0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8), (0.0, 0.0, 1.0, 1.0)]


def test_points_clamping_and_corner_order():
    assert norms(f"{OPEN}[500,250]{CLOSE}") == [("point", (0.5, 0.25))]
    assert norms(f"{OPEN}[[-20,300,1200,1001]]{CLOSE}") == [("box", (0.0, 0.3, 1.0, 1.0))]
    assert norms(f"{OPEN}[[800,900,100,200]]{CLOSE}") == [("box", (0.1, 0.2, 0.8, 0.9))]  # corners swapped


def test_reasoning_boxes_are_ignored_and_spans_point_at_the_text():
    text = (f"<think>maybe {OPEN}[[1,2,3,4]]{CLOSE}</think>It is {OPEN}[[100,200,300,400]]{CLOSE} "
            f"<think>{OPEN}[5,6]{CLOSE}</think>")
    boxes = parse_boxes(text)
    assert [text[slice(*b.span)] for b in boxes] == ["[100,200,300,400]"]
    # a </think> never opened closes reasoning the template began
    assert norms(f"{OPEN}[1,2,3,4]{CLOSE}</think>ans {OPEN}[10,20]{CLOSE}") == [("point", (0.01, 0.02))]


def test_a_stream_cut_inside_a_box_and_junk_between_markers():
    assert norms(f"It is {OPEN}[[100,200,300,400],[500,600,7") == [("box", (0.1, 0.2, 0.3, 0.4))]
    assert norms(f"It is {OPEN}[[100,200,") == []
    assert norms(f"{OPEN}the cat, left{CLOSE} and {OPEN}[1,2,3]{CLOSE} {OPEN}x[100,100,200,200]y{CLOSE}") == [
        ("box", (0.1, 0.1, 0.2, 0.2))]
    assert norms("no markers [100,200,300,400]") == []  # only what the model marks as a box


def test_pixels_for_a_non_square_image_by_hand():
    (box,) = parse_boxes(f"{OPEN}[[100,250,500,1000]]{CLOSE}", [(40, 40), (640, 200)])
    assert box.image == 1 and box.pixels == (64, 50, 320, 200)  # the last image; x by 640, y by 200
    assert box.as_dict() == {"type": "box", "norm": [0.1, 0.25, 0.5, 1.0], "pixels": [64, 50, 320, 200],
                             "image": 1, "span": list(box.span)}
    assert parse_boxes(f"{OPEN}[1,2]{CLOSE}")[0].pixels is None  # no image: no pixels


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("ground")
    make_vl_checkpoint(path, seed=5)
    return LLM(path, block_size=4, kv_cache_gib=0.004, max_num_seqs=4)


@pytest.fixture()
def rotated(tmp_path):
    """A 64x32 JPEG whose EXIF orientation 6 shows it 32 wide and 64 high."""
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    random_image(64, 32, 3).save(path, exif=exif)
    return path


def test_llm_chat_and_generate_give_boxes_in_the_pixels_the_user_sees(llm, rotated, tmp_path):
    script(llm, "<think>", f"{OPEN}[1,1,2,2]{CLOSE}", "</think>", "It is ", OPEN, "[[250,100,750,500]]", CLOSE)
    wide = tmp_path / "wide.png"
    random_image(80, 30, 4).save(wide)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(wide)},
                                             {"type": "image", "image": str(rotated)},
                                             {"type": "text", "text": "where?"}]}]
    (out,) = llm.chat(messages, SamplingParams(max_tokens=60))
    assert out.image_sizes == [(80, 30), (32, 64)]
    (box,) = out.outputs[0].boxes
    assert box.image == 1 and box.pixels == (8, 6, 24, 32)  # 0.25*32, 0.1*64, 0.75*32, 0.5*64
    # generate with an image beside the prompt: the same data
    (out,) = llm.generate({"prompt": "<|begin_of_image|><|image|><|end_of_image|>where?", "images": [str(wide)]},
                          SamplingParams(max_tokens=60))
    assert [b.pixels for b in out.outputs[0].boxes] == [(20, 3, 60, 15)]
    # while streaming (delta outputs), boxes come with the finished output only
    script(llm, "It is ", OPEN, "[[0,0,500,500]]", CLOSE)
    rid = llm.add_request({"messages": messages}, SamplingParams(max_tokens=40, output_kind="delta"))
    seen = []
    while llm.has_unfinished():
        seen += [(o.finished, o.outputs[0].boxes) for o in llm.step() if o.request_id == rid and o.outputs]
    assert all(b is None for f, b in seen if not f) and [b.pixels for b in seen[-1][1]] == [(0, 0, 16, 32)]


def outline_at(png, box):
    """Whether the drawn (red) outline covers the middle of each edge of `box` (x1,y1,x2,y2), within 1 px."""
    img = Image.open(png).convert("RGB")
    x1, y1, x2, y2 = box
    mx, my = (x1 + x2) // 2, (y1 + y2) // 2

    def red(x, y, dx, dy):
        for d in (-1, 0, 1):
            r, g, _ = img.getpixel((min(max(x + d * dx, 0), img.width - 1), min(max(y + d * dy, 0), img.height - 1)))
            if r >= 250 and g < 80:
                return True
        return False

    return red(x1, my, 1, 0) and red(x2 - 1, my, 1, 0) and red(mx, y1, 0, 1) and red(mx, y2 - 1, 0, 1)


def blank(path, w, h, **save):
    Image.new("RGB", (w, h), (0, 90, 0)).save(path, **save)
    return path


def test_chat_draw_puts_the_outline_where_the_box_says(llm, tmp_path, monkeypatch):
    """glm45v chat --draw on a non-square image and on an EXIF-rotated one, read back with PIL."""
    import glm45v_npu.cli as cli

    monkeypatch.setattr(cli, "_llm", lambda config: llm)
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {"wide": (blank(tmp_path / "wide.png", 300, 120), (60, 30, 240, 102)),  # [200,250,800,850]
             "rotated": (blank(tmp_path / "rot.jpg", 300, 120, exif=exif, quality=98), (24, 75, 96, 255))}
    for name, (image, pixels) in cases.items():
        script(llm, "It is ", OPEN, "[[200,250,800,850]]", CLOSE)
        out = tmp_path / f"{name}-drawn.png"
        r = CliRunner().invoke(cli.app, ["chat", "-p", "where?", "--image", str(image), "--draw", str(out), "--json",
                                         "--model", "unused"])
        assert r.exit_code == 0, r.output
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert [b["pixels"] for b in result["boxes"]] == [list(pixels)]
        assert Image.open(out).size == Image.open(image).size if name == "wide" else Image.open(out).size == (120, 300)
        assert outline_at(out, pixels), name
        assert not outline_at(out, (pixels[0] + 12, pixels[1] + 12, pixels[2] - 12, pixels[3] - 12))


def test_interactive_draw_and_its_errors(llm, tmp_path, monkeypatch):
    import glm45v_npu.cli as cli

    monkeypatch.setattr(cli, "_llm", lambda config: llm)
    image = blank(tmp_path / "a.png", 200, 100)
    script(llm, OPEN, "[[100,100,500,900]]", CLOSE)
    target = tmp_path / "out" / "b.png"
    r = CliRunner().invoke(cli.app, ["chat", "--model", "unused"],
                           input=f"/draw {target}\n/image {image}\nwhere?\n/draw {target}\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "the last answer has no boxes" in r.output and outline_at(target, (20, 10, 100, 90))
    r = CliRunner().invoke(cli.app, ["chat", "-p", "x", "--draw", str(tmp_path / "out.txt"), "--model", "unused"])
    assert r.exit_code == 2 and "--draw" in r.output and "Traceback" not in r.output


def test_caption_records_boxes_in_pixels_and_draws_them(llm, tmp_path, monkeypatch):
    import glm45v_npu.cli as cli

    monkeypatch.setattr(cli, "_llm", lambda config: llm)
    folder = tmp_path / "in"
    folder.mkdir()
    blank(folder / "a.png", 300, 120)
    blank(folder / "b.png", 100, 100)
    script(llm, "It is ", OPEN, "[[200,250,800,850]]", CLOSE)
    out, drawn = tmp_path / "c.jsonl", tmp_path / "drawn"
    r = CliRunner().invoke(cli.app, ["caption", str(folder), "--out", str(out), "--draw", str(drawn),
                                     "--model", "unused"])
    assert r.exit_code == 0, r.output
    records = {json.loads(line)["path"]: json.loads(line) for line in out.read_text().splitlines()}
    a, b = records[str(folder / "a.png")], records[str(folder / "b.png")]
    assert a["boxes"][0]["pixels"] == [60, 30, 240, 102] and b["boxes"][0]["pixels"] == [20, 25, 80, 85]
    assert outline_at(a["drawn"], (60, 30, 240, 102)) and outline_at(b["drawn"], (20, 25, 80, 85))
    assert len(list(drawn.iterdir())) == 2


def test_the_api_returns_boxes_in_the_message_and_the_last_chunk(llm):
    server = Server(llm)
    try:
        script(llm, "<think>", f"{OPEN}[9,9]{CLOSE}", "</think>", "It is ", OPEN, "[[250,100,750,500],[10,20]]",
               CLOSE, " ok")
        image = random_image(80, 30, 2)
        body = {"model": "glm45v-test", "max_tokens": 60,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                                          {"type": "text", "text": "where?"}]}]}
        message = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        assert message["content"] == f"It is {OPEN}[[250,100,750,500],[10,20]]{CLOSE} ok"  # markers kept
        boxes = message["boxes"]
        assert [(b["type"], b["pixels"], b["image"]) for b in boxes] == [("box", [20, 3, 60, 15], 0),
                                                                         ("point", [1, 1], 0)]
        assert [message["content"][slice(*b["span"])] for b in boxes] == ["[250,100,750,500]", "[10,20]"]
        chunks = []
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        with_boxes = [c for c in chunks if c["choices"] and "boxes" in c["choices"][0]["delta"]]
        assert len(with_boxes) == 1 and with_boxes[0]["choices"][0]["finish_reason"] == "stop"
        assert with_boxes[0]["choices"][0]["delta"]["boxes"] == boxes
        script(llm, "no boxes here")
        message = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        assert "boxes" not in message  # present only when there are boxes
    finally:
        server.stop()
