"""The Responses API (POST /v1/responses) with the official openai client on the tiny random model: whole and
streamed (the typed events the client parses), parse with a pydantic model, previous_response_id, a function call
and its output, reasoning as a reasoning item, stored responses, and bad input named."""

import httpx
import jsonschema
import pytest

from glm45v_npu import LLM
from tests.serving import Server, record_prompts, script
from tests.tiny import make_vl_checkpoint

MODEL = "glm45v-test"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("responses")
    make_vl_checkpoint(path, seed=23)
    srv = Server(LLM(path, block_size=4, kv_cache_gib=0.01, max_num_seqs=8))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture()
def prompts(server, monkeypatch):
    return record_prompts(server.llm, monkeypatch)


@pytest.fixture()
def sampled(server):
    """The model's own sampler back after a scripted test."""
    sampler = server.llm.engine.sampler
    yield
    server.llm.engine.sampler = sampler


def test_create_whole_and_streamed_agree_and_reasoning_is_an_item(client, server, sampled):
    script(server.llm, "<think>", "hmm, rain", "</think>", "It rains in ", "Oslo", ".")
    whole = client.responses.create(model=MODEL, input="Weather in Oslo?", instructions="Be brief.",
                                    max_output_tokens=40)
    assert whole.status == "completed" and whole.output_text == "It rains in Oslo."
    reasoning, message = whole.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "hmm, rain"
    assert message.type == "message" and message.role == "assistant"
    assert whole.usage.output_tokens == len(server.llm.engine.sampler.script)
    assert 0 < whole.usage.output_tokens_details.reasoning_tokens < whole.usage.output_tokens
    events = list(client.responses.create(model=MODEL, input="Weather in Oslo?", max_output_tokens=40, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for k in ("response.output_item.added", "response.reasoning_text.delta", "response.content_part.added",
              "response.output_text.delta", "response.output_text.done", "response.output_item.done"):
        assert k in kinds, k
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text == "It rains in Oslo."
    with client.responses.stream(model=MODEL, input="Weather in Oslo?", max_output_tokens=40) as stream:
        assert stream.get_final_response().output_text == "It rains in Oslo."


def test_parse_with_a_pydantic_model_thinking_on_and_off(client):
    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        city: str = Field(max_length=12)
        rain: bool

    for seed, extra in [(0, {}), (2, {"reasoning": {"effort": "none"}})]:
        r = client.responses.parse(model=MODEL, input="Rain in Oslo?", text_format=Forecast, temperature=1,
                                   max_output_tokens=120, extra_body={"seed": seed}, **extra)
        assert isinstance(r.output_parsed, Forecast), r.output_text


def test_previous_response_id_continues_the_conversation(client, server, prompts, sampled):
    script(server.llm, "Paris is the capital.")
    first = client.responses.create(model=MODEL, input="Capital of France?", max_output_tokens=40)
    script(server.llm, "About 2 million.")
    second = client.responses.create(model=MODEL, input="How many live there?", previous_response_id=first.id,
                                     max_output_tokens=40)
    assert second.previous_response_id == first.id and second.output_text == "About 2 million."
    assert "Capital of France?" in prompts[-1] and "Paris is the capital." in prompts[-1]
    assert client.responses.retrieve(second.id).output_text == "About 2 million."
    unstored = client.responses.create(model=MODEL, input="x", store=False, max_output_tokens=5)
    assert httpx.get(f"{server.url}/v1/responses/{unstored.id}").status_code == 404
    client.responses.delete(first.id)
    assert httpx.get(f"{server.url}/v1/responses/{first.id}").status_code == 404


@pytest.mark.parametrize("effort", [None, "none"], ids=["thinking on (the default)", "thinking off"])
def test_a_function_call_and_its_output_round_trip(client, prompts, effort):
    extra = {"reasoning": {"effort": effort}} if effort else {}
    r = client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                parallel_tool_calls=False, temperature=1, max_output_tokens=200, **extra)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    import json

    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    follow = client.responses.create(model=MODEL, previous_response_id=r.id, tools=[WEATHER], max_output_tokens=8,
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": "sunny, 21 C"}], **extra)
    assert follow.status in ("completed", "incomplete")
    assert "sunny, 21 C" in prompts[-1] and "<tool_response>" in prompts[-1]
    # the whole exchange sent again as items, without the store
    again = client.responses.create(model=MODEL, tools=[WEATHER], max_output_tokens=4, store=False, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "rain"}], **extra)
    assert again.status in ("completed", "incomplete") and "rain" in prompts[-1]


def test_images_as_input_image_parts(client, server):
    from tests.serving import data_uri
    from tests.tiny import random_image

    image = data_uri(random_image(120, 90, 3))
    r = client.responses.create(model=MODEL, max_output_tokens=4, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": image}, {"type": "input_text", "text": "what is it?"}]}])
    plain = client.responses.create(model=MODEL, max_output_tokens=4, input="what is it?")
    chat = client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "what is it?"}]}])
    assert r.usage.input_tokens == chat.usage.prompt_tokens > plain.usage.input_tokens + 2  # the image's tokens


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"input": [{"type": "function_call_output", "call_id": "call_nope", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"type": "web_search_call", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0].image_url"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "file:///etc/passwd"}]}]},
     "input[0].content[0].image_url"),  # the media policy's refusal, named as the input part
])
def test_bad_input_is_a_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/responses", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
