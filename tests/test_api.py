"""The Python API as vLLM users write it, and the parts of the CLI they reach for first."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli_cases import cli_env, forked
from tests.tiny import IMAGE_TOKEN, make_vl_checkpoint, random_image

VLLM_SCRIPT = '''
from glm45v_npu import LLM, SamplingParams   # the only line that differs from a vLLM script

llm = LLM(model=MODEL, max_model_len=512, gpu_memory_utilization=0.5, max_num_seqs=8, seed=0,
          enforce_eager=True, limit_mm_per_prompt={"image": 2}, dtype="auto")
greedy = SamplingParams(temperature=0, max_tokens=6, logprobs=3)
outs = llm.generate("Hello there", greedy)
outs += llm.generate(["first prompt", "second prompt"], greedy)
outs += llm.generate({"prompt": "<|begin_of_image|><|image|><|end_of_image|>what is it?",
                      "multi_modal_data": {"image": IMAGE}}, greedy)
chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=5),
                chat_template_kwargs={"enable_thinking": False})
several = llm.generate("Tell me", SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=5))
penalised = llm.generate("again again", SamplingParams(temperature=0, max_tokens=6, presence_penalty=1.5,
                                                      frequency_penalty=0.5, min_tokens=3))
RESULTS = dict(outs=outs, chat=chat, several=several, penalised=penalised)
'''


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("api")
    make_vl_checkpoint(path, "gqa2-hd32-half-rope", seed=71)
    return path


def test_a_vllm_script_runs_with_only_its_import_changed(ckpt):
    from glm45v_npu import LLM, SamplingParams

    scope = {"MODEL": str(ckpt), "IMAGE": random_image(60, 40, 3)}
    exec(VLLM_SCRIPT, scope)  # noqa: S102 - the script under test
    r = scope["RESULTS"]
    outs = r["outs"]
    assert len(outs) == 4 and all(o.finished and o.error is None for o in outs)
    for o in outs:
        c = o.outputs[0]
        assert o.prompt_token_ids and c.index == 0 and len(c.token_ids) == 6 and c.finish_reason == "length"
        assert isinstance(c.text, str) and c.cumulative_logprob is not None
        assert all(len(entry) >= 3 and c.token_ids[i] in entry for i, entry in enumerate(c.logprobs))
    assert outs[0].prompt == "Hello there" and outs[3].prompt_token_ids.count(IMAGE_TOKEN) > 1
    assert len(r["several"][0].outputs) == 2 and [c.index for c in r["several"][0].outputs] == [0, 1]
    assert r["chat"][0].outputs[0].finish_reason in ("stop", "length")

    # greedy equals the engine's own API on the same request; top-N logprobs are the model's log-softmax
    llm = LLM(ckpt)
    same = llm.generate([{"prompt": "Hello there"}], SamplingParams(temperature=0, max_tokens=6, logprobs=3))[0]
    assert same.outputs[0].token_ids == outs[0].outputs[0].token_ids
    ids = same.prompt_token_ids + same.outputs[0].token_ids
    step = llm.engine.runner
    from glm45v_npu.engine.runner import StepInputs

    n = len(ids) - 1
    logits = step.execute(StepInputs(ids[:n], torch.arange(n).expand(3, -1), [n], [n],
                                     [list(range(-(-n // 16)))], list(range(n))))
    logp = torch.log_softmax(logits.float(), -1)[len(same.prompt_token_ids) - 1 :]
    for row, entry in zip(logp, same.outputs[0].logprobs):
        top = row.topk(3)
        for rank, (tid, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
            assert abs(entry[tid].logprob - value) < 1e-4 and entry[tid].rank == rank

    assert len(r["penalised"][0].outputs[0].token_ids) >= 3  # min_tokens: no eos before 3 tokens


def test_old_argument_names_still_work_with_a_warning(ckpt):
    from glm45v_npu import LLM

    with pytest.warns(FutureWarning, match="memory_fraction.*gpu_memory_utilization"):
        llm = LLM(ckpt, memory_fraction=0.5, expert_parallel=True)
    assert llm.engine.config.gpu_memory_utilization == 0.5
    from glm45v_npu.errors import Glm45vError

    with pytest.raises(Glm45vError, match="unknown argument"):
        LLM(ckpt, speculative_model="x")


def test_import_does_not_load_torch():
    code = "import sys, glm45v_npu; assert 'torch' not in sys.modules, 'torch imported'; print(glm45v_npu.__version__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


BIN = Path(sys.executable).with_name("glm45v")


def test_version_and_help_are_quick():
    start = time.perf_counter()
    r = subprocess.run([str(BIN), "--version"], capture_output=True, text=True)
    version_s = time.perf_counter() - start
    assert r.returncode == 0 and r.stdout.startswith("glm45v ")
    r = subprocess.run([str(BIN), "chat", "--help"], capture_output=True, text=True, env={"COLUMNS": "200"})
    assert r.returncode == 0 and "<bool>" not in r.stdout and "<str>" not in r.stdout and "<int>" not in r.stdout
    for flag in ("--max-model-len", "--gpu-memory-utilization", "--max-num-seqs", "--enforce-eager", "--revision",
                 "--download-dir", "--dtype", "--seed", "--top-k", "--min-p", "--repetition-penalty", "--stop",
                 "--system-prompt", "--think", "--no-think", "--generation-config"):
        assert flag in r.stdout, flag
    print(f"\nglm45v --version: {version_s:.2f} s")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("cache-api"))


@pytest.mark.slow
def test_ollama_style_positional_chat(env, tmp_path):
    image = tmp_path / "cat.png"
    random_image(50, 40, 9).save(image)
    a, b = forked(env, tmp_path / "runs", [
        ["chat", "describe this", image, "--json", "--max-tokens", 4, "--temperature", 0],
        ["chat", "-p", "describe this", "--image", image, "--json", "--max-tokens", 4, "--temperature", 0]])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout) == json.loads(b.stdout)


@pytest.mark.slow
def test_renamed_flags_and_their_old_forms(env, tmp_path):
    hi = ["chat", "-p", "hi", "--json", "--max-tokens", 3, "--temperature", 0]
    new, old, tp, too_long = forked(env, tmp_path / "runs", [
        [*hi, "--enable-expert-parallel", "--no-think", "--max-model-len", 256, "--max-num-seqs", 4, "--enforce-eager"],
        [*hi, "--no-think"],
        [*hi, "--tp-experts"],
        ["chat", "-p", "hi", "--max-tokens", 300, "--max-model-len", 64]])
    assert new.returncode == 0 and old.returncode == 0, new.stderr + old.stderr
    assert json.loads(new.stdout)["raw"] == json.loads(old.stdout)["raw"]
    assert tp.returncode == 0, tp.stderr  # the old flag of 0.1 still parses
    assert too_long.returncode == 2 and "exceeds the model's context of 64 tokens" in too_long.stderr


@pytest.mark.slow
def test_chat_with_videos(env, tmp_path):
    from glm45v_npu.inputs.video import write_test_video

    clip = write_test_video(tmp_path / "clip.mp4", 1.5, size=(64, 48))
    a, b = forked(env, tmp_path / "runs", [
        ["chat", "--video", clip, "-p", "what moves?", "--json", "--max-tokens", 3, "--temperature", 0],
        ["chat", "what moves?", clip, "--json", "--max-tokens", 3, "--temperature", 0]])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout) == json.loads(b.stdout) and json.loads(a.stdout)["prompt_tokens"] > 20
    script = f"/video {clip}\nwhat moves?\n/video {tmp_path / 'missing.mp4'}\n/exit\n"
    r = subprocess.run([str(BIN), "chat", "--max-tokens", "3", "--temperature", "0", "--json"], env=env, input=script,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "attached" in r.stderr and "missing.mp4: no such file" in r.stderr
    assert json.loads(r.stdout.splitlines()[0])["prompt_tokens"] == json.loads(a.stdout)["prompt_tokens"]


@pytest.mark.slow
def test_log_level_shows_the_kv_budget(env, tmp_path):
    r, bad = forked(env, tmp_path / "runs", [["--log-level", "info", "chat", "-p", "hi", "--max-tokens", 1],
                                              ["--log-level", "loud", "info"]])
    assert r.returncode == 0 and "KV cache" in r.stderr, r.stderr
    assert bad.returncode == 2 and "--log-level loud" in bad.stderr
