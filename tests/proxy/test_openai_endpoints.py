"""The OpenAI surface through the official SDK: shapes validated against OpenAI's schema, the right
credits charged (balance and ledger rows at credits), and credit headers on every answer."""

from __future__ import annotations

from tests.openai_schema import (
    CHAT_COMPLETION,
    CHAT_COMPLETION_CHUNK,
    EMBEDDINGS,
    IMAGES,
    MODEL_LIST,
    validate,
)
from tests.proxy.conftest import Credits


async def test_models_are_listed_free(sdk, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(3)
    raw = await sdk(user).models.with_raw_response.list()
    assert raw.headers["x-credits-charged"] == "0"
    assert raw.headers["x-credits-remaining"] == "3"
    page = raw.parse()
    validate(MODEL_LIST, page.model_dump(mode="json"))
    assert "gpt-4o-mini" in {m.id for m in page.data}
    assert (await credits.account(user))["credits_remaining"] == 3
    assert await credits.usage(user) == []


async def test_chat_plain_is_charged_per_request(sdk, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(10)
    raw = await sdk(user).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello there"}]
    )
    assert raw.http_response.status_code == 200
    validate(CHAT_COMPLETION, raw.http_response.json())
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert raw.headers["x-credits-charged"] == "1"
    assert raw.headers["x-credits-remaining"] == "9"
    assert "x-credits-low" not in raw.headers
    await credits.settled(user, 9, usage_total=1)
    assert await credits.usage(user) == [1]


async def test_chat_stream_forwards_valid_chunks_and_done(sdk, credits: Credits, proxy) -> None:  # type: ignore[no-untyped-def]
    import httpx

    user = await credits.user(4)
    chunks = []
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream(
            "POST",
            f"{proxy.base_url}/chat/completions",
            json={
                "model": "gpt-4o",
                "stream": True,
                "messages": [{"role": "user", "content": "one two three"}],
            },
            headers={"Authorization": "Bearer dev-internal-token", "X-User-Id": user},
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-credits-charged"] == "1"
            assert response.headers["x-credits-remaining"] == "3"
            assert response.headers["x-credits-low"] == "true"
            lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import orjson

    for line in lines[:-1]:
        assert line.startswith("data: ")
        chunk = orjson.loads(line[6:])
        validate(CHAT_COMPLETION_CHUNK, chunk)
        chunks.append(chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.endswith("one two three")
    await credits.settled(user, 3, usage_total=1)

    # The same through the SDK.
    stream = await sdk(user).chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "four five"}]
    )
    got = [chunk async for chunk in stream]
    for chunk in got:
        validate(CHAT_COMPLETION_CHUNK, chunk.model_dump(mode="json", exclude_unset=True))
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices).endswith("four five")
    await credits.settled(user, 2, usage_total=2)


async def test_embeddings_and_images(sdk, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(20)
    client = sdk(user)
    raw = await client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["a b", "c"], encoding_format="float"
    )
    validate(EMBEDDINGS, raw.http_response.json())
    assert len(raw.parse().data) == 2
    assert raw.headers["x-credits-charged"] == "1"
    raw = await client.images.with_raw_response.generate(model="dall-e-3", prompt="a lighthouse")
    validate(IMAGES, raw.http_response.json())
    assert raw.parse().data[0].url
    assert raw.headers["x-credits-charged"] == "5"
    assert raw.headers["x-credits-remaining"] == "14"
    await credits.settled(user, 14, usage_total=6)
    assert sorted(await credits.usage(user)) == [1, 5]
