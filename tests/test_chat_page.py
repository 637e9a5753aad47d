"""The chat page (glm45v serve, /) in a real browser: Debian's Chromium, headless, driven by Playwright, against a
real server whose sampler is scripted so the answer is known. Skipped, saying why, where Chromium or Playwright
is missing. GLM45V_SCREENSHOT=PATH also writes the README's screenshot there."""

import os
import shutil
import time

import httpx
import pytest
from PIL import Image, ImageDraw

from glm45v_npu import LLM
from glm45v_npu.inputs.video import write_test_video
from tests.serving import Server, record_prompts, script
from tests.tiny import make_vl_checkpoint

pytestmark = pytest.mark.slow
OPEN, CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
BOXES = [(100, 380, 420, 900), (600, 80, 860, 420)]  # the cat and the sun of picture() below, 0-1000
POINT = (760, 700)
KEY = "page-key"


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright)")
    return path


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("page")
    make_vl_checkpoint(path, seed=13)
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    srv = Server(LLM(ckpt, block_size=4, kv_cache_gib=0.004, max_num_seqs=4))
    yield srv
    srv.stop()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.goto(server.url + "/")
    pg.wait_for_function("() => document.body.dataset.ready === 'yes'")
    yield pg
    context.close()


def picture(path, w=600, h=360):
    """A non-square picture with something where each box of BOXES falls."""
    img = Image.new("RGB", (w, h), (150, 200, 240))
    d = ImageDraw.Draw(img)
    d.rectangle([0, int(0.8 * h), w, h], fill=(90, 160, 80))
    x1, y1, x2, y2 = (v / 1000 * s for v, s in zip(BOXES[0], (w, h, w, h)))
    d.ellipse([x1, y1, x2, y2], fill=(120, 90, 60))
    x1, y1, x2, y2 = (v / 1000 * s for v, s in zip(BOXES[1], (w, h, w, h)))
    d.ellipse([x1, y1, x2, y2], fill=(250, 210, 60))
    img.save(path)
    return path


def ask(page, text, files=()):
    if files:
        page.set_input_files("#files", [str(f) for f in files])
        page.wait_for_function(f"() => document.querySelectorAll('#previews .preview').length === {len(files)}")
    page.fill("#prompt", text)
    page.click("#send")


def finished(page, timeout=60_000):
    page.wait_for_function("() => document.body.dataset.busy === 'no'", timeout=timeout)


def test_a_chat_with_an_image_streams_reasoning_folds_it_and_draws_the_boxes(page, server, tmp_path):
    box_text = "[[" + "],[".join(",".join(map(str, b)) for b in BOXES) + "]]"
    script(server.llm, "<think>", "The picture shows a cat on grass and the sun.", "</think>",
           "The **cat** is at ", OPEN, box_text, CLOSE, ", a bird at ", OPEN, f"[{POINT[0]},{POINT[1]}]", CLOSE, ".",
           delay_s=0.04)
    ask(page, "Where are the cat and the sun?", [picture(tmp_path / "garden.png")])
    # the reasoning shows live, open, before the answer starts
    page.wait_for_function("() => { const d = document.querySelector('.message.assistant details.reasoning');"
                           "return d && d.open && d.textContent.includes('cat on grass') &&"
                           "!document.querySelector('.message.assistant .answer').textContent; }")
    finished(page)
    assert page.eval_on_selector(".message.assistant details.reasoning", "d => d.open") is False  # folded
    answer = page.inner_text(".message.assistant .answer")
    assert answer.startswith("The cat is at") and page.query_selector(".answer strong") is not None
    img = page.query_selector(".message.assistant .grounded img")
    page.wait_for_function("() => document.querySelector('.grounded img').complete")
    r = img.bounding_box()
    marks = page.query_selector_all(".grounded .box, .grounded .point")
    assert len(marks) == 3
    for mark, want in zip(marks, [*BOXES, POINT]):
        got = mark.bounding_box()
        if len(want) == 4:
            x1, y1, x2, y2 = (r["x"] + want[0] / 1000 * r["width"], r["y"] + want[1] / 1000 * r["height"],
                              r["x"] + want[2] / 1000 * r["width"], r["y"] + want[3] / 1000 * r["height"])
            assert abs(got["x"] - x1) <= 2 and abs(got["y"] - y1) <= 2, (got, want)
            assert abs(got["x"] + got["width"] - x2) <= 2 and abs(got["y"] + got["height"] - y2) <= 2, (got, want)
        else:
            cx, cy = got["x"] + got["width"] / 2, got["y"] + got["height"] / 2
            assert abs(cx - (r["x"] + want[0] / 1000 * r["width"])) <= 2
            assert abs(cy - (r["y"] + want[1] / 1000 * r["height"])) <= 2
    assert [m.get_attribute("data-index") for m in marks] == ["1", "2", "3"]
    assert page.inner_text(".answer .box-ref .index").startswith("#1 #2")
    # the same boxes at another display size: percentages keep them on the image
    page.set_viewport_size({"width": 480, "height": 800})
    r2, first = img.bounding_box(), marks[0].bounding_box()
    assert r2["width"] < r["width"] and abs(first["x"] - (r2["x"] + BOXES[0][0] / 1000 * r2["width"])) <= 2
    page.set_viewport_size({"width": 1100, "height": 800})
    shot = os.environ.get("GLM45V_SCREENSHOT") or str(tmp_path / "page.png")
    page.screenshot(path=shot)
    assert Image.open(shot).size == (1100, 800) and not page.errors, page.errors


