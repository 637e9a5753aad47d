"""Tool calls and structured outputs (issue 24): the official openai client against the server on the tiny random
model, where only the grammar can make a reply valid; GLM-format calls from a scripted sampler, parsed, coerced
and streamed; the tool turns rendered as GLM-4.5V's own template renders them; grammars through preemption, n > 1
and the Python API; xgrammar's string rule repaired; bad input named."""

import asyncio
import json
import random

import jsonschema
import pytest

from glm45v_npu import LLM, SamplingParams, StructuredOutputsParams
from glm45v_npu.engine.sampler import Sampled, Sampler
from glm45v_npu.errors import Glm45vError
from glm45v_npu.testing.tiny_random import CHAT_TEMPLATE, TOKEN_IDS
from tests.serving import Server
from tests.tiny import make_vl_checkpoint

MODEL = "glm45v-test"
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                                    "metric": {"type": "boolean"}},
                   "required": ["city", "days"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 20},
                                                                      "limit": {"enum": [5, 10, 20]}},
                                     "required": ["q"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured")
    make_vl_checkpoint(path, "gqa2-hd32-half-rope", seed=91)
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    srv = Server(LLM(ckpt, block_size=4, kv_cache_gib=0.01, max_num_seqs=24, max_num_batched_tokens=256))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _valid_calls(calls):
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# --- the grammar holds a random model to the tools and schemas -----------------------------------------------------


@pytest.mark.parametrize("extra", [pytest.param(NO_THINK, marks=pytest.mark.slow), {}],
                         ids=["thinking off", "thinking on (the default)"])
def test_required_tool_choice_returns_calls_that_validate(client, server, extra):
    """With thinking on the tiny model never opens <think>: the calls must still come (they used to come back as
    finish_reason stop, no calls, when the grammar waited for a </think>)."""
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather in Oslo?"}],
                                           tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                           temperature=1, seed=seed, max_tokens=200, extra_body=extra)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1 and choice.message.tool_calls[0].id.startswith("call_")
        _valid_calls(choice.message.tool_calls)
    from openai.lib.streaming.chat import ChatCompletionStreamState

    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                                tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                                temperature=1, seed=7, max_tokens=200, stream=True,
                                                extra_body=extra):
        state.handle_chunk(chunk)
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and len(final.message.tool_calls) == 1
    _valid_calls(final.message.tool_calls)
    parallel = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                              tools=TOOLS, tool_choice="required", temperature=1, seed=8,
                                              max_tokens=150, extra_body=extra).choices[0]
    assert parallel.finish_reason in ("tool_calls", "length")  # a random model may go on calling to max_tokens
    assert len(parallel.message.tool_calls) >= 1  # each finished element of the array is a call
    _valid_calls(parallel.message.tool_calls)
    named = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "find cats"}],
                                           tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}},
                                           temperature=1, seed=3, max_tokens=200, extra_body=extra)
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["search"]
    _valid_calls(calls)
    assert server.idle()


def test_json_schema_parse_helper_with_thinking_on(client):
    """(A random model fills an unbounded string up to max_tokens: the schema bounds it, as for the tools.)"""
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        city: str = Field(max_length=12)
        days: int = Field(ge=0, le=99)

    for seed in range(3):
        r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "weather?"}],
                                               response_format=Answer, temperature=1, seed=seed, max_tokens=200)
        assert isinstance(r.choices[0].message.parsed, Answer), r.choices[0].message.content


ANSWER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                          "rain": {"$ref": "#/$defs/chance"}},
          "required": ["city", "rain"], "additionalProperties": False,
          "$defs": {"chance": {"type": "integer", "minimum": 0, "maximum": 100}}}


@pytest.mark.parametrize("extra", [NO_THINK, pytest.param({}, marks=pytest.mark.slow)],
                         ids=["thinking off", "thinking on (the default)"])
