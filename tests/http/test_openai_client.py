"""The official ``openai`` client, unchanged, against a real kvtier server."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.http.conftest import API_KEY, Server, running_server, server_config

@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="anything", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models_list_and_retrieve(client: openai.OpenAI, model: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert model.startswith("SmolLM2-135M-Instruct")
    assert client.models.retrieve(model).id == model
    # One model served: any name finds it, as llama.cpp's server answers.
    assert client.models.retrieve("gpt-4o").id == model


def test_any_model_name_is_served_by_the_one_model(client: openai.OpenAI, model: str) -> None:
    for name in ("local", "gpt-4o"):
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        assert reply.model == model
    reply = client.completions.create(model="local", prompt="Hi", max_tokens=1)
    assert reply.model == model


def test_chat(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4,
        temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 4
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 4
    assert reply.usage.prompt_tokens_details.cached_tokens >= 0


def test_repeated_stateless_prompt_reports_cached_tokens(client: openai.OpenAI, model: str
                                                          ) -> None:
    messages = [{"role": "system", "content": "You are a terse assistant for tests."},
                {"role": "user", "content": "Name a colour that starts with the letter b."}]
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    second = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    prompt = first.usage.prompt_tokens
    assert second.usage.prompt_tokens == prompt
    # Everything but the last prompt token (decoded again for its logits) is reused.
    assert second.usage.prompt_tokens_details.cached_tokens == prompt - 1


def test_streaming_chat_with_usage(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count: one, two,"}], max_tokens=5,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 5
    # The streamed text is the same as the non-streamed greedy reply.
    whole = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count: one, two,"}], max_tokens=5,
        temperature=0)
    assert text == whole.choices[0].message.content


def test_streaming_without_usage_has_no_usage_chunk(client: openai.OpenAI, model: str) -> None:
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True))
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)


def test_completions(client: openai.OpenAI, model: str) -> None:
    reply = client.completions.create(model=model, prompt="The capital of France is",
                                      max_tokens=3, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text
    assert reply.usage.completion_tokens == 3
    streamed = list(client.completions.create(model=model, prompt="The capital of France is",
                                              max_tokens=3, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_completions_default_to_16_tokens(client: openai.OpenAI, model: str) -> None:
    reply = client.completions.create(model=model, prompt="1, 2, 3, 4, 5, 6, 7,", temperature=0)
    assert reply.usage.completion_tokens <= 16


def test_stop_string(client: openai.OpenAI, model: str) -> None:
    reply = client.completions.create(model=model, prompt="1, 2, 3, 4, 5,", max_tokens=12,
                                      temperature=0, stop=[" 7"])
    assert " 7" not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"


def test_errors_raise_the_right_exception_classes(client: openai.OpenAI, model: str) -> None:
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=hi, temperature=5)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model=model, messages=[
            {"role": "user", "content": "word " * 1500}], max_tokens=1)
    assert overflow.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=hi, max_tokens=5000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=hi, n=2)
    with pytest.raises(openai.BadRequestError) as bad_session:
        client.chat.completions.create(model=model, messages=hi, max_tokens=1,
                                       extra_body={"session_id": "../etc/passwd"})
    assert bad_session.value.param == "session_id"


def test_api_key_is_enforced(tmp_path: Path) -> None:
    with running_server(server_config(tmp_path), api_key=API_KEY) as srv:
        good = openai.OpenAI(base_url=srv.v1, api_key=API_KEY, max_retries=0)
        assert good.models.list().data
        bad = openai.OpenAI(base_url=srv.v1, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        # /health stays open without a key.
        status, _ = srv.json("GET", "/health", auth=False)
        assert status == 200