def test_stop_aborts_the_request_on_the_server(page, server):
    script(server.llm, "<think>", "x" * 300, "</think>", "y" * 300, delay_s=0.05)
    ask(page, "count")
    page.wait_for_function("() => (document.querySelector('.message.assistant details.reasoning') || {}).textContent"
                           "?.length > 20")
    assert server.llm.stats().requests == 1
    page.click("#stop")
    t = time.time()
    while server.llm.stats().requests and time.time() - t < 5:
        time.sleep(0.02)
    assert server.llm.stats().requests == 0 and time.time() - t < 1.0
    finished(page)
    assert "(stopped)" in page.inner_text(".message.assistant")


def test_the_thinking_switch_changes_the_prompt_the_server_renders(page, server, monkeypatch):
    user = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    on, off = (server.llm.engine.processor.encode({"messages": user, "chat_template_kwargs": {
        "enable_thinking": flag}}).prompt for flag in (True, False))
    seen = record_prompts(server.llm, monkeypatch)
    script(server.llm, "ok")
    ask(page, "hi")
    finished(page)
    page.click("#new-chat")
    page.uncheck("#thinking")
    ask(page, "hi")
    finished(page)
    assert on != off and seen == [on, off]


def test_untrusted_output_renders_as_inert_text(page, server):
    evil = ('<img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script> '
            '[click me](javascript:window.__pwned=3) [safe](https://example.org)\n\n```html\n<b onclick=x>hi</b>\n```')
    script(server.llm, evil)
    page.evaluate("window.__pwned = undefined")
    ask(page, "say something nasty")
    finished(page)
    answer = page.query_selector(".message.assistant .answer")
    text = answer.inner_text()
    assert "<img src=x onerror=" in text and "<script>window.__pwned=2</script>" in text
    assert answer.query_selector("img, script, b") is None
    assert answer.query_selector("a[href^='javascript']") is None
    assert answer.query_selector("a[href='https://example.org']").get_attribute("rel") == "noopener noreferrer nofollow"
    assert answer.query_selector("pre code").inner_text() == "<b onclick=x>hi</b>"
    page.get_by_text("click me").click()
    page.wait_for_timeout(200)
    assert page.evaluate("window.__pwned") is None


def test_conversations_are_kept_switched_and_deleted(page, server):
    script(server.llm, "first answer")
    ask(page, "one")
    finished(page)
    page.click("#new-chat")
    script(server.llm, "second answer")
    ask(page, "two")
    finished(page)
    page.reload()
    page.wait_for_function("() => document.body.dataset.ready === 'yes'")
    titles = [t.inner_text() for t in page.query_selector_all("#conversations .open")]
    assert titles == ["two", "one"]
    page.click("#conversations li:nth-child(2) .open")
    assert "first answer" in page.inner_text("#messages")
    page.click("#conversations li:nth-child(1) .delete")
    assert [t.inner_text() for t in page.query_selector_all("#conversations .open")] == ["one"]