def test_tools_beside_a_schema_call_or_answer_in_it(client, server, extra):
    """tools (auto) with response_format: each reply is valid calls or an answer that meets the schema (its
    $defs reached from inside the union), whole and streamed; both happen."""
    from openai.lib.streaming.chat import ChatCompletionStreamState

    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": ANSWER, "strict": True}}
    kinds = set()
    for seed in (0, 6, 7) if extra is NO_THINK else range(8):  # (seeded: these give both a call and an answer)
        body = dict(model=MODEL, messages=[{"role": "user", "content": "rain in Oslo?"}], tools=TOOLS,
                    parallel_tool_calls=False,
                    response_format=fmt, temperature=1, seed=seed, max_tokens=200, extra_body=extra)
        whole = client.chat.completions.create(**body).choices[0]
        state = ChatCompletionStreamState()
        for chunk in client.chat.completions.create(**body, stream=True):
            state.handle_chunk(chunk)
        streamed = state.get_final_completion().choices[0]
        for choice in (whole, streamed):
            if choice.message.tool_calls:
                assert choice.finish_reason == "tool_calls" and not choice.message.content
                _valid_calls(choice.message.tool_calls)
                kinds.add("calls")
            else:
                assert choice.finish_reason == "stop", choice
                jsonschema.validate(json.loads(choice.message.content), ANSWER)
                kinds.add("answer")
        same = [(m.content or "", [(c.function.name, c.function.arguments) for c in m.tool_calls or []])
                for m in (whole.message, streamed.message)]
        assert same[0] == same[1]  # the same seed, the same reply
    assert kinds == {"calls", "answer"}, kinds
    assert server.idle()


def _random_schema(rng: random.Random, depth: int = 0) -> dict:
    kind = rng.choice(["object", "array", "enum", "integer", "number", "string", "boolean"] if depth < 2
                      else ["enum", "integer", "number", "string", "boolean"])
    if kind == "object":
        props = {f"k{i}_{rng.randint(0, 99)}": _random_schema(rng, depth + 1) for i in range(rng.randint(1, 4))}
        return {"type": "object", "properties": props, "required": rng.sample(sorted(props), rng.randint(0, len(props))),
                "additionalProperties": False}
    if kind == "array":
        return {"type": "array", "items": _random_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2, 3.5, True, None, "a \"quoted\" one"],
                                   rng.randint(1, 4))}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": -10, "maximum": rng.choice([1, 100, 1e6])}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 12)}
    return {"type": "boolean"}


def test_json_schema_answers_parse_and_validate_for_20_random_schemas(server):
    from openai import AsyncOpenAI

    rng = random.Random(24)
    schemas = [{"type": "object", "properties": {"root": _random_schema(rng)}, "required": ["root"],
                "additionalProperties": False} for _ in range(20)]

    async def one(client, i, schema):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        messages = [{"role": "user", "content": f"answer {i}"}]
        if i % 2:
            text = ""
            async for chunk in await client.chat.completions.create(
                    model=MODEL, messages=messages, response_format=fmt, temperature=1, seed=i, max_tokens=400,
                    stream=True, extra_body=NO_THINK):
                text += "".join(c.delta.content or "" for c in chunk.choices)
            return text
        r = await client.chat.completions.create(model=MODEL, messages=messages, response_format=fmt,
                                                 temperature=1, seed=i, max_tokens=400, extra_body=NO_THINK)
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content

    async def run():
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i, s) for i, s in enumerate(schemas)))

    for schema, text in zip(schemas, asyncio.run(run())):
        jsonschema.validate(json.loads(text), schema)  # json.loads is strict: no raw control characters
    assert server.idle()


