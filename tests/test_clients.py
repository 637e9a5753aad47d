"""The agent frameworks people build with, against `glm45v serve` on the tiny random model (issue 31): the official
openai client, langchain-openai, pydantic-ai, the OpenAI Agents SDK, litellm and instructor, each over the cells
{plain, stream, image, tools required, named tool, tools + tool result turn, json_schema, parse helper,
tools + schema, Responses API} with thinking on (the template's default) and off. The model is random: only the
server's guarantees make a cell pass. A cell a library does not have, or cannot be guaranteed by design, is
skipped with the reason (NOT_A_CELL). The libraries are pinned in the `clients` extra (.ci/run installs it)."""

import asyncio
import base64
import io
import json
import os
from typing import Annotated

import jsonschema
import pytest
from pydantic import BaseModel, Field

from glm45v_npu import LLM
from tests.serving import Server
from tests.tiny import make_vl_checkpoint, random_image

pytestmark = pytest.mark.slow
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm fetches a price list at import otherwise
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")
MODEL = "glm45v-test"
CELLS = ["plain", "stream", "image", "tools required", "named tool", "tools + tool result turn", "json_schema",
         "parse helper", "tools + schema", "Responses API"]
PROMPT_ONLY = "prompt-only JSON (the schema is only in the prompt): the server can hold it to JSON, not to the fields"
NOT_A_CELL = {
    ("pydantic-ai", "named tool"): "pydantic-ai has no named tool_choice",
    ("pydantic-ai", "parse helper"): "its parse path is NativeOutput (the json_schema cell); PromptedOutput is " + PROMPT_ONLY,
    ("openai-agents", "parse helper"): "the SDK's output_type is its only structured output (the json_schema cell)",
    ("litellm", "parse helper"): "litellm has no parse helper; response_format=Model is the json_schema cell",
    ("instructor", "plain"): "instructor exists to return a model: see json_schema and named tool",
    ("instructor", "tools required"): "instructor's TOOLS mode names its function: the named tool cell",
    ("instructor", "tools + tool result turn"): "instructor runs no tools",
    ("instructor", "tools + schema"): "instructor uses tools or a schema as its mode, never both",
    ("instructor", "parse helper"): "Mode.JSON is " + PROMPT_ONLY,
}


class Forecast(BaseModel):
    city: str = Field(max_length=12)
    rain: bool


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                  "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": WEATHER_SCHEMA}}
STRICT_WEATHER = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "forecast", "strict": True,
                                                             "schema": Forecast.model_json_schema()}}


def room(extra: dict) -> int:
    """max_tokens: with thinking on, the answer keeps half of it after a forced </think>. A reply that holds a
    12-character string of random characters takes up to ~100 byte tokens of the tiny vocabulary (a character is
    1-4 bytes, an escape 6), above the shortest answer the server reserves: a random model needs the room."""
    return 250 if extra else 400


def get_weather(city: Annotated[str, Field(max_length=12)]) -> str:
    """Weather in a city."""
    return "sunny"
# (A random model fills an unbounded string until max_tokens: every schema here bounds its strings.)


def image_uri() -> str:
    buf = io.BytesIO()
    random_image(64, 48, 2).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_bytes() -> bytes:
    return base64.b64decode(image_uri().split(",", 1)[1])


def valid_call(name: str, arguments) -> None:
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments) if isinstance(arguments, str) else arguments, WEATHER_SCHEMA)


def forecast_or_calls(parsed, calls) -> None:
    if calls:
        for name, args in calls:
            valid_call(name, args)
    else:
        assert isinstance(parsed, Forecast), parsed


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    path = tmp_path_factory.mktemp("clients")
    make_vl_checkpoint(path, seed=31)
    srv = Server(LLM(path, block_size=4, kv_cache_gib=0.02, max_num_seqs=16))
    yield srv.url
    srv.stop()


# --- the official openai client -----------------------------------------------------------------------------------

