"""lm-evaluation-harness against `glm45v serve` (issue 31): `local-completions` runs a small multiple-choice task
written here (no download) through /v1/completions with echo and logprobs, and its log-likelihoods equal the
Python API's prompt logprobs; `local-chat-completions` runs a generation task."""

import json
import os

import pytest

from glm45v_npu import LLM, SamplingParams
from tests.serving import Server
from tests.tiny import make_vl_checkpoint

pytestmark = pytest.mark.slow
MODEL = "glm45v-test"
DOCS = [{"question": "The sky is", "choices": [" blue", " green", " made of cheese"], "answer": 0},
        {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
        {"question": "Cats say", "choices": [" meow", " woof", " moo", " quack"], "answer": 0}]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{question}}}}"
{rest}
"""
MC = """doc_to_target: "{{answer}}"
doc_to_choice: "{{choices}}"
metric_list:
  - metric: acc
"""
GEN = """doc_to_target: "{{choices[0]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[clients]')")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    path = tmp_path_factory.mktemp("lm_eval_ckpt")
    make_vl_checkpoint(path, seed=41)
    tasks = tmp_path_factory.mktemp("lm_eval_tasks")
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "mc.yaml").write_text(TASK.format(name="glm45v_tiny_mc", data=data, kind="multiple_choice", rest=MC))
    (tasks / "gen.yaml").write_text(TASK.format(name="glm45v_tiny_gen", data=data, kind="generate_until", rest=GEN))
    srv = Server(LLM(path, block_size=4, kv_cache_gib=0.01))
    yield path, tasks, srv
    srv.stop()


def evaluate(model: str, args: str, task: str, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=args, tasks=[task], task_manager=TaskManager(
        include_path=str(tasks)), log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        fewshot_random_seed=0)


def test_local_completions_log_likelihoods_equal_the_python_api(setup):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    path, tasks, srv = setup
    args = (f"model={MODEL},base_url={srv.url}/v1/completions,tokenizer_backend=huggingface,tokenizer={path},"
            "num_concurrent=1,max_retries=1")
    out = evaluate("local-completions", args, "glm45v_tiny_mc", tasks)
    samples = out["samples"]["glm45v_tiny_mc"]
    assert len(samples) == len(DOCS) and "acc,none" in out["results"]["glm45v_tiny_mc"]
    lm = LocalCompletionsAPI(model=MODEL, base_url=f"{srv.url}/v1/completions", tokenizer_backend="huggingface",
                             tokenizer=str(path))
    llm = LLM(path, block_size=4, kv_cache_gib=0.01)
    checked = 0
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            ctx, cont = lm._encode_pair(context, continuation)
            (r,) = llm.generate({"prompt_token_ids": ctx + cont}, SamplingParams(max_tokens=1, prompt_logprobs=0))
            ours = sum(r.prompt_logprobs[i][t].logprob for i, t in enumerate(ctx + cont) if i >= len(ctx))
            assert abs(float(resp[0][0]) - ours) < 1e-3, (context, continuation, resp, ours)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in DOCS)


def test_local_chat_completions_runs(setup):
    path, tasks, srv = setup
    args = f"model={MODEL},base_url={srv.url}/v1/chat/completions,num_concurrent=1,max_retries=1"
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="local-chat-completions", model_args=args, tasks=["glm45v_tiny_gen"],
                          task_manager=TaskManager(include_path=str(tasks)), apply_chat_template=True,
                          log_samples=True)
    samples = out["samples"]["glm45v_tiny_gen"]
    assert len(samples) == len(DOCS) and all(isinstance(s["resps"][0][0], str) for s in samples)
    assert "exact_match,none" in out["results"]["glm45v_tiny_gen"]