def test_json_object_and_vllm_fields(client, server):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=1,
                                       seed=1, max_tokens=300, response_format={"type": "json_object"},
                                       extra_body=NO_THINK)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    choice = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=1,
                                            max_tokens=20, extra_body={**NO_THINK, "guided_choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no")
    regex = client.completions.create(model=MODEL, prompt="id:", temperature=1, max_tokens=20,
                                      extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
    assert len(regex.choices[0].text) == 6 and regex.choices[0].text[3] == "-"


# --- GLM-format calls the model writes (scripted), parsed, coerced and streamed ----------------------------------------


class Scripted:
    """Samples a fixed script of text and marker tokens, then (with `then`) the real sampler under the mask."""

    def __init__(self, tokenizer, pieces, then: Sampler | None = None):
        self.script = []
        for piece in pieces:
            self.script += [TOKEN_IDS[piece]] if piece in TOKEN_IDS else tokenizer.encode(piece, add_special_tokens=False)
        self.then = then

    def __call__(self, logits, params, generators, history, prompt_lens=None, suppress=None, allowed=None):
        at = [len(h) - n for h, n in zip(history, prompt_lens)]
        if self.then is not None and all(a >= len(self.script) for a in at):
            return self.then(logits, params, generators, history, prompt_lens, suppress, allowed)
        tokens = [self.script[a] if a < len(self.script) else TOKEN_IDS["<|endoftext|>"] for a in at]
        return Sampled(tokens, [-0.5] * len(tokens), [1] * len(tokens), [None] * len(tokens))


CALL = ["Sure, checking.\n", "<tool_call>", "get_weather\n", "<arg_key>", "city", "</arg_key>", "\n", "<arg_value>",
        "Paris 北京", "</arg_value>", "\n", "<arg_key>", "days", "</arg_key>", "\n", "<arg_value>", "3", "</arg_value>",
        "\n", "<arg_key>", "metric", "</arg_key>", "\n", "<arg_value>", "true", "</arg_value>", "\n", "</tool_call>",
        "\n", "<tool_call>", "search\n", "<arg_key>", "q", "</arg_key>", "\n", "<arg_value>", "42", "</arg_value>",
        "\n", "</tool_call>"]


def test_auto_calls_are_parsed_coerced_and_streamed(client, server, monkeypatch):
    from openai.lib.streaming.chat import ChatCompletionStreamState

    monkeypatch.setattr(server.llm.engine, "sampler", Scripted(server.llm.engine.processor.tokenizer, CALL))
    body = dict(model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, max_tokens=200)
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Sure, checking.\n"
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert calls == [("get_weather", {"city": "Paris 北京", "days": 3, "metric": True}), ("search", {"q": "42"})]
    state, chunks = ChatCompletionStreamState(), 0
    for chunk in client.chat.completions.create(**body, stream=True):
        state.handle_chunk(chunk)
        chunks += 1
    streamed = state.get_final_completion().choices[0]
    assert chunks > 10 and streamed.finish_reason == "tool_calls"
    assert streamed.message.content == whole.message.content
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    none = client.chat.completions.create(**body, tool_choice="none").choices[0]
    assert none.finish_reason == "stop" and none.message.tool_calls is None and "<tool_call>" in none.message.content
    single = client.chat.completions.create(**body, parallel_tool_calls=False).choices[0]
    assert [c.function.name for c in single.message.tool_calls] == ["get_weather"]


def test_a_call_inside_reasoning_ends_it(client, server, monkeypatch):
    tok = server.llm.engine.processor.tokenizer
    script = ["<think>", "I should look it up", "<tool_call>", "search\n", "<arg_key>", "q", "</arg_key>",
              "<arg_value>", "cats", "</arg_value>", "</tool_call>"]
    monkeypatch.setattr(server.llm.engine, "sampler", Scripted(tok, script))
    message = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}], tools=TOOLS,
                                             max_tokens=100).choices[0].message
    assert message.model_extra["reasoning_content"] == "I should look it up" and message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("search", {"q": "cats"})]


def test_the_grammar_waits_for_the_reasoning_to_end(ckpt):
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004)
    engine = llm.engine
    engine.sampler = Scripted(engine.processor.tokenizer, ["<think>", "free {{ text", "</think>"], then=engine.sampler)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    params = SamplingParams(max_tokens=60, temperature=1, seed=2, structured_outputs=StructuredOutputsParams(json=schema))
    text = llm.chat([{"role": "user", "content": "think first"}], params)[0].outputs[0].text
    reasoning, answer = text.split("</think>")
    assert reasoning == "<think>free {{ text" and json.loads(answer)["n"] in range(10)


DIGIT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
         "additionalProperties": False}


def _reasoning_and_answer(text: str) -> tuple[str | None, str]:
    if "</think>" not in text:
        return None, text
    reasoning, answer = text.split("</think>")
    return reasoning, answer


class NeverThinks:
    """The real sampler, with <think> never chosen: a model that answers at once although thinking is on."""

    def __init__(self, sampler: Sampler, think: int):
        self.sampler, self.think = sampler, think

    def __call__(self, logits, params, generators, history, prompt_lens=None, suppress=None, allowed=None):
        suppress = [list(s) + [self.think] for s in (suppress or [[] for _ in params])]
        return self.sampler(logits, params, generators, history, prompt_lens, suppress, allowed)


