"""The tools on a store filled by the engine with the real default model: inspect shows the
sessions as the engine stored them, and after compaction they still resume from the store."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvtier.cli import main
from kvtier.config import load_config
from kvtier.engine.api import ChatMessage, GenerationRequest, SamplingParams
from kvtier.engine.engine import Engine
from tests.engine.conftest import document_text

SETTINGS = {"model.context_size": 2048, "model.n_slots": 2,
            "tiers.host_ram_budget": "8MiB", "tiers.local_ssd_budget": "4MiB",
            "tiers.nfs_budget": "1GiB"}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
SYSTEM = document_text()[:3000]


def chat(text: str, session: str) -> GenerationRequest:
    return GenerationRequest(messages=(ChatMessage("system", SYSTEM), ChatMessage("user", text)),
                             sampling=GREEDY, session_id=session)


@pytest.mark.slow
def test_engine_sessions_are_inspected_and_resume_after_compact(tmp_path, capsys):
    values = {"data_dir": str(tmp_path), **SETTINGS}
    flags = ["--data-dir", str(tmp_path), "--no-progress"] + [
        arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]

    def tool(*args: str) -> Any:
        capsys.readouterr()
        assert main([args[0], *flags, *args[1:], "--json"]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    engine = Engine(load_config(None, values))
    try:
        for sid in ("a", "b", "c"):
            engine.generate(chat(f"What does section {sid} say?", sid))
        model_name, block_size = engine.model_name, engine.block_size
        stored = {sid: engine.get_session(sid).n_tokens for sid in "abc"}
    finally:
        engine.close()

    summary = tool("inspect")
    assert summary["totals"]["sessions"] == 3
    assert summary["sharing"]["shared_blocks"] >= 2    # the system prompt, stored once
    warm, cool, _ = summary["tiers"]
    assert warm["blocks"] > 0 and cool["blocks"] > 0    # the tiny warm budget spilled over
    rows = {r["session_id"]: r for r in tool("inspect", "sessions")}
    assert set(rows) == {"a", "b", "c"}
    for sid, row in rows.items():
        assert row["model"] == model_name and row["tokens"] == stored[sid]
        assert row["messages"] >= 2 and row["blocks"]["missing"] == 0
    session = tool("inspect", "session", "b")
    assert any(m.get("content") == "What does section b say?" for m in session["data"]["messages"])
    assert session["block_list"][0]["refs"] == 3
    assert sum(b["tokens"] for b in session["block_list"]) <= stored["b"]
    assert tool("inspect", "verify")["ok"]

    report = tool("compact", "--keep", "2", "--warm-target", "0")
    assert report["steps"]["expire"]["sessions"] == ["a"]
    assert report["after"][0]["blocks"] == 0    # everything re-encoded into cool and cold
    assert tool("inspect", "verify")["ok"]
    assert not tool("compact", "--keep", "2", "--warm-target", "0")["changed"]

    engine = Engine(load_config(None, values))
    try:
        resumed = engine.generate(chat("And section d?", "b"))
        usage = resumed.usage
        kept = stored["b"] // block_size * block_size
        assert usage.restored_tokens >= kept > 0
        assert usage.prefill_tokens == usage.prompt_tokens - usage.cached_tokens
        assert resumed.text
    finally:
        engine.close()
