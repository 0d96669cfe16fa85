"""The stand-in speaks OpenAI's API: the official SDK works against it and every payload matches
OpenAI's published schemas."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from services.standin import StandinConfig, StandinServer, count_tokens, run_in_thread
from tests.openai_schema import validate, validate_sse_event

USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a credit pack?"}]
USER_WORDS = "What is a credit pack?".split()
PROMPT_TOKENS = count_tokens("Be brief.") + len(USER_WORDS)


async def test_models_list_and_retrieve(client: AsyncOpenAI) -> None:
    raw = await client.models.with_raw_response.list()
    body = raw.http_response.json()
    validate("ListModelsResponse", body)
    ids = {m["id"] for m in body["data"]}
    assert {"gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "dall-e-3"} <= ids

    page = await client.models.list()
    assert {m.id for m in page.data} == ids

    raw_model = await client.models.with_raw_response.retrieve("gpt-4o-mini")
    validate("Model", raw_model.http_response.json())
    assert raw_model.parse().id == "gpt-4o-mini"


async def test_chat_completion(client: AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER)
    body = raw.http_response.json()
    validate("CreateChatCompletionResponse", body)
    assert raw.http_response.headers["x-request-id"]

    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == " ".join(["Stand-in", "reply:", *USER_WORDS])
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == PROMPT_TOKENS
    assert completion.usage.completion_tokens == 2 + len(USER_WORDS)
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


async def test_chat_completion_is_deterministic(client: AsyncOpenAI) -> None:
    first = await client.chat.completions.create(model="gpt-4o", messages=USER)
    second = await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.id != second.id


@pytest.mark.parametrize("limit_param", ["max_tokens", "max_completion_tokens"])
async def test_chat_completion_honours_token_limit(client: AsyncOpenAI, limit_param: str) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=USER,
        **{limit_param: 3},
    )
    validate("CreateChatCompletionResponse", raw.http_response.json())
    completion = raw.parse()
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "Stand-in reply: What"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3


async def test_chat_completion_with_several_choices_and_content_parts(client: AsyncOpenAI) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "one two"}, {"type": "text", "text": "three"}]}
    ]
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages, n=2)
    validate("CreateChatCompletionResponse", raw.http_response.json())
    completion = raw.parse()
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.choices[1].message.content == "Stand-in reply: one two three"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3
    assert completion.usage.completion_tokens == 2 * 5


async def test_chat_stream_raw_events_match_schema(client: AsyncOpenAI) -> None:
    async with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.http_response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([part async for part in response.http_response.aiter_bytes()]).decode()

    events = raw.split("\n\n")
    assert events[-1] == ""  # every event ends in a blank line
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        payloads.append(event[len("data: ") :])
    assert payloads[-1] == "[DONE]"
    chunks = [validate_sse_event(p) for p in payloads[:-1]]
    assert all(c is not None for c in chunks)
    *content_chunks, usage_chunk = [c for c in chunks if c is not None]

    assert content_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["usage"] is None for c in content_chunks)
    assert len({c["id"] for c in chunks if c is not None}) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content_chunks)
    assert text == " ".join(["Stand-in", "reply:", *USER_WORDS])
    assert content_chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert usage_chunk["usage"]["completion_tokens"] == 2 + len(USER_WORDS)
    assert usage_chunk["usage"]["total_tokens"] == PROMPT_TOKENS + 2 + len(USER_WORDS)


async def test_chat_stream_through_sdk(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=4,
    )
    async with stream:
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Stand-in reply: What is"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_chat_stream_without_usage_has_no_usage_field(http: httpx.AsyncClient) -> None:
    body = {"model": "gpt-4o-mini", "messages": USER, "stream": True}
    async with http.stream("POST", "/chat/completions", json=body) as response:
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = validate_sse_event(line.removeprefix("data: "))
        assert chunk is not None
        assert "usage" not in chunk
        assert len(chunk["choices"]) == 1


async def test_embeddings_float(client: AsyncOpenAI) -> None:
    raw = await client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["first text", "second"], encoding_format="float"
    )
    body = raw.http_response.json()
    validate("CreateEmbeddingResponse", body)
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 1536 for d in body["data"])
    assert body["data"][0]["embedding"] != body["data"][1]["embedding"]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


async def test_embeddings_base64_matches_float(client: AsyncOpenAI) -> None:
    as_float = await client.embeddings.create(
        model="text-embedding-3-small", input="same text", encoding_format="float", dimensions=8
    )
    raw = await client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="same text", encoding_format="base64", dimensions=8
    )
    body = raw.http_response.json()
    encoded = body["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = list(struct.unpack("<8f", base64.b64decode(encoded)))
    # The schema describes the float form; base64 is the same vector packed as float32.
    validate("CreateEmbeddingResponse", {**body, "data": [{**body["data"][0], "embedding": decoded}]})
    assert decoded == as_float.data[0].embedding

    # Without encoding_format the SDK asks for base64 itself and decodes it.
    default = await client.embeddings.create(model="text-embedding-3-small", input="same text", dimensions=8)
    assert list(default.data[0].embedding) == pytest.approx(as_float.data[0].embedding)


async def test_embeddings_accept_token_arrays(client: AsyncOpenAI) -> None:
    result = await client.embeddings.create(
        model="text-embedding-3-large", input=[[1, 2, 3], [4, 5]], encoding_format="float"
    )
    assert [len(d.embedding) for d in result.data] == [3072, 3072]
    assert result.usage.prompt_tokens == 5


async def test_images_url(client: AsyncOpenAI, standin: StandinServer) -> None:
    raw = await client.images.with_raw_response.generate(model="dall-e-3", prompt="a red bicycle")
    body = raw.http_response.json()
    validate("ImagesResponse", body)
    image = body["data"][0]
    assert image["revised_prompt"] == "a red bicycle"
    assert image["url"].startswith(standin.url)
    async with httpx.AsyncClient() as plain:
        png = await plain.get(image["url"])
    assert png.status_code == 200
    assert png.content.startswith(b"\x89PNG")


async def test_images_b64(client: AsyncOpenAI) -> None:
    raw = await client.images.with_raw_response.generate(
        model="dall-e-3", prompt="a red bicycle", response_format="b64_json"
    )
    validate("ImagesResponse", raw.http_response.json())
    result = raw.parse()
    assert result.data is not None
    assert result.data[0].b64_json is not None
    assert base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG")

    gpt_image = await client.images.with_raw_response.generate(
        model="gpt-image-1", prompt="a red bicycle", n=2
    )
    body = gpt_image.http_response.json()
    validate("ImagesResponse", body)
    assert len(body["data"]) == 2
    assert body["usage"]["input_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat/completions", {"messages": USER}, "model"),
        ("/chat/completions", {"model": "gpt-4o-mini"}, "messages"),
        ("/chat/completions", {"model": "gpt-4o-mini", "messages": []}, "messages"),
        ("/chat/completions", {"model": "gpt-4o-mini", "messages": [{"content": "x"}]}, "messages[0]"),
        ("/chat/completions", {"model": "gpt-4o-mini", "messages": USER, "max_tokens": 0}, "max_tokens"),
        (
            "/chat/completions",
            {"model": "gpt-4o-mini", "messages": USER, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ("/embeddings", {"input": "x"}, "model"),
        ("/embeddings", {"model": "text-embedding-3-small"}, "input"),
        ("/embeddings", {"model": "text-embedding-3-small", "input": ""}, "input"),
        ("/images/generations", {"model": "dall-e-3"}, "prompt"),
    ],
)
async def test_malformed_requests_get_openai_400(
    http: httpx.AsyncClient, path: str, body: dict[str, object], param: str
) -> None:
    response = await http.post(path, json=body)
    assert response.status_code == 400
    error = response.json()
    validate("ErrorResponse", error)
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == param


async def test_malformed_request_through_sdk(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert caught.value.param == "messages"


async def test_invalid_json_and_unknown_route(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    validate("ErrorResponse", response.json())

    response = await http.get("/nothing-here")
    assert response.status_code == 404
    validate("ErrorResponse", response.json())

    response = await http.get("/chat/completions")
    assert response.status_code == 405
    validate("ErrorResponse", response.json())


async def test_bearer_header_is_required(standin: StandinServer) -> None:
    async with httpx.AsyncClient(base_url=standin.base_url) as plain:
        response = await plain.get("/models")
        assert response.status_code == 401
        validate("ErrorResponse", response.json())
        response = await plain.get("/models", headers={"Authorization": "Bearer any-key-at-all"})
        assert response.status_code == 200


async def test_configured_key_is_enforced() -> None:
    with run_in_thread(StandinConfig(api_key="sk-right")) as server:
        async with AsyncOpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as caught:
                await wrong.models.list()
            assert caught.value.code == "invalid_api_key"
        async with AsyncOpenAI(base_url=server.base_url, api_key="sk-right", max_retries=0) as right:
            assert (await right.models.list()).data


async def test_auth_can_be_switched_off() -> None:
    with run_in_thread(StandinConfig(require_auth=False)) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as plain:
            response = await plain.post("/chat/completions", json={"model": "gpt-4o-mini", "messages": USER})
    assert response.status_code == 200
    validate("CreateChatCompletionResponse", response.json())


async def test_stats_count_requests_per_endpoint(fresh_standin: StandinServer) -> None:
    async with AsyncOpenAI(base_url=fresh_standin.base_url, api_key="sk-seen", max_retries=0) as c:
        await c.models.list()
        await c.chat.completions.create(model="gpt-4o-mini", messages=USER)
        stream = await c.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
        async with stream:
            _ = [chunk async for chunk in stream]
        await c.embeddings.create(model="text-embedding-3-small", input="x")
        await c.images.generate(model="dall-e-3", prompt="x")
        with pytest.raises(openai.InternalServerError):
            await c.chat.completions.create(model="standin-fail-500", messages=USER)

    async with httpx.AsyncClient(base_url=fresh_standin.url) as plain:
        stats = (await plain.get("/_standin/stats")).json()
        assert stats["requests"] == {
            "models": 1,
            "chat.completions": 3,
            "embeddings": 1,
            "images.generations": 1,
        }
        assert stats["total"] == 6
        assert stats["by_model"]["gpt-4o-mini"] == 2
        assert stats["by_status"] == {"200": 5, "500": 1}
        assert stats["streams"]["started"] == stats["streams"]["completed"] == 1
        last = stats["recent"][-1]
        assert last["endpoint"] == "chat.completions"
        assert last["model"] == "standin-fail-500"
        assert last["api_key"] == "sk-seen"
        assert last["body"]["messages"] == USER

        assert (await plain.post("/_standin/reset")).status_code == 200
        stats = (await plain.get("/_standin/stats")).json()
        assert stats["total"] == 0
        assert stats["requests"] == {}
        assert (await plain.get("/healthz")).json() == {"status": "ok"}


def test_stats_endpoint_returns_valid_json(standin: StandinServer) -> None:
    response = httpx.get(f"{standin.url}/_standin/stats")
    assert response.status_code == 200
    assert set(json.loads(response.content)) >= {"total", "requests", "streams"}