def openai_cells(url: str, extra: dict) -> dict:
    from openai import OpenAI

    c = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    base = dict(model=MODEL, temperature=1, max_tokens=room(extra), extra_body=extra)
    ask = [{"role": "user", "content": "weather in Oslo?"}]

    def plain():
        r = c.chat.completions.create(messages=ask, **base)
        assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")

    def stream():
        parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(messages=ask, stream=True, **base)
                 if ch.choices]
        assert isinstance("".join(parts), str) and len(parts) > 1

    def image():
        content = [{"type": "image_url", "image_url": {"url": image_uri()}}, {"type": "text", "text": "what?"}]
        assert c.chat.completions.create(messages=[{"role": "user", "content": content}], **base).usage.prompt_tokens

    def required():
        r = c.chat.completions.create(messages=ask, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                      **base)
        (call,) = r.choices[0].message.tool_calls
        valid_call(call.function.name, call.function.arguments)

    def named():
        r = c.chat.completions.create(messages=ask, tools=[WEATHER], **base,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
        (call,) = r.choices[0].message.tool_calls
        valid_call(call.function.name, call.function.arguments)

    def result_turn():
        turns = [*ask, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
        r = c.chat.completions.create(messages=turns, tools=[WEATHER], **base)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")

    def json_schema():
        r = c.chat.completions.create(messages=ask, response_format=JSON_SCHEMA_FORMAT, **base)
        Forecast.model_validate_json(r.choices[0].message.content)

    def parse():
        r = c.chat.completions.parse(messages=ask, response_format=Forecast, **base)
        assert isinstance(r.choices[0].message.parsed, Forecast)

    def tools_schema():
        m = c.chat.completions.parse(messages=ask, response_format=Forecast, tools=[STRICT_WEATHER],
                                     parallel_tool_calls=False,
                                     **base).choices[0].message
        forecast_or_calls(m.parsed, [(t.function.name, t.function.arguments) for t in m.tool_calls or []])

    def responses():
        rbase = dict(model=MODEL, temperature=1, max_output_tokens=room(extra), extra_body=extra)
        assert c.responses.create(input="weather in Oslo?", **rbase).status in ("completed", "incomplete")
        assert isinstance(c.responses.parse(input="weather?", text_format=Forecast, **rbase).output_parsed, Forecast)

    return dict(zip(CELLS, [plain, stream, image, required, named, result_turn, json_schema, parse, tools_schema,
                            responses]))


# --- langchain-openai ---------------------------------------------------------------------------------------------

def langchain_cells(url: str, extra: dict) -> dict:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    def llm(**kw):
        return ChatOpenAI(model=MODEL, base_url=url + "/v1", api_key="none", temperature=1, max_tokens=room(extra),
                          max_retries=0, extra_body=extra, **kw)

    def plain():
        assert isinstance(llm().invoke("weather in Oslo?").content, str)

    def stream():
        chunks = list(llm().stream("weather in Oslo?"))
        assert len(chunks) > 1

    def image():
        content = [{"type": "image_url", "image_url": {"url": image_uri()}}, {"type": "text", "text": "what?"}]
        assert isinstance(llm().invoke([HumanMessage(content=content)]).content, str)

    def calls(choice):
        m = llm().bind_tools([WEATHER], tool_choice=choice, parallel_tool_calls=False).invoke("weather in Oslo?")
        assert m.tool_calls and not m.invalid_tool_calls, m
        for call in m.tool_calls:
            valid_call(call["name"], call["args"])

    def result_turn():
        turns = [HumanMessage("weather in Oslo?"),
                 AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Oslo"}, "id": "call_1"}]),
                 ToolMessage("sunny", tool_call_id="call_1")]
        assert llm().bind_tools([WEATHER]).invoke(turns) is not None

    def json_schema():
        m = llm().bind(response_format=JSON_SCHEMA_FORMAT).invoke("weather in Oslo?")
        Forecast.model_validate_json(m.content)

    def parse():
        assert isinstance(llm().with_structured_output(Forecast).invoke("weather in Oslo?"), Forecast)

    def tools_schema():
        m = llm().bind_tools([STRICT_WEATHER], response_format=Forecast, strict=True,
                             parallel_tool_calls=False).invoke("weather in Oslo?")
        forecast_or_calls(m.additional_kwargs.get("parsed"), [(t["name"], t["args"]) for t in m.tool_calls])

    def responses():
        r = llm(use_responses_api=True)
        assert r.invoke("weather in Oslo?") is not None
        assert isinstance(r.with_structured_output(Forecast).invoke("weather in Oslo?"), Forecast)

    return dict(zip(CELLS, [plain, stream, image, lambda: calls("any"), lambda: calls("get_weather"), result_turn,
                            json_schema, parse, tools_schema, responses]))


# --- pydantic-ai --------------------------------------------------------------------------------------------------

def pydantic_ai_cells(url: str, extra: dict) -> dict:
    from pydantic_ai import Agent, BinaryContent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.usage import UsageLimits

    provider = OpenAIProvider(base_url=url + "/v1", api_key="none")
    chat, resp = OpenAIChatModel(MODEL, provider=provider), OpenAIResponsesModel(MODEL, provider=provider)
    settings = {"max_tokens": room(extra), "temperature": 1, "extra_body": extra}
    limits = UsageLimits(request_limit=12)

    def run(agent, prompt="weather in Oslo?"):
        return agent.run_sync(prompt, model_settings=settings, usage_limits=limits).output

    def stream():
        async def go():
            async with Agent(chat).run_stream("weather in Oslo?", model_settings=settings) as r:
                return [t async for t in r.stream_text(delta=True)]
        assert isinstance("".join(asyncio.run(go())), str)

    return {
        "plain": lambda: isinstance(run(Agent(chat)), str) or pytest.fail("no text"),
        "stream": stream,
        "image": lambda: run(Agent(chat), ["what?", BinaryContent(data=image_bytes(), media_type="image/png")]),
        "tools required": lambda: forecast_or_calls(run(Agent(chat, output_type=Forecast)), []),
        "tools + tool result turn": lambda: forecast_or_calls(run(Agent(chat, output_type=Forecast,
                                                                        tools=[get_weather])), []),
        "json_schema": lambda: forecast_or_calls(run(Agent(chat, output_type=NativeOutput(Forecast))), []),
        "tools + schema": lambda: forecast_or_calls(run(Agent(chat, output_type=NativeOutput(Forecast),
                                                              tools=[get_weather])), []),
        "Responses API": lambda: forecast_or_calls(run(Agent(resp, output_type=NativeOutput(Forecast),
                                                             tools=[get_weather])), []),
    }


# --- the OpenAI Agents SDK ----------------------------------------------------------------------------------------

def agents_cells(url: str, extra: dict) -> dict:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_default_openai_api,
        set_default_openai_client,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    chat = OpenAIChatCompletionsModel(model=MODEL, openai_client=client)
    tool = function_tool(get_weather)

    def settings(**kw):
        return ModelSettings(**{"max_tokens": room(extra), "temperature": 1, "extra_body": extra, **kw})

    def run(agent, prompt="weather in Oslo?"):
        return Runner.run_sync(agent, prompt, max_turns=8).final_output

    def stream():
        async def go():
            r = Runner.run_streamed(Agent(name="a", model=chat, model_settings=settings()), "weather in Oslo?")
            async for _ in r.stream_events():
                pass
            return r.final_output
        assert isinstance(asyncio.run(go()), str)

    def image():
        items = [{"role": "user", "content": [{"type": "input_image", "image_url": image_uri()},
                                              {"type": "input_text", "text": "what?"}]}]
        assert isinstance(run(Agent(name="a", model=chat, model_settings=settings()), items), str)

    def forced(choice):
        agent = Agent(name="a", model=chat, tools=[tool], tool_use_behavior="stop_on_first_tool",
                      model_settings=settings(tool_choice=choice, parallel_tool_calls=False))
        assert run(agent) == "sunny"  # the tool ran: its output is the final output

    def responses():
        set_default_openai_client(client, use_for_tracing=False)
        set_default_openai_api("responses")  # the SDK's default model path
        agent = Agent(name="a", model=MODEL, tools=[tool], tool_use_behavior="stop_on_first_tool",
                      model_settings=settings(tool_choice="required", parallel_tool_calls=False))
        assert run(agent) == "sunny"
        typed = Agent(name="b", model=MODEL, tools=[tool], output_type=Forecast, model_settings=settings())
        assert isinstance(run(typed), Forecast)

    return {
        "plain": lambda: isinstance(run(Agent(name="a", model=chat, model_settings=settings())), str)
        or pytest.fail("no text"),
        "stream": stream, "image": image,
        "tools required": lambda: forced("required"), "named tool": lambda: forced("get_weather"),
        "tools + tool result turn": lambda: run(Agent(name="a", model=chat, tools=[tool],
                                                      model_settings=settings(tool_choice="required"))),
        "json_schema": lambda: forecast_or_calls(run(Agent(name="a", model=chat, output_type=Forecast,
                                                           model_settings=settings())), []),
        "tools + schema": lambda: forecast_or_calls(run(Agent(name="a", model=chat, output_type=Forecast, tools=[tool],
                                                              model_settings=settings())), []),
        "Responses API": responses,
    }


# --- litellm ------------------------------------------------------------------------------------------------------

def litellm_cells(url: str, extra: dict) -> dict:
    import litellm

    base = dict(model=f"openai/{MODEL}", api_base=url + "/v1", api_key="none", temperature=1, max_tokens=room(extra),
                extra_body=extra)
    ask = [{"role": "user", "content": "weather in Oslo?"}]

    def call_of(r):
        (call,) = r.choices[0].message.tool_calls
        valid_call(call.function.name, call.function.arguments)

    def stream():
        chunks = list(litellm.completion(messages=ask, stream=True, **base))
        assert len(chunks) > 1

    def tools_schema():
        m = litellm.completion(messages=ask, tools=[WEATHER], response_format=Forecast, parallel_tool_calls=False,
                               **base).choices[0].message
        calls = [(t.function.name, t.function.arguments) for t in m.tool_calls or []]
        forecast_or_calls(None if calls else Forecast.model_validate_json(m.content), calls)

    def responses():
        r = litellm.responses(model=f"openai/{MODEL}", input="weather in Oslo?", api_base=url + "/v1", api_key="none",
                              max_output_tokens=room(extra), temperature=1, extra_body=extra)
        assert r.status in ("completed", "incomplete")

    turns = [*ask, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    content = [{"type": "image_url", "image_url": {"url": image_uri()}}, {"type": "text", "text": "what?"}]
    return {
        "plain": lambda: litellm.completion(messages=ask, **base).choices[0].message,
        "stream": stream,
        "image": lambda: litellm.completion(messages=[{"role": "user", "content": content}], **base),
        "tools required": lambda: call_of(litellm.completion(messages=ask, tools=[WEATHER], tool_choice="required",
                                                             parallel_tool_calls=False, **base)),
        "named tool": lambda: call_of(litellm.completion(messages=ask, tools=[WEATHER], **base, tool_choice={
            "type": "function", "function": {"name": "get_weather"}})),
        "tools + tool result turn": lambda: litellm.completion(messages=turns, tools=[WEATHER], **base),
        "json_schema": lambda: Forecast.model_validate_json(litellm.completion(
            messages=ask, response_format=Forecast, **base).choices[0].message.content),
        "tools + schema": tools_schema,
        "Responses API": responses,
    }


# --- instructor ---------------------------------------------------------------------------------------------------

def instructor_cells(url: str, extra: dict) -> dict:
    import instructor
    from openai import OpenAI

    def client(mode):
        return instructor.from_openai(OpenAI(base_url=url + "/v1", api_key="none", max_retries=0), mode=mode)

    base = dict(model=MODEL, temperature=1, max_tokens=room(extra), extra_body=extra, max_retries=0)
    ask = [{"role": "user", "content": "weather in Oslo?"}]

    def made(mode, messages=ask):
        return client(mode).chat.completions.create(response_model=Forecast, messages=messages, **base)

    def stream():
        parts = list(client(instructor.Mode.JSON_SCHEMA).chat.completions.create_partial(
            response_model=Forecast, messages=ask, **base))
        assert parts and isinstance(Forecast.model_validate(parts[-1].model_dump()), Forecast)

    def responses():
        c = client(instructor.Mode.RESPONSES_TOOLS)
        r = c.responses.create(response_model=Forecast, input="weather in Oslo?", model=MODEL, temperature=1,
                               max_output_tokens=room(extra), extra_body=extra, max_retries=0)
        assert isinstance(r, Forecast)

    content = [{"type": "image_url", "image_url": {"url": image_uri()}}, {"type": "text", "text": "what?"}]
    return {
        "stream": stream,
        "image": lambda: forecast_or_calls(made(instructor.Mode.JSON_SCHEMA, [{"role": "user", "content": content}]),
                                           []),
        "named tool": lambda: forecast_or_calls(made(instructor.Mode.TOOLS), []),
        "json_schema": lambda: forecast_or_calls(made(instructor.Mode.JSON_SCHEMA), []),
        "Responses API": responses,
    }


CLIENTS = {"openai": openai_cells, "langchain-openai": langchain_cells, "pydantic-ai": pydantic_ai_cells,
           "openai-agents": agents_cells, "litellm": litellm_cells, "instructor": instructor_cells}
MODULES = {"openai": "openai", "langchain-openai": "langchain_openai", "pydantic-ai": "pydantic_ai",
           "openai-agents": "agents", "litellm": "litellm", "instructor": "instructor"}


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking on", "thinking off"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("library", list(CLIENTS))
def test_matrix(url, library, cell, thinking):
    if (library, cell) in NOT_A_CELL:
        pytest.skip(f"not a cell: {NOT_A_CELL[library, cell]}")
    pytest.importorskip(MODULES[library], reason=f"{library} is not installed (pip install -e '.[clients]')")
    extra = {} if thinking else {"chat_template_kwargs": {"enable_thinking": False}}
    cells = CLIENTS[library](url, extra)
    assert cell in cells, f"{library}: no code for the cell {cell!r} and not listed in NOT_A_CELL"
    cells[cell]()