def test_server_errors_and_a_video_reach_the_conversation(page, server, tmp_path):
    page.click("#settings summary")
    page.fill("#max-tokens", "99999999")
    script(server.llm, "never")
    ask(page, "too long")
    finished(page)
    error = page.inner_text(".message.assistant .error")
    assert error.startswith("400") and "max_tokens" in error
    page.fill("#max-tokens", "")
    clip = write_test_video(tmp_path / "clip.mp4", 1.0, fps=4, size=(64, 48), seed=1)
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    script(server.llm, "a short clip")
    ask(page, "what happens?", [clip])
    finished(page)
    assert page.query_selector(".message.user video") is not None
    assert "a short clip" in page.inner_text(".message.assistant:last-child .answer")
    parts = bodies[-1]["messages"][-1]["content"]
    assert parts[0]["type"] == "video_url" and parts[0]["video_url"]["url"].startswith("data:video/mp4;base64,")


def test_the_page_fits_a_phone(browser, server, tmp_path):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    pg = context.new_page()
    pg.goto(server.url + "/")
    pg.wait_for_function("() => document.body.dataset.ready === 'yes'")
    script(server.llm, "A long line " + "w" * 200 + "\n\n```\n" + "code " * 80 + "\n```")
    ask(pg, "hi", [picture(tmp_path / "p.png", 1200, 500)])
    finished(pg)
    widths = pg.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth,"
                         "document.getElementById('messages').scrollWidth, document.getElementById('messages')"
                         ".clientWidth]")
    assert widths[0] <= widths[2] and widths[1] <= widths[2] and widths[3] <= widths[4], widths
    context.close()


def test_with_an_api_key_the_page_refuses_to_chat_until_it_is_given(browser, ckpt):
    srv = Server(LLM(ckpt, block_size=4, kv_cache_gib=0.004, max_num_seqs=4), api_key=KEY)
    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.goto(srv.url + "/")
        pg.wait_for_selector("#key-dialog[open]")
        assert pg.is_disabled("#send")
        assert httpx.get(srv.url + "/ui/settings").status_code == 401  # the page's data is behind the key
        pg.fill("#key-input", "wrong")
        pg.click("#key-form button")
        pg.wait_for_selector("#key-error:not([hidden])")
        assert pg.is_disabled("#send") and "refused" in pg.inner_text("#key-error")
        assert srv.llm.stats().requests == 0
        pg.fill("#key-input", KEY)
        pg.click("#key-form button")
        pg.wait_for_function("() => document.body.dataset.ready === 'yes'")
        script(srv.llm, "welcome")
        ask(pg, "hi")
        finished(pg)
        assert "welcome" in pg.inner_text(".message.assistant .answer")
    finally:
        context.close()
        srv.stop()


def test_the_page_headers_and_that_no_ui_serves_none(server, ckpt):
    r = httpx.get(server.url + "/")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert r.headers["cache-control"] == "no-cache" and r.headers["etag"]
    assert httpx.get(server.url + "/", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    assert "<script>" not in r.text and " style=" not in r.text  # nothing inline


def test_paste_and_drop_attach_images_with_previews(page, server, tmp_path):
    import base64

    picture(tmp_path / "small.png", 60, 40)
    b64 = base64.b64encode((tmp_path / "small.png").read_bytes()).decode()
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const pasted = new DataTransfer();
        pasted.items.add(new File([bytes], "pasted.png", {type: "image/png"}));
        document.getElementById("prompt").dispatchEvent(
            new ClipboardEvent("paste", {clipboardData: pasted, bubbles: true, cancelable: true}));
        const dropped = new DataTransfer();
        dropped.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("main").dispatchEvent(
            new DragEvent("drop", {dataTransfer: dropped, bubbles: true, cancelable: true}));
    }""", b64)
    page.wait_for_function("() => document.querySelectorAll('#previews .preview img').length === 2")
    names = sorted(b.get_attribute("title") for b in page.query_selector_all("#previews .preview button"))
    assert names == ["remove dropped.png", "remove pasted.png"]
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    script(server.llm, "two pictures")
    page.fill("#prompt", "compare")
    page.click("#send")
    finished(page)
    parts = bodies[-1]["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert len(page.query_selector_all(".message.user .attachments img")) == 2