def test_with_thinking_on_a_model_that_does_not_open_think_is_constrained_from_its_first_token(ckpt):
    """The answer follows the schema from the first token (it used to wait for a </think> that never came, and came
    back as free text)."""
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004)
    engine = llm.engine
    engine.sampler = NeverThinks(engine.sampler, engine.grammars.think_open)
    grammar = StructuredOutputsParams(json=DIGIT)
    outs = llm.chat([[{"role": "user", "content": f"q{i}"}] for i in range(12)],
                    SamplingParams(max_tokens=40, temperature=1, seed=5, structured_outputs=grammar))
    for out in outs:
        assert engine.grammars.think_open not in out.outputs[0].token_ids
        assert json.loads(out.outputs[0].text)["n"] in range(10), out.outputs[0].text


def test_a_thinking_budget_forces_the_end_of_reasoning_and_the_answer_follows(ckpt):
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004)
    engine = llm.engine
    engine.sampler = Scripted(engine.processor.tokenizer, ["<think>"], then=engine.sampler)
    params = SamplingParams(max_tokens=200, temperature=1, seed=3, thinking_token_budget=5,
                            structured_outputs=StructuredOutputsParams(json=DIGIT))
    out = llm.chat([{"role": "user", "content": "think"}], params)[0].outputs[0]
    think_end = engine.grammars.reasoning_end
    assert out.token_ids.index(think_end) <= 6, out.token_ids  # <think> + at most 5 reasoning tokens
    assert json.loads(_reasoning_and_answer(out.text)[1])["n"] in range(10), out.text


def test_reasoning_that_would_leave_no_room_for_the_answer_is_cut_and_never_stops_inside(ckpt):
    """max_tokens small, the model thinking and never closing on its own: </think> comes when the tokens left come
    down to what the answer keeps; stop tokens cannot end the reasoning; the answer parses."""
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004)
    engine = llm.engine
    for seed in range(6):
        engine.sampler = Scripted(engine.processor.tokenizer, ["<think>"], then=engine.sampler)
        params = SamplingParams(max_tokens=24, temperature=1, seed=seed,
                                structured_outputs=StructuredOutputsParams(json=DIGIT))
        out = llm.chat([{"role": "user", "content": "think"}], params)[0].outputs[0]
        assert engine.grammars.reasoning_end in out.token_ids, out.token_ids
        assert out.finish_reason == "stop" and json.loads(_reasoning_and_answer(out.text)[1])["n"] in range(10)


PICK = {"type": "function", "function": {"name": "f", "parameters": DIGIT}}


def test_thinking_on_small_max_tokens_and_tool_choice_required_still_give_a_valid_call(client, server, monkeypatch):
    """The model opens <think> and never closes it; max_tokens 48 (the shortest call, [{"name":"f","parameters":
    {"n":0}}], is 34 byte tokens of the tiny vocabulary: 24 cannot hold one): </think> is forced, the call is valid."""
    monkeypatch.setattr(server.llm.engine, "sampler", Scripted(server.llm.engine.processor.tokenizer, ["<think>"],
                                                               then=server.llm.engine.sampler))
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "pick"}], tools=[PICK],
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=48,
                                           temperature=1, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.model_extra["reasoning_content"], choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "f" and json.loads(call.function.arguments)["n"] in range(10)


def test_reasoning_effort_on_llm_chat(ckpt):
    """none: the template's thinking off; low: a 1024-token budget on the request's SamplingParams."""
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004)
    user = [{"role": "user", "content": "hi"}]
    off = llm.chat(user, SamplingParams(max_tokens=1), reasoning_effort="none")[0]
    assert off.prompt.endswith("<think></think>\n")
    on = llm.chat(user, SamplingParams(max_tokens=1), reasoning_effort="low")[0]
    assert on.prompt.endswith("<|assistant|>\n") and not on.prompt.endswith("</think>\n")
    with pytest.raises(Glm45vError, match="reasoning_effort='huge'"):
        llm.chat(user, reasoning_effort="huge")


