"""The real glm45v command, driven as a user would: subprocesses on the tiny-random model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_cases import cli_env, forked
from tests.tiny import random_image

BIN = Path(sys.executable).with_name("glm45v")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = cli_env(tmp_path_factory.mktemp("cache"))
    subprocess.run([str(BIN), "info", "--model", "tiny-random"], env=e, check=True, capture_output=True)
    return e


def glm45v(env, *args, stdin=None, timeout=300):
    return subprocess.run([str(BIN), *map(str, args)], env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for i, (w, h) in enumerate([(120, 80), (40, 90), (64, 64), (25, 30), (200, 50)]):
        random_image(w, h, i).save(d / f"good{i}.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    (d / "empty.png").write_bytes(b"")
    (d / "notes.jpg").write_text("this is not an image\n")
    return d


@pytest.fixture(scope="module")
def thin_folder(tmp_path_factory):
    """Two ordinary images and one 3x900 PNG, which transformers' resizing refuses (aspect ratio over 200)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("thin")
    random_image(80, 60, 7).save(d / "a.png")
    random_image(50, 70, 8).save(d / "b.png")
    Image.new("RGB", (3, 900), (1, 2, 3)).save(d / "thin.png")
    return d


@pytest.mark.slow
def test_caption_with_an_image_transformers_refuses(env, thin_folder, tmp_path):
    out = tmp_path / "c.jsonl"
    r = glm45v(env, "caption", thin_folder, "--out", out, "--max-tokens", 4)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    rows = {Path(x["path"]).name: x for x in _lines(out)}
    assert set(rows) == {"a.png", "b.png", "thin.png"}
    assert "answer" in rows["a.png"] and "answer" in rows["b.png"]
    assert "thin.png" in rows["thin.png"]["error"] and "aspect ratio" in rows["thin.png"]["error"]


@pytest.fixture(scope="module")
def runs(env, images, tmp_path_factory):
    """The commands that need no input, run once for the tests below (in one driver: tests/cli_cases.py); the hub
    offline, as the mistakes' last case needs."""
    tmp = tmp_path_factory.mktemp("mistakes")
    (tmp / "empty").mkdir()
    cases = {
        "one-shot": ["chat", "-p", "what is in the picture?", "--image", images / "good0.png", "--max-tokens", 12,
                     "--seed", 0],
        "chat-json": ["chat", "-p", "hi", "--json", "--max-tokens", 6, "--temperature", 0, "--no-think"],
        "bench-json": ["bench", "--batch", 3, "--input-len", 12, "--output-len", 5, "--images", 1, "--image-size",
                       "56x56", "--json"],
        "info-tp8": ["info", "--model", "glm-4.5v", "--tensor-parallel-size", 8, "--dtype", "bfloat16"],
        "info": ["info", "--model", "glm-4.5v"],
        "interactive": (["chat", "--max-tokens", 5, "--temperature", 0, "--json"],
                        f"hello\n/image {images / 'good1.png'}\ndescribe it\n/reset\n/image {images / 'missing.png'}\n"
                        "hello\n/exit\n"),
        **{f"mistake {i}": [a.format(empty=tmp / "empty", images=images, tmp=tmp) for a in args]
           for i, (args, _) in enumerate(MISTAKES)},
    }
    return dict(zip(cases, forked(dict(env, HF_HUB_OFFLINE="1"), tmp_path_factory.mktemp("runs"),
                                  list(cases.values()))))


