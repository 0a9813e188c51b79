"""Several models per server, over real HTTP: routing by name, loading on first use, unloading
the least recently used beyond ``model.memory_budget``, and a conversation on a model that was
unloaded resumed from the store.

The two models are the default GGUF and a copy whose ``general.name`` differs by one byte: the
same weights (so the test stays quick), but another file hash, hence another fingerprint and
another storage namespace, as two different models have.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from kvtier.engine.model import default_model_path
from kvtier.engine.pool import ModelPool, model_specs
from kvtier.errors import ConfigError
from tests.http.conftest import Server, running_server, server_config

CHAT = "/v1/chat/completions"
DOCUMENT = ("Ada Lovelace wrote the first published program for Babbage's Analytical Engine, a "
            "table of Bernoulli numbers, in her notes on Menabrea's paper. ") * 12


def two_models(directory: Path) -> tuple[Path, Path]:
    """alpha.gguf (the default model) and beta.gguf (the same with another general.name)."""
    alpha, beta = directory / "alpha.gguf", directory / "beta.gguf"
    alpha.symlink_to(default_model_path())
    shutil.copyfile(default_model_path(), beta)
    with open(beta, "r+b") as f:
        head = f.read(4096)
        at = head.index(b"Smollm2 135M")
        f.seek(at)
        f.write(b"T")
    return alpha, beta


def chat(server: Server, model: str | None, text: str, **fields: Any) -> tuple[int, Any]:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 3,
            "temperature": 0, **fields}
    if model is not None:
        body["model"] = model
    return server.json("POST", CHAT, body)


def loaded(server: Server) -> dict[str, bool]:
    _, models = server.json("GET", "/v1/models")
    return {m["id"]: m["loaded"] for m in models["data"]}


def test_models_are_routed_loaded_unloaded_and_resumed_from_the_store(tmp_path: Path) -> None:
    alpha, beta = two_models(tmp_path)
    # One model with its hot tier takes ~170 MiB here: the budget holds one at a time.
    config = server_config(tmp_path / "data", **{
        "model.model_path": str(alpha), "model.models": [str(beta)],
        "model.memory_budget": "200MiB"})
    with running_server(config) as server:
        assert loaded(server) == {"alpha": True, "beta": False}
        status, first = chat(server, "alpha", DOCUMENT + "Who wrote the first program?",
                             session_id="on-alpha")
        assert status == 200 and first["model"] == "alpha"

        status, other = chat(server, "beta", "Hello")
        assert status == 200 and other["model"] == "beta"
        assert loaded(server) == {"alpha": False, "beta": True}

        status, missing = chat(server, "gpt-4o", "Hello")
        assert status == 404 and missing["error"]["code"] == "model_not_found"
        assert "'alpha'" in missing["error"]["message"] and "'beta'" in missing["error"]["message"]
        assert server.json("GET", "/v1/models/gpt-4o")[0] == 404
        # A session's KV belongs to its model: beta (another namespace) cannot continue it.
        status, mismatch = chat(server, "beta", "And?", session_id="on-alpha")
        assert status == 409 and mismatch["error"]["code"] == "model_mismatch"

        status, again = chat(server, "alpha", "Say it again.", session_id="on-alpha")
        assert status == 200 and again["model"] == "alpha"
        assert loaded(server) == {"alpha": True, "beta": False}
        history = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
        details = again["usage"]["prompt_tokens_details"]
        # alpha's hot tier was freed with it: its history came back from the store.
        assert details["restored_tokens"] >= history - 1
        assert details["cached_tokens"] >= history - 1

        _, stats = server.json("GET", "/v1/cache/stats")
        per_model = {m["name"]: m for m in stats["models"]}
        assert per_model["alpha"]["loaded"] and not per_model["beta"]["loaded"]
        assert per_model["alpha"]["tokens"]["restored"] >= history - 1
        assert per_model["beta"]["tokens"]["generated"] >= 1      # as it was when unloaded
        assert per_model["beta"]["hot"]["tokens"] == 0
        assert stats["tokens"]["generated"] == sum(m["tokens"]["generated"]
                                                   for m in per_model.values())
        assert stats["hot"] == per_model["alpha"]["hot"]
        metrics = server.request("GET", "/metrics")[2].decode()
        assert 'kvtier_model_loaded{model="alpha"} 1.0' in metrics
        assert 'kvtier_model_loaded{model="beta"} 0.0' in metrics
        generated = float(per_model["beta"]["tokens"]["generated"])
        assert f'kvtier_model_tokens_total{{kind="generated",model="beta"}} {generated}' \
            in metrics

        # No model named: the first one.
        status, default = chat(server, None, "Hi")
        assert status == 200 and default["model"] == "alpha"


def test_without_a_budget_models_stay_loaded(tmp_path: Path) -> None:
    alpha, beta = two_models(tmp_path)
    config = server_config(tmp_path / "data", **{
        "model.model_path": str(alpha), "model.models": [str(beta)]})
    with running_server(config) as server:
        for model in ("beta", "alpha", "beta"):
            status, body = chat(server, model, "Hi")
            assert status == 200 and body["model"] == model
        assert loaded(server) == {"alpha": True, "beta": True}
        _, stats = server.json("GET", "/v1/cache/stats")
        assert stats["slots"]["total"] == 2 * config.model.n_slots
        assert stats["hot"]["budget"] == sum(m["hot"]["budget"] for m in stats["models"])


def test_a_missing_file_is_refused_at_startup(tmp_path: Path) -> None:
    config = server_config(tmp_path / "data", **{"model.models": [str(tmp_path / "no.gguf")]})
    with pytest.raises(ConfigError, match="model.models.*no such file"):
        ModelPool(config)


def test_two_files_with_one_name_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    config = server_config(tmp_path / "data", **{
        "model.model_path": str(tmp_path / "x.gguf"), "model.models": [str(tmp_path / "a/x.gguf")]})
    with pytest.raises(ConfigError, match="served as 'x'"):
        model_specs(config)