def test_a_thinking_budget_alone_caps_the_reasoning_of_a_plain_request(ckpt):
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004)
    engine = llm.engine
    engine.sampler = Scripted(engine.processor.tokenizer, ["<think>"], then=engine.sampler)
    out = llm.chat([{"role": "user", "content": "think"}], SamplingParams(
        max_tokens=30, temperature=1, seed=1, ignore_eos=True, thinking_token_budget=3))[0].outputs[0]
    assert out.token_ids[4] == engine.grammars.reasoning_end, out.token_ids
    engine.sampler = engine.sampler.then
    out = llm.chat([{"role": "user", "content": "no thinking"}], SamplingParams(
        max_tokens=30, temperature=1, seed=1, thinking_token_budget=0))[0].outputs[0]
    assert engine.grammars.think_open not in out.token_ids


def test_llm_chat_gives_parsed_tool_calls(ckpt):
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004)
    llm.engine.sampler = Scripted(llm.engine.processor.tokenizer, CALL)
    out = llm.chat([{"role": "user", "content": "weather?"}], SamplingParams(max_tokens=200), tools=TOOLS)[0]
    c = out.outputs[0]
    assert [(t.name, json.loads(t.arguments)) for t in c.tool_calls] == [
        ("get_weather", {"city": "Paris 北京", "days": 3, "metric": True}), ("search", {"q": "42"})]
    assert c.text.startswith("Sure, checking.\n<tool_call>get_weather")


# --- the tool turns render as GLM-4.5V's own template renders them -------------------------------------------------


def test_a_tool_exchange_renders_as_the_real_template_does(ckpt):
    from transformers import AutoTokenizer

    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                               "arguments": '{"city": "Paris", "days": 3}'}},
             {"id": "call_2", "type": "function", "function": {"name": "search", "arguments": '{"q": "rain"}'}}]
    messages = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "no rain"}]},
                {"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": "thanks <|user|>"}]
    reference = json.loads(json.dumps(messages))  # what the template expects: arguments as objects, text as text
    for call in reference[2]["tool_calls"]:
        call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    reference[4]["content"] = "no rain"
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template == CHAT_TEMPLATE
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004)
    for kwargs in ({}, {"enable_thinking": False}):
        enc = llm.engine.processor.encode({"messages": messages, "tools": TOOLS, "chat_template_kwargs": kwargs})
        want = tok.apply_chat_template(reference, tools=TOOLS, chat_template=CHAT_TEMPLATE, tokenize=False,
                                       add_generation_prompt=True, **kwargs)
        assert enc.prompt == want
        assert ("<|assistant|>\n<think></think>\nLet me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
                "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
                "<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>rain</arg_value>\n</tool_call>"
                "<|observation|>\n<tool_response>\nsunny, 21 C\n</tool_response>\n<tool_response>\nno rain\n"
                "</tool_response><|assistant|>\n<think></think>\nIt is sunny.<|user|>\nthanks") in want
        # the user's "<|user|>" stays text; everything else is the template's tokens
        head = want[: want.rindex("thanks")] + "thanks "
        assert enc.token_ids[: len(tok.encode(head, add_special_tokens=False))] == tok.encode(head,
                                                                                           add_special_tokens=False)
        assert enc.token_ids.count(TOKEN_IDS["<|user|>"]) == 2


# --- the engine: preemption, n > 1, the Python API, the repaired string rule --------------------------------------


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 4},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 500}},
          "required": ["name", "tags", "n"], "additionalProperties": False}


def test_grammars_survive_preemption_and_each_sequence_has_its_own(ckpt):
    requests = [{"messages": [{"role": "user", "content": f"item {i} " * (i + 1)}]} for i in range(6)]
    params = SamplingParams(n=2, max_tokens=80, temperature=1, seed=5, structured_outputs=StructuredOutputsParams(
        json=SCHEMA))
    roomy = LLM(ckpt, block_size=4, kv_cache_gib=0.004).generate(requests, params, enable_thinking=False)
    tight = LLM(ckpt, block_size=4, kv_cache_gib=0.0003, max_num_batched_tokens=64)
    crowded = tight.generate(requests, params, enable_thinking=False)
    assert tight.stats().preemptions > 0
    for a, b in zip(roomy, crowded):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        for c in b.outputs:
            jsonschema.validate(json.loads(c.text), SCHEMA)
        assert a.outputs[0].text != a.outputs[1].text