def test_chat_one_shot_with_image(runs):
    r = runs["one-shot"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "Traceback" not in r.stderr
    assert "random" in r.stderr  # the tiny-random banner


def test_chat_json(runs):
    r = runs["chat-json"]
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["finish_reason"] in ("stop", "length") and 1 <= result["completion_tokens"] <= 6
    assert {"answer", "reasoning", "boxes", "raw", "prompt_tokens"} <= set(result)


def test_chat_interactive_commands(runs):
    r = runs["interactive"]
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(turns) == 3
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"] + 4  # history + the image's tokens
    assert turns[2]["prompt_tokens"] == turns[0]["prompt_tokens"]  # after /reset: no history, same prompt
    assert turns[2]["raw"] == turns[0]["raw"]
    assert "attached" in r.stderr and "history cleared" in r.stderr and "missing.png: no such file" in r.stderr


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_caption_folder_with_bad_files_and_resume(env, images, tmp_path):
    out = tmp_path / "c.jsonl"
    r = glm45v(env, "caption", images, "--out", out, "--max-tokens", 6, "--batch", 3)
    assert r.returncode == 0, r.stderr
    rows = _lines(out)
    good = [x for x in rows if "answer" in x]
    bad = {Path(x["path"]).name: x["error"] for x in rows if "error" in x}
    assert len(good) == 5 and all(x["completion_tokens"] >= 1 and "seconds" in x for x in good)
    assert set(bad) == {"corrupt.jpg", "empty.png", "notes.jpg"}
    assert all(name in msg for name, msg in bad.items())
    again = glm45v(env, "caption", images, "--out", out, "--max-tokens", 6)
    assert again.returncode == 0 and _lines(out) == rows


@pytest.mark.slow
def test_caption_interrupted_then_resumed(env, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(24):
        random_image(60 + i, 50, 100 + i).save(d / f"{i:02d}.png")
    out = tmp_path / "c.jsonl"
    args = [str(BIN), "caption", str(d), "--out", str(out), "--max-tokens", 48, "--batch", 1, "--temperature", 0]
    proc = subprocess.Popen(list(map(str, args)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    first = _lines(out)  # every line parses
    assert 2 <= len(first) < 24
    r = glm45v(env, "caption", d, "--out", out, "--max-tokens", 48, "--batch", 4, "--temperature", 0)
    assert r.returncode == 0, r.stderr
    paths = [x["path"] for x in _lines(out)]
    assert len(paths) == 24 and len(set(paths)) == 24


def test_bench_json_tiny_random(runs):
    r = runs["bench-json"]
    assert r.returncode == 0, r.stderr
    _check_metrics(json.loads(r.stdout))


@pytest.mark.slow
def test_bench_json_real_config_dummy_weights(env):
    r = glm45v(env, "bench", "--model", "glm-4.5v", "--load-format", "dummy", "--num-layers", 2, "--batch", 2,
               "--input-len", 8, "--output-len", 3, "--dtype", "bfloat16", "--kv-cache-gib", 0.05, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    _check_metrics(result)
    assert result["model"].endswith("glm-4.5v/config.json")


def _check_metrics(m):
    for key in ("ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "prefill_tokens_per_s",
                "decode_tokens_per_s", "peak_memory_bytes", "kv_cache_tokens"):
        assert isinstance(m[key], (int, float)) and m[key] > 0, key


MISTAKES = [
    (["chat", "-p", "x", "--model", "/no/such/model"], "no such folder"),
    (["chat", "-p", "x", "--model", "{empty}"], "has no config.json"),
    (["chat", "-p", "x", "--image", "/no/such.png"], "/no/such.png: no such file"),
    (["caption", "{images}", "--out", "{tmp}/x.jsonl", "--batch", "0"], "--batch 0"),
    (["chat", "-p", "x", "--temperature", "-1"], "--temperature -1"),
    (["bench", "--batch", "0"], "--batch 0"),
    (["bench", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens 0: must be >= 1"),
    (["chat", "-p", "x", "--max-num-seqs", "0"], "--max-num-seqs 0: must be >= 1"),
    (["chat", "-p", "x", "--block-size", "0"], "--block-size 0: must be in 1..1024"),
    (["chat", "-p", "x", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5: must be in (0, 1]"),
    (["chat", "-p", "x", "--model", "someorg/nonexistent-model"], "pass its local folder"),  # offline hub id
]


def test_user_mistakes_give_one_line_and_exit_2(runs):
    for i, (args, message) in enumerate(MISTAKES):
        r = runs[f"mistake {i}"]
        assert r.returncode == 2, (args, r)
        lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_too_thin_image_gives_one_line_and_exit_2(env, thin_folder):
    r = glm45v(env, "chat", "-p", "x", "--image", thin_folder / "thin.png")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "thin.png: the image processor refuses it" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_chat_on_two_ranks(env):
    r = glm45v(env, "chat", "-p", "hi", "--json", "--max-tokens", 4, "--temperature", 0, "--tensor-parallel-size", 2)
    assert r.returncode == 0, r.stderr
    single = glm45v(env, "chat", "-p", "hi", "--json", "--max-tokens", 4, "--temperature", 0)
    assert json.loads(r.stdout)["raw"] == json.loads(single.stdout)["raw"]


def test_info_memory_plan(runs):
    r = runs["info-tp8"]
    assert r.returncode == 0, r.stderr
    assert "weights per device" in r.stdout and "26.56 GiB" in r.stdout


def test_info_shows_kernel_paths_and_model(runs):
    r = runs["info"]
    assert r.returncode == 0, r.stderr
    for text in ("torch", "split_qkv_rmsnorm_rope", "fused_moe", "107.7", "46 (1 dense)"):
        assert text in r.stdout


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_session(env):
    proc = subprocess.Popen([str(BIN), "chat", "--max-tokens", "3000", "--temperature", "1"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write("tell me everything\n")
    proc.stdin.flush()
    assert proc.stdout.read(1)  # the answer has started streaming (3000 tokens take seconds on a CPU)
    proc.send_signal(signal.SIGINT)
    time.sleep(1)
    proc.stdin.write("/exit\n")
    proc.stdin.flush()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "(stopped)" in stderr and "Traceback" not in stderr


