"""Small factories for the engine's tests on the real default model: configs, engines, requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtier.config import load_config
from kvtier.engine.api import ChatMessage, GenerationRequest, SamplingParams
from kvtier.engine.engine import Engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
TURN_1 = "Name three colours."
TURN_2 = "Now name three animals."


def settings(data_dir: Path, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"data_dir": str(data_dir), "model.context_size": 2048,
                              "model.n_slots": 2}
    values.update(extra)
    return values


def make_engine(data_dir: Path, **extra: Any) -> Engine:
    return Engine(load_config(None, settings(data_dir, **extra)))


def chat(text: str, session: str | None = None, sampling: SamplingParams = GREEDY,
         system: str | None = None) -> GenerationRequest:
    messages = ((ChatMessage("system", system),) if system else ()) + (ChatMessage("user", text),)
    return GenerationRequest(messages=messages, sampling=sampling, session_id=session)