def test_regex_choice_and_grammar_through_sampling_params(ckpt):
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004)
    cases = [(StructuredOutputsParams(regex=r"\d{3}-[a-z]{2}"), lambda t: len(t) == 6 and t[:3].isdigit()),
             (StructuredOutputsParams(choice=["left", "right", 'say "hi"']), lambda t: t in ("left", "right", 'say "hi"')),
             (StructuredOutputsParams(grammar='root ::= "(" [0-9]+ ")"'), lambda t: t[0] == "(" and t[-1] == ")"),
             (StructuredOutputsParams(json=json.dumps(SCHEMA)), lambda t: jsonschema.validate(json.loads(t), SCHEMA)
              is None)]
    for spec, ok in cases:
        for out in llm.generate(["a", "bb", "ccc"], SamplingParams(max_tokens=60, temperature=1, seed=1,
                                                                   structured_outputs=spec)):
            assert ok(out.outputs[0].text), (spec, out.outputs[0].text)


def test_strings_refuse_control_characters_and_surrogates(ckpt):
    """xgrammar 0.2.9's own rule lets raw control characters into length-bound strings and surrogate bytes into all
    strings; ours refuses both and still takes escapes and any other character."""
    import xgrammar as xgr

    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004)
    grammars = llm.engine.grammars
    info = xgr.TokenizerInfo.from_huggingface(llm.engine.processor.tokenizer, vocab_size=288)
    to_byte = {bytes(v)[0]: i for i, v in enumerate(info.decoded_vocab) if len(v) == 1}  # byte-level vocab
    assert len(to_byte) == 256

    def takes(schema, data: bytes) -> bool:
        state = grammars.state(grammars.prepare(StructuredOutputsParams(json=schema), [1]), 1000, SamplingParams())
        return state.advance([to_byte[b] for b in data])

    for schema in ({"type": "string"}, {"type": "string", "maxLength": 5}):
        assert not takes(schema, b'"a\x01')
        assert not takes(schema, b'"a\xed\xa0\x80')  # U+D800 as UTF-8 bytes
        assert takes(schema, '"é\\n\\u00e9\U0001f600"'.encode())
    texts = [o.outputs[0].text for o in llm.generate(
        [f"p{i}" for i in range(40)], SamplingParams(max_tokens=40, temperature=1, seed=9, structured_outputs=
                                                     StructuredOutputsParams(json={"type": "string", "maxLength": 8})))]
    assert all(isinstance(json.loads(t), str) for t in texts)


def test_bad_structured_outputs_are_named():
    with pytest.raises(Glm45vError, match="exactly one of"):
        StructuredOutputsParams(json={"type": "object"}, regex="x")
    with pytest.raises(Glm45vError, match=r"structured_outputs.json=.*not a valid JSON schema"):
        StructuredOutputsParams(json={"type": 3})
    with pytest.raises(Glm45vError, match=r"structured_outputs.choice"):
        StructuredOutputsParams(choice=[])


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    ({"tools": TOOLS, "guided_regex": "a+"}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a+", "jsn": {}}}, "structured_outputs.jsn"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, None),
])
def test_bad_tool_and_format_requests_get_a_400_naming_the_field(server, body, param):
    import httpx

    payload = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **body}
    r = httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    if param is None:
        assert "messages[0].tool_calls[0].function.arguments: not valid JSON" in error["message"]


@pytest.mark.parametrize("text, content, names", [
    ("I will.<tool_call>nope\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call> done",
     "I will.<tool_call>nope\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call> done", []),
    ("<tool_call>nope</tool_call>x<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>1</arg_value>\n</tool_call>"
     "<tool_call>other\n</tool_call>", "<tool_call>nope</tool_call>x", ["search"]),
    ("a<tool_call>nope\n<arg_key>q", "a<tool_call>nope\n<arg_key>q", []),
])
def test_a_call_to_an_undeclared_function_stays_text_whole_and_streamed(text, content, names):
    from glm45v_npu.engine.tool_calls import ToolCallStream, parse_tool_calls

    tools = {"search": {"type": "object", "properties": {"q": {"type": "string"}}}}
    whole, calls = parse_tool_calls(text, tools)
    assert (whole, [c.name for c in calls]) == (content, names)
    stream, streamed, headers = ToolCallStream(tools), "", []
    for ch in text:
        piece, deltas = stream.feed(ch)
        streamed += piece
        headers += [d.name for d in deltas if d.name]
    piece, deltas = stream.flush()
    streamed += piece
    headers += [d.name for d in deltas if d.name]
    assert (streamed, headers) == (content, names)
