"""A prompt several times longer than a slot's share of the hot tier, sent over HTTP with the official
``openai`` client: served on a working set (not refused), the passkey found, and the usage and
stats saying how many tokens were in the working set, restored and computed."""

from __future__ import annotations

import openai

from bench import passkey
from tests.http.conftest import running_server, server_config

SHARE = 1024                 # tokens of a slot's hot share
KV_BYTES_PER_TOKEN = 23_040  # the default model, f16 K and V


def test_a_long_prompt_is_served_on_a_working_set(tmp_path):
    config = server_config(tmp_path / "data", **{
        "model.n_slots": 1, "model.context_size": 8192,
        "tiers.gpu_vram_budget": SHARE * KV_BYTES_PER_TOKEN})
    key = passkey.keys(1, seed=5)[0]
    with running_server(config) as server:
        client = openai.OpenAI(base_url=server.v1, api_key="-", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        # About three shares long (English runs near four characters a token).
        text = passkey.prompt(3 * SHARE, 0.4, key, lambda t: len(t) // 4)
        reply = client.completions.create(model=model, prompt=text, max_tokens=8,
                                          temperature=0)
        usage = reply.usage
        assert usage.prompt_tokens > 2 * SHARE
        assert passkey.found(reply.choices[0].text, key), reply.choices[0].text
        details = usage.prompt_tokens_details
        assert 0 < details.working_set_tokens <= SHARE
        assert details.prefill_tokens + details.cached_tokens == usage.prompt_tokens
        _, stats = server.json("GET", "/v1/cache/stats")
        assert stats["working_set"]["selections"] > 0 and stats["working_set"]["stored"] > 0
